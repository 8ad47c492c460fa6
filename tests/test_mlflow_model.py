"""What a run records for generation: sample texts at each validation, and its best model as a servable MLflow model."""

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from lm_lightning.generate import TextGenerator

pytestmark = pytest.mark.usefixtures("one_thread")


def test_samples_are_logged_at_each_validation(tiny_run, tmp_path):
    client, run_id = MlflowClient(tiny_run["tracking_uri"]), tiny_run["run_id"]
    files = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert files == ["samples/step_000050.txt", "samples/step_000100.txt", "samples/step_000150.txt"]
    text = open(client.download_artifacts(run_id, files[-1], str(tmp_path)), encoding="utf-8").read()
    assert text.startswith("### prompt 'The '\nThe ") and "\n### prompt '床前'\n床前" in text


def test_samples_leave_the_training_random_state_untouched(tiny_run):
    assert len(tiny_run["rng_around_samples"]) == 3
    for before, after in tiny_run["rng_around_samples"]:
        assert torch.equal(before, after)


def test_best_model_is_an_mlflow_model_that_generates_text(tiny_run):
    mlflow.set_tracking_uri(tiny_run["tracking_uri"])
    uri = f"runs:/{tiny_run['run_id']}/model"
    client = MlflowClient()
    (output,) = client.get_run(tiny_run["run_id"]).outputs.model_outputs  # an MLflow 3 logged model, the run's output
    files = {a.path for a in client.list_logged_model_artifacts(output.model_id)}
    assert {"MLmodel", "serving.py", "artifacts", "code", "requirements.txt"} <= files
    assert not any(f.endswith(".pkl") for f in files)  # models from code: nothing to unpickle
    model = mlflow.pyfunc.load_model(uri)
    texts = model.predict(["The ", "床前"], params={"max_new_tokens": 12, "seed": 3})
    reference = TextGenerator.load(tiny_run["checkpoint"])
    assert texts == [reference.generate(p, max_new_tokens=12, seed=3)[0] for p in ("The ", "床前")]
    stop = texts[0][4:6]
    assert model.predict(["The "], params={"max_new_tokens": 12, "seed": 3, "stop": [stop]}) == [texts[0][: texts[0].index(stop)]]
