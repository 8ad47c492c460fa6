"""The plain-PyTorch character-level baseline the speedrun is measured against (nanoGPT's shakespeare_char shape).

    python benchmarks/baseline_char.py                         # 2000 iterations, prints one JSON line
    python benchmarks/baseline_char.py --iters 200             # a quick look

A loop with no Lightning: a character vocabulary (every distinct character of the file), the last 10% held
out, random windows of 64 characters in batches of 12, a 4-layer, 4-head, 128-wide GPT without biases
(``lm_lightning.model.GPT`` in its GPT-2 configuration: learned positions, LayerNorm, GELU, tied head),
dropout 0, AdamW (lr 1e-3, betas 0.9/0.99, weight decay 0.1 on matrices) with 100 warm-up steps and a cosine
to 1e-4 at the last iteration, gradients clipped at 1.0, fp32. It prints the wall seconds of the training
steps alone and the final validation over the whole held-out split, in nats per character and bits per byte
(the same number divided by ln 2 when every character is one byte, which is checked).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lm_lightning.model import GPT, GPTConfig
from lm_lightning.optim import warmup_cosine

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def validate(model: GPT, val: torch.Tensor, block: int, batch: int) -> float:
    """Mean loss in nats per character over consecutive windows covering the whole split."""
    model.eval()
    total, count = 0.0, 0
    n = (len(val) - 1) // block
    x_all = val[: n * block].view(n, block)
    y_all = val[1 : n * block + 1].view(n, block)
    for i in range(0, n, batch * 8):
        logits = model(x_all[i : i + batch * 8])
        total += F.cross_entropy(logits.flatten(0, 1), y_all[i : i + batch * 8].flatten(), reduction="sum").item()
        count += y_all[i : i + batch * 8].numel()
    model.train()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    block, batch = 64, 12

    raw = Path(args.data_path).read_bytes()
    text = raw.decode("utf-8")
    if len(text) != len(raw):
        raise SystemExit(f"{args.data_path} is not ASCII: characters are not bytes, bits per byte would be wrong")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]

    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=len(chars), block_size=block, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
    model = GPT(config)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(100, args.iters, 0.1))

    start = time.perf_counter()
    for _ in range(args.iters):
        ix = torch.randint(len(train) - block - 1, (batch,))
        x = torch.stack([train[i : i + block] for i in ix])
        y = torch.stack([train[i + 1 : i + block + 1] for i in ix])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start

    val_loss = validate(model, val, block, batch)
    print(json.dumps({
        "baseline": "plain PyTorch, char-level 4x128, block 64, batch 12",
        "iters": args.iters, "vocab": len(chars), "params": model.num_params(),
        "train_seconds": round(seconds, 2), "final_train_loss": round(loss.item(), 4),
        "val_loss_nats_per_char": round(val_loss, 4), "val_bpb": round(val_loss / math.log(2), 4),
    }))


if __name__ == "__main__":
    main()
