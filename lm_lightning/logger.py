"""The MLflow logger every run uses, with defaults that work on MLflow 3."""

from __future__ import annotations

import os

from lightning.pytorch.loggers import MLFlowLogger

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class MLflowLogger(MLFlowLogger):
    def __init__(
        self,
        experiment_name: str = "lm_lightning",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, str] | None = None,
        log_model: bool = True,
        run_id: str | None = None,
    ):
        """Records the run in MLflow: params, metrics, tags and artifacts.

        Args:
            experiment_name: MLflow experiment the run belongs to (runs of one experiment compare side by side).
            run_name: Name of the run in the MLflow UI. Unset: MLflow picks one.
            tracking_uri: Where runs are recorded. Unset: ``$MLFLOW_TRACKING_URI``, else MLflow's default
                ``sqlite:///mlflow.db`` in the working directory (artifacts under ``./mlruns``), which is
                what a plain ``mlflow ui`` there shows. Lightning's own default, a ``./mlruns`` file store,
                raises on MLflow 3.
            tags: Extra tags for the run.
            log_model: Log the best and last checkpoints as artifacts when training ends.
            run_id: Continue this existing run instead of starting a new one.
        """
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        self.experiment_name = experiment_name
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=self.tracking_uri,
            tags=tags,
            log_model=log_model,
            run_id=run_id,
        )
