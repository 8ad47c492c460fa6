"""What the valid-UTF-8 guard costs per generated token: the same generation with ``valid_utf8`` on and off, side by
side (interleaved, so load on the machine hits both alike), and the guard's own work at large vocabularies.

    python benchmarks/utf8_guard.py
    python benchmarks/utf8_guard.py --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024

1. End to end: ``TextGenerator.generate`` of a fresh model of the given shape over a byte-level tokenizer learnt
   from Chinese poems (``--vocab_size`` tokens), ``--max_new_tokens`` tokens of ``我爱北京天安门`` at temperature 1,
   at batch 1 and 8: milliseconds per step, guard on and off, as the median of ``--repeats`` runs.
2. The guard alone at GPT-2's and Qwen's vocabulary sizes (a synthetic table of byte pieces cut from Chinese and
   English text, parts of characters included): building its tables once, and one step (mask + advance), against
   one step of sampling itself (``next_token``) on the same logits.

Prints a table and a JSON line. A benchmark measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from lm_lightning.generate import BOUNDARY, TextGenerator, Utf8Guard, next_token
from lm_lightning.model import GPT, GPTConfig
from lm_lightning.tokenizer import train_tokenizer

PROMPT = "我爱北京天安门"
POEMS = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "zh_poetry.txt")


def seconds(run) -> float:
    """CPU seconds ``run`` takes (this process's, on one thread): on a shared machine the wall clock also counts the
    time other processes hold the cores, which swamps what is measured."""
    start = time.process_time()
    run()
    return time.process_time() - start


def end_to_end(args: argparse.Namespace, text: str) -> dict:
    tokenizer = train_tokenizer([text], args.vocab_size)
    torch.manual_seed(0)
    config = GPTConfig(tokenizer.get_vocab_size(), args.block_size, args.n_layer, args.n_head, args.n_embd)
    generator = TextGenerator(GPT(config).eval(), tokenizer)
    results = {}
    for batch in (1, 8):
        times = {True: [], False: []}

        def run(valid_utf8: bool) -> None:
            generator.generate(PROMPT, num_samples=batch, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=1,
                               valid_utf8=valid_utf8)

        run(True), run(False)  # warm-up (and the guard's tables, built on first use)
        for _ in range(args.repeats):
            for valid_utf8 in (True, False):
                times[valid_utf8].append(seconds(lambda: run(valid_utf8)) / args.max_new_tokens)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        results[f"batch_{batch}"] = {"ms_per_step_on": 1000 * on, "ms_per_step_off": 1000 * off,
                                     "guard_ms_per_step": 1000 * (on - off), "overhead_pct": 100 * (on / off - 1)}
    return {"vocab_size": tokenizer.get_vocab_size(), **results}


def synthetic_table(vocab_size: int, text: str) -> list[bytes]:
    """``vocab_size`` tokens: the 256 bytes, then pieces of 1 to 8 bytes cut from ``text`` at any byte offset."""
    data = text.encode("utf-8")
    rng = random.Random(0)
    table = [bytes([b]) for b in range(256)]
    while len(table) < vocab_size - 1:
        start = rng.randrange(len(data) - 8)
        table.append(data[start : start + rng.randint(1, 8)])
    return table + [b""]  # an end-of-text token


def guard_alone(vocab_size: int, text: str, repeats: int) -> dict:
    table = synthetic_table(vocab_size, text)
    build = statistics.median(seconds(lambda: Utf8Guard(table)) for _ in range(3))
    guard = Utf8Guard(table)
    results = {"vocab_size": vocab_size, "build_ms": 1000 * build}
    for batch in (1, 8):
        logits = torch.randn(batch, vocab_size)
        states = torch.full((batch,), BOUNDARY, dtype=torch.long)
        generator = torch.Generator().manual_seed(0)

        def guarded_step() -> None:
            nonlocal states
            token = next_token(guard.mask(logits, states), 1.0, generator=generator)
            states = guard.advance(states, token)

        def plain_step() -> None:
            next_token(logits, 1.0, generator=generator)

        steps = 50
        guarded = statistics.median(seconds(lambda: [guarded_step() for _ in range(steps)]) for _ in range(repeats)) / steps
        plain = statistics.median(seconds(lambda: [plain_step() for _ in range(steps)]) for _ in range(repeats)) / steps
        results[f"batch_{batch}"] = {"sample_ms": 1000 * plain, "guarded_sample_ms": 1000 * guarded, "guard_ms": 1000 * (guarded - plain)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is then the time of the work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(POEMS, encoding="utf-8") as f:
        text = f.read(100_000)
    report = {"end_to_end": end_to_end(args, text), "guard_alone": [guard_alone(v, text, args.repeats) for v in (50_257, 151_936)]}
    e2e = report["end_to_end"]
    print(f"end to end, {args.n_layer}x{args.n_embd}, vocab {e2e['vocab_size']}, {args.max_new_tokens} tokens, ms per step:")
    for batch in (1, 8):
        r = e2e[f"batch_{batch}"]
        print(f"  batch {batch}: guard on {r['ms_per_step_on']:.3f}  off {r['ms_per_step_off']:.3f}  "
              f"difference {r['guard_ms_per_step']:+.3f} ({r['overhead_pct']:+.1f}%)")
    for g in report["guard_alone"]:
        print(f"guard alone, vocab {g['vocab_size']}: tables built in {g['build_ms']:.0f} ms")
        for batch in (1, 8):
            r = g[f"batch_{batch}"]
            print(f"  batch {batch}: sampling a step {r['sample_ms']:.3f} ms, with the guard {r['guarded_sample_ms']:.3f} ms "
                  f"(guard {r['guard_ms']:+.3f} ms)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
