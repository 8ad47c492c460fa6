"""What a person sees in MLflow: system metrics, the logged and registered model, the corpus as dataset inputs, evaluate
runs under the run they score, and the runs view the UI opens. Real fits, in process, in a temporary sqlite store."""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest

from conftest import english_text, run_main, workdir


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Two 12-step fits registering the model ``tiny``, the second one far worse (learning rate 1e-7), then an
    evaluate of the first one's checkpoint in its experiment and one in another experiment."""
    from conftest import TINY_CONFIG
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("tracking_ui")
    (root / "tiny.yaml").write_text(TINY_CONFIG, encoding="utf-8")
    (root / "corpus.txt").write_text(english_text(), encoding="utf-8")
    fit = ["fit", "--config", "tiny.yaml", "--data.path", "corpus.txt", "--trainer.max_steps", "12",
           "--trainer.val_check_interval", "6", "--samples.prompts", "[]",
           "--trainer.logger.init_args.registered_model_name", "tiny"]
    # One system metrics sample a second (MLflow's default is every 10 s) and the last one at the end.
    with workdir(root) as uri, mock.patch.dict(os.environ, {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}):
        assert run_main(*fit) == 0
        assert run_main(*fit, "--model.learning_rate", "1e-7") == 0
        client = MlflowClient(uri)
        experiment_id = client.get_experiment_by_name("lm_lightning").experiment_id
        first, second = client.search_runs([experiment_id], "tags.command = 'fit'", order_by=["start_time"])
        best = first.data.tags["best_checkpoint"]
        assert run_main("evaluate", "--ckpt_path", best, "--data.path", "corpus.txt") == 0
        assert run_main("evaluate", "--ckpt_path", best, "--data.path", "corpus.txt", "--experiment_name", "held-out") == 0
    return client, experiment_id, client.get_run(first.info.run_id), client.get_run(second.info.run_id)


def test_a_fit_records_system_metrics(registered):
    _, _, run, _ = registered
    system = {key for key in run.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system


def test_the_best_model_is_a_logged_model_linked_to_its_run_step_and_scores(registered):
    client, experiment_id, run, _ = registered
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "model" and model.source_run_id == run.info.run_id and model.experiment_id == experiment_id
    best_step = max(client.get_metric_history(run.info.run_id, "best/val_bpb"), key=lambda m: m.timestamp).step
    assert output.step == best_step
    linked = {m.key: m for m in model.metrics}
    assert linked["best/val_bpb"].value == pytest.approx(run.data.metrics["best/val_bpb"])
    assert linked["val/bpb"].step == best_step and linked["val/bpb"].run_id == run.info.run_id
    assert not any(key.startswith("system/") for key in linked)  # their steps count samples, not training steps
    assert model.params["model.n_layer"] == "2"


def test_the_registered_models_best_alias_stays_on_the_better_version(registered):
    client, _, first, second = registered
    versions = {v.run_id: v for v in client.search_model_versions("name = 'tiny'")}
    assert set(versions) == {first.info.run_id, second.info.run_id}
    assert second.data.metrics["best/val_bpb"] > first.data.metrics["best/val_bpb"]
    assert client.get_model_version_by_alias("tiny", "best").run_id == first.info.run_id
    assert versions[second.info.run_id].tags["best/val_bpb"] == f"{second.data.metrics['best/val_bpb']:.4f}"


def test_the_corpus_is_a_dataset_input_for_training_and_validation(registered):
    _, _, run, _ = registered
    inputs = {tag.value: i.dataset for i in run.inputs.dataset_inputs for tag in i.tags if tag.key == "mlflow.data.context"}
    assert set(inputs) == {"training", "validation"}
    train, val = inputs["training"], inputs["validation"]
    assert train.name == val.name == "corpus" and train.digest != val.digest
    assert json.loads(train.source)["uri"].endswith("corpus.txt") and train.source_type == "local"
    assert json.loads(train.profile)["tokens"] > json.loads(val.profile)["tokens"] > 0


def test_an_evaluate_run_is_nested_under_its_source_or_links_to_it(registered):
    client, experiment_id, run, _ = registered
    (nested,) = client.search_runs([experiment_id], "tags.command = 'evaluate'")
    assert nested.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert nested.info.run_name.startswith("evaluate-corpus-")
    (evaluation,) = client.get_run(nested.info.run_id).inputs.dataset_inputs
    assert [t.value for t in evaluation.tags] == ["evaluation"] and evaluation.dataset.name == "corpus"
    (elsewhere,) = client.search_runs([client.get_experiment_by_name("held-out").experiment_id])
    assert "mlflow.parentRunId" not in elsewhere.data.tags  # the UI nests only within an experiment
    assert elsewhere.data.tags["source_run_id"] == run.info.run_id
    assert f"#/experiments/{experiment_id}/runs/{run.info.run_id}" in elsewhere.data.tags["mlflow.note.content"]


def test_every_experiment_gets_the_scores_view_and_addresses_open_the_runs_table(registered):
    from lm_lightning.tracking.ui import VIEW_COLUMNS, VIEW_TAG, run_address, runs_table_address

    client, experiment_id, run, _ = registered
    for experiment in (experiment_id, client.get_experiment_by_name("held-out").experiment_id):
        view = json.loads(client.get_experiment(experiment).tags[VIEW_TAG])
        assert json.loads(view["state"])["selectedColumns"] == VIEW_COLUMNS
    assert "metrics.`best/val_bpb`" in VIEW_COLUMNS and "attributes.`Models`" in VIEW_COLUMNS
    assert runs_table_address("sqlite:///x.db", "3") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=scores"
    )
    assert run_address("http://mlflow:5000/", "3", "abc").endswith("/#/experiments/3/runs/abc?workflowType=machine_learning")


def test_trial_names_say_what_was_sampled():
    from lm_lightning.tracking.names import trial_name

    params = {"model.learning_rate": 0.0032, "data.batch_size": 16, "model.min_lr_ratio": 0.25, "model.compile": True}
    assert trial_name("speedrun", 3, params) == "speedrun-3-lr3.2e-3-batch16-min_lr0.25-compileTrue"
