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

from lm_lightning.generate import MAX_REQUEST_NEW_TOKENS, MAX_REQUEST_PROMPTS, Sampling, SamplingError, TextGenerator


class TextGenerationModel(PythonModel):
    def load_context(self, context) -> None:
        self.generator = TextGenerator.load(context.artifacts["pretrained"], "cuda" if torch.cuda.is_available() else "cpu")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """The continuation of each prompt (the first column of ``model_input``), under the ``Sampling``
        settings in ``params`` (the model's signature lists them, with defaults). A bad request raises
        ``INVALID_PARAMETER_VALUE``, which the scoring server answers with HTTP 400 and its one-line message:
        a prompt that is not a string, a setting out of range, more than ``MAX_REQUEST_PROMPTS`` prompts, or
        more than ``MAX_REQUEST_NEW_TOKENS`` tokens asked for in all."""
        prompts = list(model_input.iloc[:, 0])
        if len(prompts) > MAX_REQUEST_PROMPTS:
            raise MlflowException(
                f"the request holds {len(prompts)} prompts, more than the limit of {MAX_REQUEST_PROMPTS}; send them in "
                "several requests", error_code=INVALID_PARAMETER_VALUE)
        if bad := [i for i, prompt in enumerate(prompts) if not isinstance(prompt, str)]:
            message = f"input {bad[0]} is {prompts[bad[0]]!r}, not a string; send text (\"\" starts a new document)"
            raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
        try:
            sampling = Sampling(**(params or {}))
        except SamplingError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        if (asked := len(prompts) * sampling.max_new_tokens) > MAX_REQUEST_NEW_TOKENS:
            raise MlflowException(
                f"{len(prompts)} prompts x max_new_tokens={sampling.max_new_tokens} ask for {asked} tokens, more than the "
                f"limit of {MAX_REQUEST_NEW_TOKENS} per request; send fewer prompts or a smaller max_new_tokens",
                error_code=INVALID_PARAMETER_VALUE)
        try:
            return [self.generator.complete(prompt, sampling)[0] for prompt in prompts]
        except SamplingError as e:  # more than the device has memory for
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(TextGenerationModel())
