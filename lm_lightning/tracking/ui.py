"""Where the MLflow UI (3.17) opens our experiments, and with which columns.

What the UI reads, from its bundle (``mlflow/server/js/build``): the experiment page's kind (GenAI: overview and
traces; machine learning: the runs table) comes from a ``workflowType`` the browser holds, the ``workflowType`` URL
parameter first, else its local storage (``mlflow.workflowType``), else ``genai``. The ``mlflow.experimentKind``
experiment tag is no longer read for that in 3.17 (its feature flag is on), and the server has no setting for it. So
the addresses we print carry ``workflowType=machine_learning``; a bare ``http://127.0.0.1:5000`` still opens on GenAI
until the user clicks "Model training" once (the browser remembers it).

The runs table's columns are the user's choice, kept in the browser, or a saved view: an experiment tag
``mlflow.sharedViewState.<id>`` that any browser opens with ``viewStateShareKey=<id>``. Every experiment we write to
gets the view ``scores`` (scores, system metrics, shape, model, dataset) unless it has one by that id.
"""

from __future__ import annotations

import json
import time

from lm_lightning.tracking.store import mark_model_training

VIEW_ID = "scores"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
ML_WORKFLOW = "workflowType=machine_learning"


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # the UI's column ids: attributes.`Models`, metrics.`best/val_bpb`


VIEW_COLUMNS = [
    _column("metrics", "best/val_bpb"),
    _column("metrics", "val/bpb"),
    _column("metrics", "eval/bpb"),
    _column("metrics", "train/tokens_per_s"),
    _column("metrics", "system/cpu_utilization_percentage"),
    _column("metrics", "system/system_memory_usage_megabytes"),
    _column("params", "model.n_layer"),
    _column("params", "model.n_embd"),
    _column("params", "model.learning_rate"),
    _column("attributes", "Models"),
    _column("attributes", "Dataset"),
]


def scores_view() -> str:
    """The saved view's tag value, as the UI's "Save view" writes it: a name, times, and the table's state (the
    search facets and UI state the experiment page keeps, here only what differs from its defaults)."""
    state = {"selectedColumns": VIEW_COLUMNS, "runListHidden": False, "viewMaximized": False}
    now = int(time.time() * 1000)
    return json.dumps({"name": "lm_lightning scores", "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def prepare_experiment(client, experiment_id: str) -> None:
    """Tag a new experiment as model training and give it the ``scores`` view; an experiment that has them keeps
    its own (a user may have edited the view)."""
    mark_model_training(client, experiment_id)
    if VIEW_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, VIEW_TAG, scores_view())


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the tracking server itself, or where a plain ``mlflow ui`` serves a local store."""
    return tracking_uri.rstrip("/") if str(tracking_uri).startswith("http") else "http://127.0.0.1:5000"


def runs_table_address(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs table, with the ``scores`` view, in the model-training layout."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?{ML_WORKFLOW}&viewStateShareKey={VIEW_ID}"


def run_address(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page, in the model-training layout."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}?{ML_WORKFLOW}"
