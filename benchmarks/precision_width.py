"""fp32 or bf16 autocast on this CPU: training tokens/s of both, by model width, to set hardware.BF16_MIN_WIDTH.

    python benchmarks/precision_width.py                          # widths 128..768, 4 layers, block 128
    python benchmarks/precision_width.py --widths 256 384 --steps 40

Each width runs the plain training loop of ``train_throughput.py`` (GPT-2 family, fused AdamW, random tokens)
in fp32 and under bf16-mixed autocast, alternating, ``--repeats`` times; it prints the median tokens/s of
each and their ratio. The smallest width from which bf16 stays faster is where ``precision: null`` switches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch
from train_throughput import plain_loop, window_rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", nargs="+", type=int, default=[128, 256, 384, 512, 768])
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device, window = torch.device("cpu"), 5
    rows = []
    for width in args.widths:
        shape = dict(n_layer=args.n_layer, n_head=max(1, width // 64), n_embd=width, block_size=args.block_size,
                     batch_size=args.batch_size, vocab_size=args.vocab_size)
        tokens_per_step = args.batch_size * args.block_size
        rates = {"32-true": [], "bf16-mixed": []}
        for _ in range(args.repeats):
            for precision in rates:
                times = plain_loop(shape, args.steps, window, precision, False, device)
                rates[precision] += window_rates(times, tokens_per_step, window, 1)
        fp32, bf16 = (statistics.median(rates[k]) for k in rates)
        rows.append({"n_embd": width, "fp32_tokens_per_s": round(fp32), "bf16_tokens_per_s": round(bf16),
                     "bf16_over_fp32": round(bf16 / fp32, 2)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
