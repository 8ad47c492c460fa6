"""LoRA against full fine-tuning: memory, speed and checkpoint size on a 124M GPT-2 folder; quality at equal steps.

    python benchmarks/lora.py --part speed --steps 30     # 124M GPT-2-shaped folder, block 256, batch 8, fp32
    python benchmarks/lora.py --part speed --steps 30 --precision bf16-mixed   # LoRA's base held in bf16
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/lora.py --part speed ...  # RSS that follows live tensors
    python benchmarks/lora.py --part quality --steps 200  # ours trained on Tiny Shakespeare, fine-tuned on the built-in corpus
    python benchmarks/lora.py --part speed --shape qwen3-0.6b --accelerator gpu --precision bf16-mixed   # on a GPU

``speed``: a random 124M-parameter GPT-2 folder (``GPT2Config()`` shape, 50257 embedding rows, a 4096-token
byte-level BPE) is fine-tuned for ``--steps`` steps, fully and with LoRA (r=8 on attention and MLP), each in its own
process (``benchmarks/pretrained.py``'s ``fit``): median ``train/tokens_per_s``, the process's peak RSS, and the size of
``last.ckpt``. With ``--precision bf16-mixed`` both run under autocast and LoRA's frozen base is held in bf16
(``model.base_dtype``). glibc keeps freed tensors of up to 32 MB in its heap (its mmap threshold grows with each
large free), so the default RSS counts memory no tensor holds; ``MALLOC_MMAP_THRESHOLD_`` fixes the threshold, RSS
then follows the live tensors (as ``max_memory_allocated`` does on a GPU), at ~25% of the speed. ``quality``: a small model of ours is trained from scratch on Tiny Shakespeare, then fine-tuned on the
built-in corpus for ``--steps`` steps, fully (lr 3e-4) and with LoRA r=16 on all targets (lr 3e-3): val/bpb of each.
Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pretrained import corpus_text, fit, random_folder  # a sibling script, as ``python benchmarks/lora.py`` runs

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


SHAPES = {
    "gpt2-124m": dict(vocab_rows=50257),  # GPT2Config()'s defaults otherwise: 12 x 768, 1024 positions
    "qwen3-0.6b": dict(family="qwen3", vocab_rows=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def newest_checkpoint(workdir: Path) -> Path:
    return max(workdir.glob("runs/*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)


def val_bpb(workdir: Path, experiment: str) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client.get_metric_history(run.info.run_id, "val/bpb")[-1].value


def speed_part(a: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = random_folder(tmp / a.shape, 4096, **{**SHAPES[a.shape], **({"num_hidden_layers": a.n_layer} if a.n_layer else {})})
        (tmp / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
        common = ["--model.init_from", str(folder), "--data.path", str(tmp / "corpus.txt"), "--data.batch_size", "8",
                  "--model.block_size", "256", "--trainer.max_steps", str(a.steps), "--trainer.val_check_interval", str(a.steps),
                  "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--trainer.precision", a.precision,
                  "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]", "--model.warmup_steps", "0",
                  "--trainer.logger.init_args.log_model", "false", "--trainer.accelerator", a.accelerator]
        lora = ["--model.lora_r", "8", "--model.lora_targets", "[attention, mlp]"]
        if a.precision == "bf16-mixed":
            lora += ["--model.base_dtype", "bfloat16"]
        runs = (("full", []), ("lora r=8 attention+mlp", lora))
        for name, extra in runs:
            row = fit([*common, *extra], tmp, name.split()[0])
            row["checkpoint_mb"] = newest_checkpoint(tmp).stat().st_size / 2**20
            rows.append({"run": name, "steps": a.steps, "precision": a.precision, **row})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def quality_part(a: argparse.Namespace) -> list[dict]:
    shape = ["--model.n_layer", "4", "--model.n_head", "4", "--model.n_embd", "128", "--model.block_size", "128"]
    common = ["--data.batch_size", "16", "--trainer.limit_val_batches", "8", "--trainer.precision", "32-true",
              "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]", "--trainer.logger.init_args.log_model", "false",
              "--trainer.log_every_n_steps", "10"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
        pre = ["--config", str(ROOT / "conf/shakespeare.yaml"), *shape, "--data.path", str(SHAKESPEARE), "--trainer.max_steps",
               str(a.pretrain_steps), "--trainer.val_check_interval", str(a.pretrain_steps), *common]
        # fit() passes conf/finetune.yaml first; the later --config wins for what it sets.
        fit(pre, tmp, "pretrain")
        base = newest_checkpoint(tmp)
        tune = ["--model.init_from", str(base), "--data.path", str(tmp / "corpus.txt"), "--trainer.max_steps", str(a.steps),
                "--trainer.val_check_interval", str(a.steps), "--model.warmup_steps", "10", *common]
        for name, extra in (("full lr=3e-4", ["--model.learning_rate", "3e-4"]),
                            ("lora r=16 all lr=3e-3", ["--model.lora_r", "16", "--model.lora_alpha", "16", "--model.lora_targets", "[all]",
                                                       "--model.learning_rate", "3e-3"])):
            experiment = name.split()[0]
            fit([*tune, *extra], tmp, experiment)
            rows.append({"run": name, "steps": a.steps, "val_bpb": val_bpb(tmp, experiment)})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("speed", "quality"), required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true", help="speed part only")
    parser.add_argument("--shape", choices=SHAPES, default="gpt2-124m", help="speed part only: the random folder's shape")
    parser.add_argument("--n_layer", type=int, help="speed part only: fewer layers than the shape's (a quick check)")
    parser.add_argument("--accelerator", default="cpu", help="speed part only: cpu, gpu")
    a = parser.parse_args()
    rows = speed_part(a) if a.part == "speed" else quality_part(a)
    for row in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
