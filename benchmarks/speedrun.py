"""Time to a good model: seconds of training until val/bpb first reaches the target, from MLflow.

    python benchmarks/speedrun.py                      # conf/speedrun-shakespeare.yaml, 3 runs, median
    python benchmarks/speedrun.py --runs 1 -- --model.n_embd 192   # extra flags go to lm-lightning fit

Each run is a real `lm-lightning fit` in a subprocess, recorded in a temporary MLflow store. The
time of a run is the timestamp of its first val/bpb at or below the target minus the
`train_start_ms` tag written when the first training step starts (so tokenizer training and
tokenization are not counted; the first run builds the cache, later runs reuse it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "conf" / "speedrun-shakespeare.yaml"))
    parser.add_argument("--data_path", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--target", type=float, default=2.72)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="more lm-lightning fit flags, after --")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "LM_LIGHTNING_CACHE": f"{tmp}/cache"}
        exe = Path(sys.executable).with_name("lm-lightning")
        for i in range(args.runs):
            cmd = [str(exe), "fit", "--config", args.config, "--data.path", args.data_path,
                   "--trainer.default_root_dir", f"{tmp}/runs", *args.extra]
            done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"run {i} failed:\n{done.stderr[-3000:]}")
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("speedrun-shakespeare")
        for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
            start = int(run.data.tags["train_start_ms"])
            history = client.get_metric_history(run.info.run_id, "val/bpb")
            hit = next((m for m in history if m.value <= args.target), None)
            tps = [m.value for m in client.get_metric_history(run.info.run_id, "train/tokens_per_s")]
            rows.append({
                "run_id": run.info.run_id,
                "seconds_to_target": round((hit.timestamp - start) / 1000, 2) if hit else None,
                "step": hit.step + 1 if hit else None,
                "val_bpb": round(hit.value, 4) if hit else round(min(m.value for m in history), 4),
                "validations": len(history),
                "train_tokens_per_s": round(statistics.median(tps)) if tps else None,
            })
    for row in rows:
        print(" | ".join(f"{k}={v}" for k, v in row.items()))
    times = [r["seconds_to_target"] for r in rows if r["seconds_to_target"] is not None]
    summary = {"target_bpb": args.target, "runs": rows, "median_seconds": statistics.median(times) if len(times) == len(rows) else None}
    print(f"median seconds to val/bpb <= {args.target}: {summary['median_seconds']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
