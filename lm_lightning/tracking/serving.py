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
from mlflow.pyfunc import PythonModel

from lm_lightning.generate import TextGenerator


class TextGenerationModel(PythonModel):
    def load_context(self, context) -> None:
        self.generator = TextGenerator.load(context.artifacts["pretrained"], "cuda" if torch.cuda.is_available() else "cpu")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """The continuation of each prompt (the first column of ``model_input``), under the ``Sampling``
        settings in ``params`` (the model's signature lists them, with defaults)."""
        return [self.generator.generate(prompt, **(params or {}))[0] for prompt in model_input.iloc[:, 0]]


mlflow.models.set_model(TextGenerationModel())
