"""Muon's cost per step: torch.optim.Muon (one matrix at a time) against lm_lightning's batched step, on the
blocks' matrices of a model at the speedrun's shape (conf/speedrun-shakespeare.yaml: 4 layers, width 128).

    python benchmarks/muon_step.py [--n_embd 128] [--n_layer 4] [--repeats 200]

Both are timed back to back in one process, alternating, with the same gradients; the figure is the median
milliseconds per step of the Muon part alone (AdamW's part is the same in both).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lm_lightning.model import GPT, GPTConfig
from lm_lightning.optim import _block_matrices, muon_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--mlp", default="relu2")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd,
                          pos_embedding="rope", norm="rmsnorm", mlp=args.mlp, bias=False, qk_norm=True))
    params = [p for _, p in _block_matrices(model)]
    for p in params:
        p.grad = torch.randn_like(p)
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    theirs, ours = torch.optim.Muon(params, **kwargs), torch.optim.Muon(params, **kwargs)
    steps = {"torch.optim.Muon": theirs.step, "batched muon_step": lambda: muon_step(ours.param_groups[0], ours.state)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(10):
        for step in steps.values():
            step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    shapes = sorted({tuple(p.shape) for p in params})
    print(f"{len(params)} matrices of shapes {shapes}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = statistics.median(times["torch.optim.Muon"])
    for name, t in times.items():
        print(f"{name:20s} {statistics.median(t) * 1e3:7.2f} ms/step  ({base / statistics.median(t):.2f}x)")


if __name__ == "__main__":
    main()
