"""A checkpoint logged to an MLflow run as a servable MLflow 3 logged model: a pyfunc (code in ``serving.py``) that
continues prompts, linked to the run, its step and metrics, and optionally registered."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import mlflow
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from lm_lightning.pretrained import load_source
from lm_lightning.export import export_pretrained
from lm_lightning.generate import Sampling

PACKAGE = Path(__file__).parents[1]  # lm_lightning, which travels with the model as its code
SERVING = Path(__file__).with_name("serving.py")
_MLFLOW_TYPES = {"int": "long", "float": "double", "bool": "boolean"}


def _param_spec(f: dataclasses.Field) -> ParamSpec:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if f.name == "stop":
        return ParamSpec(f.name, "string", default, shape=(-1,))
    return ParamSpec(f.name, _MLFLOW_TYPES[str(f.type).split(" ")[0]], default)


# Prompts in, continuations out; the params are the Sampling settings, with their defaults.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string")]),
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema([_param_spec(f) for f in dataclasses.fields(Sampling)]),
)


def pip_requirements() -> list[str]:
    """What the served model imports (besides lm_lightning, which travels with it), pinned to this environment."""
    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "tokenizers", "safetensors", "lightning", "pandas")]


MODEL_NAME = "model"
"""The logged model's name: ``runs:/<run_id>/model`` loads it."""
BEST_ALIAS = "best"
"""The registered model's alias for its version with the lowest ``best/val_bpb``."""


def log_text_model(
    logger: MLFlowLogger, checkpoint: str | Path, step: int, registered_model_name: str | None = None
) -> ModelInfo:
    """Log ``checkpoint`` as the MLflow 3 logged model ``model`` of the logger's run, at ``step`` (the best
    validation's): the run's metrics at that step are linked to it, and ``runs:/<run_id>/model`` loads it. With
    ``registered_model_name`` it is also a new version of that registered model (see ``register_best``).

    The model is saved as code (``serving.py``, plus this package), with the exported transformers
    folder as its artifact, so loading it unpickles nothing; the requirements are given, which
    skips MLflow's slow requirement inference.
    """
    client, run_id = logger.experiment, logger.run_id
    # Created here, in the run's experiment: Model.log would create it in the fluent API's current experiment.
    params = client.get_run(run_id).data.params
    model_id = client.create_logged_model(logger.experiment_id, name=MODEL_NAME, source_run_id=run_id, params=params).model_id
    previous = mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = export_pretrained(*load_source(checkpoint)[:2], Path(tmp) / "pretrained")
        # Quiet: no "input example" warning (the signature says what to send), no progress bar
        # for copying the artifact (it says "Downloading").
        with warnings.catch_warnings(), mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            warnings.simplefilter("ignore")
            # Model.log, as mlflow.pyfunc.log_model calls it, to the logged model made above; it reads the tracking
            # URI from MLflow's global setting. Not given the run: it would link every metric logged at that step,
            # the system metrics (whose steps count samples) too; link_to_run links the model's own.
            mlflow.set_tracking_uri(logger.tracking_uri)
            try:
                info = Model.log(
                    artifact_path=None,  # deprecated for name, yet positional in Model.log
                    name=MODEL_NAME,
                    flavor=mlflow.pyfunc,
                    model_id=model_id,
                    step=step,
                    python_model=str(SERVING),
                    artifacts={"pretrained": str(pretrained)},
                    code_paths=[str(PACKAGE)],
                    signature=SIGNATURE,
                    pip_requirements=pip_requirements(),
                    registered_model_name=registered_model_name,
                )
            finally:
                mlflow.set_tracking_uri(previous)
    link_to_run(client, model_id, run_id, step)
    if registered_model_name:
        register_best(client, registered_model_name, str(info.registered_model_version), run_id)
    return info


def link_to_run(client, model_id: str, run_id: str, step: int) -> None:
    """Make the logged model an output of the run at ``step``, and link to it the run's metrics logged at that step
    (``val/bpb``, ``best/val_bpb``, ``train/loss``...; not ``system/*``, whose steps count samples, not training steps)."""
    from mlflow.entities import LoggedModelOutput, Metric

    client.log_outputs(run_id, [LoggedModelOutput(model_id, step=step)])
    metrics = [
        Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id)
        for key in client.get_run(run_id).data.metrics
        if not key.startswith("system/")
        for m in client.get_metric_history(run_id, key)
        if m.step == step
    ]
    client.log_batch(run_id, metrics=metrics)


def register_best(client, name: str, version: str, run_id: str) -> None:
    """Point the alias ``best`` of registered model ``name`` at ``version`` when its run's ``best/val_bpb`` is lower
    than that of the version the alias points at (or nothing does yet); tag the version with its score."""
    from mlflow.exceptions import MlflowException

    score = client.get_run(run_id).data.metrics.get("best/val_bpb")
    if score is not None:
        client.set_model_version_tag(name, version, "best/val_bpb", f"{score:.4f}")
    try:
        current = client.get_model_version_by_alias(name, BEST_ALIAS)
    except MlflowException:  # no version has the alias yet
        current = None
    if current is not None and current.run_id:
        theirs = client.get_run(current.run_id).data.metrics.get("best/val_bpb")
        if theirs is not None and (score is None or theirs <= score):
            return
    client.set_registered_model_alias(name, BEST_ALIAS, version)
