"""Training throughput: lm_lightning against a minimal plain-PyTorch loop, same model, same batches.

    python benchmarks/train_throughput.py                       # small and medium shapes, fp32 and bf16
    python benchmarks/train_throughput.py --shapes small --precisions 32-true --compile
    python benchmarks/train_throughput.py --shapes small modern-small modern-small-adamw --precisions 32-true
    python benchmarks/train_throughput.py --device cuda --shapes gpt2-small --precisions bf16-mixed --compile_only

For each shape and precision it runs, in this one process and alternating, a plain loop (forward,
loss, backward, clip, fused AdamW step, LR schedule) and `lightning.Trainer.fit` on `LanguageModel`
as the CLI configures it (MLflow logging to a temporary store every --log_every_n_steps, our
throughput callback; no validation, checkpoints or progress bar). It reports tokens/s (median of windows after warm-up),
achieved FLOP/s, MFU (against a datasheet peak for known GPUs, else a matmul measured here), and the ratio lm_lightning / plain loop:
Lightning's overhead. Prints a table, then the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from lm_lightning.callbacks import TokensPerSecond
from lm_lightning.data.cache import TokenShards
from lm_lightning.data.windows import ResumableLoader, ResumableSampler, TrainWindows
from lm_lightning.hardware import peak_flops, precision_dtype
from lm_lightning.tracking.logger import MLflowLogger
from lm_lightning.module import LanguageModel
from lm_lightning.optim import build_optimizer, warmup_cosine

SHAPES = {
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=512, steps=300),
    "medium": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=12, vocab_size=512, steps=60),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, vocab_size=50304, steps=200),
}
# The modern family (conf/model/modern.yaml) at the small and medium shapes, with Muon and, to isolate
# Muon's cost per step (Newton-Schulz iterations on every block matrix), with AdamW.
MODERN = dict(pos_embedding="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, bias=False, tie_embeddings=False,
              zero_init_proj=True)
for size in ("small", "medium"):
    SHAPES[f"modern-{size}"] = dict(SHAPES[size], model=dict(MODERN, optimizer="muon"))
    SHAPES[f"modern-{size}-adamw"] = dict(SHAPES[size], model=dict(MODERN, optimizer="adamw"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class WindowTimer(L.Callback):
    """Wall time of every ``window`` training steps."""

    def __init__(self, window: int):
        self.window, self.times = window, []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step % self.window == 0:
            sync(pl_module.device)
            self.times.append(time.perf_counter())


def batches(shape: dict, steps: int) -> ResumableLoader:
    tokens = np.random.default_rng(0).integers(0, shape["vocab_size"], size=4_000_000, dtype=np.uint16)
    dataset = TrainWindows(TokenShards([tokens]), shape["block_size"], shape["batch_size"], seed=0)
    return ResumableLoader(dataset, sampler=ResumableSampler(steps), batch_size=None)


def model_args(shape: dict, compile: bool) -> dict:
    keys = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    return dict(warmup_steps=10, dropout=0.0, compile=compile, **{k: shape[k] for k in keys}, **shape.get("model", {}))


def window_rates(times: list[float], tokens_per_step: int, window: int, warmup_windows: int) -> list[float]:
    gaps = np.diff(times)[warmup_windows:]
    return [tokens_per_step * window / g for g in gaps]


def plain_loop(shape: dict, steps: int, window: int, precision: str, compile: bool, device: torch.device) -> list[float]:
    torch.manual_seed(0)
    module = LanguageModel(**model_args(shape, False))
    model = module.model.to(device)
    if compile:
        model.compile()
    opt = build_optimizer(model, shape.get("model", {}).get("optimizer", "adamw"), learning_rate=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(10, steps, 0.1))
    dtype = precision_dtype(precision)
    times = []
    model.train()
    for step, batch in enumerate(batches(shape, steps), start=1):
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % window == 0:
            sync(device)
            times.append(time.perf_counter())
    return times


def lightning_loop(
    shape: dict, steps: int, window: int, precision: str, compile: bool, device: torch.device, tmp: Path, log_every_n_steps: int
) -> list[float]:
    torch.manual_seed(0)
    module = LanguageModel(**model_args(shape, compile))
    timer = WindowTimer(window)
    logger = MLflowLogger(experiment_name="benchmark", tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", log_model=False)
    logger.experiment.set_tag(logger.run_id, "benchmark", "train_throughput")  # create the run before timing
    trainer = L.Trainer(
        max_steps=steps, precision=precision, accelerator=device.type, devices=1, gradient_clip_val=1.0,
        log_every_n_steps=log_every_n_steps, limit_val_batches=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, logger=logger,
        callbacks=[TokensPerSecond(), timer], default_root_dir=tmp,
    )
    trainer.fit(module, train_dataloaders=batches(shape, steps))
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["small", "medium"], choices=list(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 300 small, 60 medium, 200 gpt2-small)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each loop")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--compile_only", action="store_true", help="measure torch.compile only")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--log_every_n_steps", type=int, default=50, help="MLflow logging interval of the Lightning run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_float32_matmul_precision("high")
    device = torch.device(args.device)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape_name in args.shapes:
            shape = SHAPES[shape_name]
            steps = args.steps or shape["steps"]
            window = max(1, steps // 15)
            tokens_per_step = shape["batch_size"] * shape["block_size"]
            flops_per_token = LanguageModel(**model_args(shape, False)).model.flops_per_token(shape["block_size"])
            for precision in args.precisions:
                for compile in [True] if args.compile_only else [False, True] if args.compile else [False]:
                    peak, source = peak_flops(device, precision_dtype(precision))
                    rates = {"plain": [], "lm_lightning": []}
                    for _ in range(args.repeats):
                        times = plain_loop(shape, steps, window, precision, compile, device)
                        rates["plain"] += window_rates(times, tokens_per_step, window, 2)
                        times = lightning_loop(shape, steps, window, precision, compile, device, Path(tmp), args.log_every_n_steps)
                        rates["lm_lightning"] += window_rates(times, tokens_per_step, window, 2)
                    plain, ours = (statistics.median(rates[k]) for k in ("plain", "lm_lightning"))
                    rows.append({
                        "shape": shape_name, "precision": precision, "compile": compile,
                        "plain_tokens_per_s": round(plain), "lm_lightning_tokens_per_s": round(ours),
                        "ratio": round(ours / plain, 3),
                        "achieved_gflops": round(ours * flops_per_token / 1e9, 1),
                        "peak_gflops": round(peak / 1e9, 1), "peak_source": source,
                        "mfu": round(ours * flops_per_token / peak, 4),
                    })
                    print(json.dumps(rows[-1]), flush=True)
    cols = ["shape", "precision", "compile", "plain_tokens_per_s", "lm_lightning_tokens_per_s", "ratio", "achieved_gflops", "peak_gflops", "mfu"]
    print("\n" + " | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
