"""The head's sliced cross-entropy (lm_lightning/head_loss.py) at the rows per slice that ``slice_rows`` picks
against one slice of up to ``SLICE_ELEMENTS`` logits (the rule before it) and other row counts, with and
without the gradients.

    python benchmarks/head_slices.py [--repeats 25] [--shapes 1024x128x8192 1024x256x1024 2048x768x50257]

A shape is positions x n_embd x vocab_size (the speedrun's batch, the long race's, a 124M GPT-2's LoRA
batch). The row counts are timed alternately in one process; the figure is the median milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lm_lightning import head_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1024x128x8192", "1024x256x1024", "2048x768x50257"])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    torch.manual_seed(0)
    slice_rows = head_loss.slice_rows
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms (rows per slice: ms)")
    try:
        for shape in args.shapes:
            measure(shape, args.repeats, slice_rows)
    finally:
        head_loss.slice_rows = slice_rows


def measure(shape: str, repeats: int, slice_rows: Callable[[int, int], int]) -> None:
    """Print one shape's median ms at each row count, without and with the gradients; ``head_loss.slice_rows``
    is replaced while it runs, ``slice_rows`` is the real one."""
    n, n_embd, vocab = (int(x) for x in shape.split("x"))
    chosen = slice_rows(vocab, n_embd)
    one = min(n, head_loss.SLICE_ELEMENTS // vocab)
    rows = sorted({chosen, one, max(1, chosen // 2), min(n, chosen * 2)})
    for grad in (False, True):
        hidden = torch.randn(n, n_embd, requires_grad=grad)
        weight = (torch.randn(vocab, n_embd) * 0.05).requires_grad_(grad)
        targets = torch.randint(0, vocab, (n,))
        times: dict[int, list[float]] = {r: [] for r in rows}
        for repeat in range(repeats + 2):
            for r in rows:
                head_loss.slice_rows = lambda vocab_size, n_embd, r=r: r
                start = time.perf_counter()
                with torch.set_grad_enabled(grad):
                    loss, _ = head_loss.head_cross_entropy(hidden, weight, targets)
                    if grad:
                        loss.backward()
                if repeat >= 2:  # warm-up
                    times[r].append(time.perf_counter() - start)
        figures = "  ".join(
            f"{r}{' (picked)' if r == chosen else ''}{' (one slice)' if r == one else ''}: "
            f"{statistics.median(t) * 1e3:.1f}" for r, t in times.items()
        )
        print(f"{shape} {'forward+backward' if grad else 'no grad':16s} {figures}", flush=True)


if __name__ == "__main__":
    main()
