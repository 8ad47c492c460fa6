"""The real ``lm-lightning`` command in subprocesses, with a real MLflow store and real checkpoints."""

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import run_cli, run_folder, workdir

pytestmark = pytest.mark.usefixtures("mlflow_store")


def test_fast_dev_run_through_the_cli(corpus, tiny_config):
    result = run_cli("fit", "--config", str(tiny_config), "--data.path", str(corpus), "--trainer.fast_dev_run", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fast_dev_run" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_template):
    """One short real run (30 steps of a tiny model), shared by the assertions below."""
    root = run_folder(tmp_path_factory, mlflow_template, "run")
    with workdir(root) as uri:
        result = run_cli("fit", "--config", "tiny.yaml", "--data.path", "corpus.txt", "--trainer.logger.init_args.experiment_name", "tests")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([experiment.experiment_id])
    return root, result, client, run


def test_short_run_is_recorded_in_mlflow(trained):
    root, result, client, run = trained
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.n_layer"] == "2" and params["data.batch_size"] == "8" and params["trainer.max_steps"] == "30"
    for key in ("val/loss", "val/ppl", "val/bpb", "train/loss", "train/tokens_per_s", "lr"):
        assert key in run.data.metrics, key
    tags = run.data.tags
    assert int(tags["n_params"]) > 0 and len(tags["corpus_sha256"]) == 64
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "tokenizer", "samples.json"} <= artifacts
    assert not {"best", "last"} & artifacts  # checkpoints are stored once, in the run folder the tags name
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(root))
    assert "n_layer: 2" in open(config).read()
    assert f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in result.stdout
    assert f"best val/bpb {run.data.metrics['best/val_bpb']:.4f}" in result.stdout


def test_training_loss_falls(trained):
    _, _, client, run = trained
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) >= 5
    assert losses[-1] < losses[0] - 0.5, losses


def test_training_seconds_are_logged_at_each_validation_without_validation_time(trained):
    _, _, client, run = trained
    seconds = client.get_metric_history(run.info.run_id, "train/seconds")
    assert [m.step for m in seconds] == [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
    values = [m.value for m in seconds]
    assert len(values) == 3 and 0 < values[0] < values[1] < values[2]
    wall = (seconds[-1].timestamp - int(run.data.tags["train_start_ms"])) / 1000  # three validations included
    assert values[-1] < wall


def test_bpb_is_loss_in_bits_per_byte(trained):
    _, _, client, run = trained
    loss, ppl, bpb = (run.data.metrics[k] for k in ("val/loss", "val/ppl", "val/bpb"))
    assert ppl == pytest.approx(math.exp(loss), rel=1e-4)
    bytes_per_token = loss / math.log(2) / bpb  # a tiny 320-token BPE: a little over one byte per token
    assert 1.0 < bytes_per_token < 4.0


def test_best_checkpoint_reloads_and_reproduces_its_val_loss(trained):
    root, result, client, run = trained
    best = run.data.tags["best_checkpoint"]
    ckpt = torch.load(best, map_location="cpu", weights_only=True)  # plain containers only
    best_score = ckpt["callbacks"][next(k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint"))]["best_model_score"]
    validated = run_cli(
        "validate", "--config", str(root / "tiny.yaml"), "--data.path", str(root / "corpus.txt"),
        "--data.cache_dir", str(root / "cache"), "--ckpt_path", best,
        "--trainer.logger.init_args.tracking_uri", f"sqlite:///{root / 'mlflow.db'}",
        "--trainer.logger.init_args.experiment_name", "tests-validate",
    )
    assert validated.returncode == 0, validated.stderr[-3000:]
    experiment = client.get_experiment_by_name("tests-validate")
    (vrun,) = client.search_runs([experiment.experiment_id])
    assert vrun.data.metrics["val/loss"] == pytest.approx(float(best_score), abs=1e-5)


def test_print_config_resolves_omegaconf_interpolation(tmp_path, tiny_config):
    extra = tmp_path / "interp.yaml"
    extra.write_text("model:\n  n_embd: 48\n  n_head: 3\ndata:\n  batch_size: ${model.n_head}\n")
    result = run_cli("fit", "--config", str(tiny_config), "--config", str(extra), "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "n_embd: 48" in result.stdout and "batch_size: 3" in result.stdout
    assert "block_size: 32" in result.stdout  # the first file still applies: configs compose


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trainer.max_steps", "abc"], 'error: Parser key "trainer.max_steps": Expected a <class \'int\'>. Got value: abc'),
        (["--data.path", "does/not/exist.txt"], "error: data.path 'does/not/exist.txt' does not exist"),
    ],
)
def test_bad_input_gets_one_line_error_from_the_console_script(tiny_config, args, message):
    # The rest of the bad inputs run in-process in test_bad_input.py; this is the real exit code and stderr.
    result = run_cli("fit", "--config", str(tiny_config), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message) and "usage:" not in result.stderr
