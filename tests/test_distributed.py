"""DDP with 2 CPU processes (gloo) through the real CLI."""

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli


def test_ddp_trains_logs_one_run_and_validates_like_one_process(corpus, tiny_config, tmp_path):
    common = ["--config", str(tiny_config), "--data.path", str(corpus), "--trainer.accelerator", "cpu"]
    # The modern family with Muon: Muon's step must see DDP's averaged gradients like AdamW's does.
    modern = ["--config", str(Path(__file__).parents[1] / "conf" / "model" / "modern.yaml")]
    ddp = run_cli(
        "fit", *common, *modern, "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.max_steps", "10", "--trainer.val_check_interval", "10",
        "--trainer.logger.init_args.experiment_name", "ddp",
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # not the URI an earlier in-process run set globally
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1, "one MLflow run whatever the world size"
    (run,) = runs
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in losses] == [9]  # one validation, logged once (rank 0)

    single = run_cli(
        "validate", *common, *modern, "--trainer.devices", "1", "--ckpt_path", run.data.tags["best_checkpoint"],
        "--trainer.logger.init_args.experiment_name", "single",
    )
    assert single.returncode == 0, single.stderr[-3000:]
    (check,) = client.search_runs([client.get_experiment_by_name("single").experiment_id])
    for key in ("val/loss", "val/bpb"):
        print(f"{key}: 2-process DDP {run.data.metrics[key]:.7f}, 1 process {check.data.metrics[key]:.7f}")
        assert check.data.metrics[key] == pytest.approx(run.data.metrics[key], abs=1e-5), key
