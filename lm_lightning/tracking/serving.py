"""The MLflow model of a run: prompts in, continuations out (``mlflow models serve``, ``mlflow.pyfunc.load_model``).

MLflow stores this file as the model's code ("models from code") and runs it when the model is
loaded, so loading unpickles nothing; the weights and tokenizer are the artifact ``pretrained``, a
folder written by ``lm-lightning export``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from lm_lightning.generate import Sampling, SamplingError, TextGenerator


class TextGenerationModel(PythonModel):
    def load_context(self, context) -> None:
        self.generator = TextGenerator.load(context.artifacts["pretrained"], "cuda" if torch.cuda.is_available() else "cpu")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """The continuation of each prompt (the first column of ``model_input``), under the ``Sampling``
        settings in ``params`` (the model's signature lists them, with defaults). A bad request raises
        ``INVALID_PARAMETER_VALUE``, which the scoring server answers with HTTP 400 and its one-line message."""
        prompts = list(model_input.iloc[:, 0])
        if bad := [i for i, prompt in enumerate(prompts) if not isinstance(prompt, str)]:
            message = f"input {bad[0]} is {prompts[bad[0]]!r}, not a string; send text (\"\" starts a new document)"
            raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
        try:
            Sampling(**(params or {}))
        except SamplingError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        return [self.generator.generate(prompt, **(params or {}))[0] for prompt in prompts]


mlflow.models.set_model(TextGenerationModel())
