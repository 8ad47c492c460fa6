""""Train more": a finished run continued with a larger max_steps equals a run that was that long from the start;
a run shorter than val_check_interval still validates its last step."""

from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import metric_history, only_run, run_main

# lr_decay_steps is fixed: otherwise the cosine schedule spans max_steps, and a 20-step run decays over 20 steps.
RUN = [
    "fit", "--config", "tiny.yaml", "--data.path", "corpus.txt", "--model.lr_decay_steps", "40", "--model.dropout", "0",
    "--trainer.val_check_interval", "10", "--trainer.log_every_n_steps", "1", "--samples.prompts", "[]",
    "--trainer.logger.init_args.log_model", "false",
]


def history(client, experiment: str) -> dict[str, list[tuple[int, float]]]:
    run_id = only_run(client, experiment).info.run_id
    return {key: metric_history(client, run_id, key) for key in ("train/loss", "val/loss", "epoch")}


def test_train_more_equals_a_longer_run(corpus, tiny_config, mlflow_store, one_thread):
    Path("tiny.yaml").write_text(tiny_config.read_text())
    Path("corpus.txt").write_text(corpus.read_text())
    assert run_main(*RUN, "--trainer.max_steps", "40", "--trainer.logger.init_args.experiment_name", "straight") == 0
    more = [*RUN, "--trainer.logger.init_args.experiment_name", "more"]
    assert run_main(*more, "--trainer.max_steps", "20") == 0
    assert run_main(*more, "--trainer.max_steps", "40", "--ckpt_path", "last") == 0
    client = MlflowClient(mlflow_store)
    straight, continued = history(client, "straight"), history(client, "more")
    assert [step for step, _ in continued["train/loss"]] == list(range(40))  # no gap, nothing late, no repeat
    assert continued["train/loss"] == straight["train/loss"]  # exactly: 0 difference on CPU fp32
    assert continued["val/loss"] == straight["val/loss"]
    assert {value for _, value in continued["epoch"]} == {0.0}


def test_train_more_logs_training_loss_every_n_steps(corpus, tiny_config, mlflow_store, one_thread):
    common = ["fit", "--config", str(tiny_config), "--data.path", str(corpus), "--trainer.log_every_n_steps", "10",
              "--samples.prompts", "[]", "--trainer.logger.init_args.log_model", "false"]
    assert run_main(*common, "--trainer.max_steps", "20") == 0
    assert run_main(*common, "--trainer.max_steps", "40", "--ckpt_path", "last") == 0
    client = MlflowClient(mlflow_store)
    run = only_run(client, "lm_lightning")
    assert [step for step, _ in metric_history(client, run.info.run_id, "train/loss")] == [9, 19, 29, 39]


def test_a_run_shorter_than_val_check_interval_validates_its_last_step(corpus, tiny_config, mlflow_store, one_thread):
    args = ["--trainer.max_steps", "10", "--trainer.val_check_interval", "50", "--samples.prompts", "[]"]
    assert run_main("fit", "--config", str(tiny_config), "--data.path", str(corpus), *args) == 0
    client = MlflowClient(mlflow_store)
    run = only_run(client, "lm_lightning")
    assert [step for step, _ in metric_history(client, run.info.run_id, "val/loss")] == [9]
    assert list(Path.cwd().glob("runs/*/*/checkpoints/best.ckpt"))
    assert client.get_run(run.info.run_id).outputs.model_outputs  # the best model, logged
