"""A checkpoint logged to an MLflow run as a servable model: a pyfunc (code in ``serving.py``) that continues prompts."""

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
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from lm_lightning.checkpoint import load_gpt
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


def log_text_model(logger: MLFlowLogger, checkpoint: str | Path) -> None:
    """Log ``checkpoint`` to the logger's run as the MLflow model ``model`` (``runs:/<run_id>/model``).

    The model is saved as code (``serving.py``, plus this package), with the exported transformers
    folder as its artifact, so loading it unpickles nothing; the requirements are given, which
    skips MLflow's slow requirement inference.
    """
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = export_pretrained(*load_gpt(checkpoint), Path(tmp) / "pretrained")
        # Quiet: no "input example" warning (the signature says what to send), no progress bar
        # for copying the artifact (it says "Downloading").
        with warnings.catch_warnings(), mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            warnings.simplefilter("ignore")
            mlflow.pyfunc.save_model(
                Path(tmp) / "model",
                python_model=str(SERVING),
                artifacts={"pretrained": str(pretrained)},
                code_paths=[str(PACKAGE)],
                signature=SIGNATURE,
                pip_requirements=pip_requirements(),
            )
        logger.experiment.log_artifacts(logger.run_id, str(Path(tmp) / "model"), "model")
