"""Equal-compute quality: the GPT-2 and modern families at the same shape, steps and tokens, on two corpora.

    python benchmarks/families.py                       # 200 steps each: ~15 min on 2 CPU cores
    python benchmarks/families.py --steps 50 --jobs default   # a quick look

For every job (``default``: conf/default.yaml on the built-in corpus; ``chinese``: conf/chinese.yaml on
zh_poetry.txt) and every family (``conf/model/gpt2.yaml``, ``conf/model/modern.yaml``, composed on top of
the job's config, which keeps its shape, vocabulary, batch and schedule) it runs one ``lm-lightning fit``
of ``--steps`` steps in a subprocess (interleaved per job, one temporary MLflow store and token cache, no
early stopping, no text samples), and reports the final val/bpb, training tokens/s (median of the logged
values) and the peak resident memory of the training process (``ru_maxrss`` from ``os.wait4``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from speedrun import scratch_store  # a sibling script, as ``python benchmarks/families.py`` runs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
JOBS = {
    "default": [ROOT / "conf" / "default.yaml", None],
    "chinese": [ROOT / "conf" / "chinese.yaml", DATA / "zh_poetry.txt"],
}
FAMILIES = {name: ROOT / "conf" / "model" / f"{name}.yaml" for name in ("gpt2", "modern")}


def fit(cmd: list[str], env: dict[str, str], cwd: str) -> int:
    """Run ``cmd``; the peak resident memory of the process in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    process = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return round(usage.ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args()

    rows = []
    with scratch_store() as (tmp, env, exe, client):
        for job in args.jobs:
            config, data = JOBS[job]
            for family in args.families:
                name = f"{job}-{family}"
                cmd = [str(exe), "fit", "--config", str(config), "--config", str(FAMILIES[family]),
                       "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(args.steps),
                       "--early_stopping.patience", "1000", "--samples.prompts", "[]",
                       "--trainer.default_root_dir", f"{tmp}/runs", "--trainer.enable_progress_bar", "false",
                       "--trainer.logger.init_args.run_name", name]
                if data:
                    cmd += ["--data.path", str(data)]
                peak_mib = fit(cmd, env, tmp)
                experiments = [e.experiment_id for e in client.search_experiments()]
                run = client.search_runs(experiments, filter_string=f"attributes.run_name = '{name}'")[0]

                def metric(key: str) -> list[float]:
                    return [m.value for m in client.get_metric_history(run.info.run_id, key)]

                params = run.data.params
                rows.append({
                    "job": job, "family": family, "steps": args.steps,
                    "tokens": args.steps * int(params["data.batch_size"]) * int(params["model.block_size"]),
                    # train/* are logged every log_every_n_steps: a run shorter than that has none.
                    "val_bpb": round(metric("val/bpb")[-1], 4),
                    "train_loss": round(losses[-1], 4) if (losses := metric("train/loss")) else None,
                    "tokens_per_s": round(statistics.median(rates)) if (rates := metric("train/tokens_per_s")) else None,
                    "peak_rss_mib": peak_mib, "precision": params.get("trainer.precision"),
                })
                print(json.dumps(rows[-1]), flush=True)
    cols = ["job", "family", "steps", "tokens", "val_bpb", "train_loss", "tokens_per_s", "peak_rss_mib", "precision"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
