"""The MLflow logger every run uses: defaults that work on MLflow 3, resumable runs, and honest run status."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

from lm_lightning.errors import UserError
from lm_lightning.tracking.journal import Journal, JournaledClient, bound_http_retries, store_errors, unreachable
from lm_lightning.tracking.store import resolve_tracking_uri, store_init_lock


def mlflow_logger(trainer: L.Trainer) -> MLFlowLogger | None:
    """The trainer's MLflow logger, if it has one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


def start_system_metrics(run_id: str, tracking_uri: str, resumed: bool):
    """MLflow's system metrics monitor on the run (``system/cpu_utilization_percentage``, ``system/gpu_0_...``),
    which ``mlflow.start_run(log_system_metrics=True)`` would start: the logger drives an ``MlflowClient``, not a
    fluent run. It samples in a thread and writes with its own client; a resumed run continues its steps."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not three INFO lines on every fit
    monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop the monitor, after one last sample: a run shorter than the sampling interval has its system metrics too.
    A store that cannot be reached then costs these samples only."""
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:
        if not unreachable(e):
            raise


class MLflowLogger(MLFlowLogger):
    def __init__(
        self,
        experiment_name: str = "lm_lightning",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, str] | None = None,
        log_model: bool = True,
        run_id: str | None = None,
        registered_model_name: str | None = None,
        log_system_metrics: bool = True,
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
            log_model: Log the best checkpoint as a servable MLflow logged model (``model``, at the best validation's
                step, with that step's metrics) when training ends. The checkpoints themselves stay in the run's
                folder, named by the run's ``best_checkpoint`` tag.
            run_id: Continue this existing run instead of starting a new one. ``--ckpt_path`` sets it to the
                checkpoint's run.
            registered_model_name: Also register the logged model as a new version of this registered model (created
                if need be) in MLflow's model registry; its alias ``best`` points at the version with the lowest
                ``best/val_bpb``.
            log_system_metrics: Record CPU, memory, disk and network use (and GPU use, with ``nvidia-ml-py``
                installed) as ``system/*`` metrics, every 10 s (``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``),
                with MLflow's system metrics monitor.
        """
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_name = experiment_name
        self.resumed = run_id is not None
        self.journal_dir: Path | None = None  # set by LastCheckpoint: the run's folder, next to its checkpoints
        self._journaled: JournaledClient | None = None
        self._status_before = "FINISHED"  # of a resumed run, when it is opened
        self.registered_model_name = registered_model_name
        self.log_system_metrics = log_system_metrics
        self._system_metrics = None  # MLflow's SystemMetricsMonitor, from the run's start to its end
        bound_http_retries()
        with store_init_lock(self.tracking_uri):
            super().__init__(
                experiment_name=experiment_name,
                run_name=run_name,
                tracking_uri=self.tracking_uri,
                tags=tags,
                log_model=log_model,
                run_id=run_id,
            )

    @property
    @rank_zero_experiment
    def experiment(self):
        """The ``MlflowClient``, its writes to the run journaled while the tracking store cannot be reached (see
        ``tracking/journal.py``). Its first use creates the experiment and the run, or sets a resumed run back to
        RUNNING, under ``store_init_lock``, as two runs started at once would both create the experiment; a store
        that cannot be reached then is one line naming it."""
        if self._journaled is not None:
            return self._journaled
        from mlflow.exceptions import MlflowException

        with store_init_lock(self.tracking_uri), store_errors(self.tracking_uri):
            try:
                client = super().experiment
            except MlflowException as e:
                if self.resumed and e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    message = f"MLflow run {self._run_id} does not exist in {self.tracking_uri}; unset its run_id"
                    raise UserError(message) from None
                raise
            if self.resumed:
                self._status_before = client.get_run(self._run_id).info.status
                client.update_run(self._run_id, status="RUNNING")
        self._journaled = JournaledClient(client, Journal(self._journal_path, self.tracking_uri))
        if self.log_system_metrics:
            self._system_metrics = start_system_metrics(self._run_id, self.tracking_uri, self.resumed)
        return self._journaled

    def _journal_path(self) -> Path:
        if self.journal_dir is not None:
            return self.journal_dir / "mlflow-journal.jsonl"
        return Path(f"mlflow-journal-{self.run_id}.jsonl")

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Logs params, flat ``{dotted key: value}`` (``MLflowConfig`` flattens the config).

        MLflow params are immutable, so a resumed run logs only the keys it does not have yet, and warns
        about values that differ from those first logged (MLflow keeps the first).
        """
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        params = {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in params.items()}
        logged = self.experiment.get_run(self.run_id).data.params if self.resumed else {}
        changed = [f"{key}: {logged[key]} -> {value}" for key, value in params.items() if logged.get(key, value) != value]
        if changed:
            rank_zero_warn(
                f"resuming MLflow run {self.run_id} with a changed config ({'; '.join(changed)}); its params keep "
                "the first values, this run's config is logged as an artifact"
            )
        new = [Param(key, value) for key, value in params.items() if key not in logged]
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.experiment.log_batch(run_id=self.run_id, params=new[start : start + 100])

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        # Checkpoints are stored once, in the run's folder (where --ckpt_path last finds them); the run refers to
        # them by its best_checkpoint and checkpoint_dir tags. Uploading them too doubled the disk they take.
        pass

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Ends the run: FINISHED; KILLED when stopped by SIGTERM or Ctrl-C (the run is meant to be resumed);
        FAILED on any other error, with the error as the ``error`` tag and its traceback as ``error.txt``; a
        resumed run refused for a user's error (another corpus, say) keeps the status it had. Records kept while
        the tracking store was unreachable are sent now, or their journal named.

        Lightning reports every exception, SIGTERM and Ctrl-C included, as ``finalize("failed")`` from inside
        its exception handler (lightning/pytorch/trainer/call.py, ``_interrupt``): the exception being handled
        tells them apart. (Lightning's own ``finalize`` reads the run first, which fails while the store is away.)
        """
        if not self._initialized:
            return
        error = sys.exc_info()[1] if status == "failed" else None
        if self._system_metrics is not None:  # its last samples are written before the run ends
            stop_system_metrics(self._system_metrics)
            self._system_metrics = None
        if isinstance(error, (KeyboardInterrupt, SIGTERMException)):
            self.experiment.set_terminated(self.run_id, "KILLED")
        elif isinstance(error, UserError) and self.resumed:  # a refused resume: the run stays as it was
            self.experiment.update_run(self.run_id, status=self._status_before)
        else:
            if error is not None:
                message = " ".join(str(error).split()) or type(error).__name__
                self.experiment.set_tag(self.run_id, "error", f"{type(error).__name__}: {message}"[:5000])
                self.experiment.log_text(self.run_id, "".join(traceback.format_exception(error)), "error.txt")
            self.experiment.set_terminated(self.run_id, "FAILED" if status == "failed" else "FINISHED")
        journal = self.experiment.journal
        if journal.pending and not self.experiment.flush():  # the store was away a moment ago: once more, now
            rank_zero_warn(
                f"the MLflow tracking store {self.tracking_uri} is unreachable: {journal.pending} records of run "
                f"{self.run_id} are kept in {journal.path.resolve()}; once it is up, send them with: "
                f"python -m lm_lightning.tracking.journal {journal.path.resolve()}"
            )
