"""Inside a trial's ``fit``: report the metric to the Optuna study at each validation, and stop when pruned.

Not optuna-integration's ``PyTorchLightningPruningCallback``: it works with ``lightning`` 2.6 but reports at
``step=epoch``, and our runs validate many times within one epoch (step-based training), so every report after
the first would land on the same step and be ignored; it also raises ``TrialPruned`` out of ``fit``, which ends
the MLflow run as FAILED. Here the trial runs in its own process, so it reconnects to the study by storage URL,
study name and trial number, reports at the global step, and on pruning stops training as early stopping does.
"""

from __future__ import annotations

import math
import time

import lightning as L
import optuna

from lm_lightning.tracking.logger import mlflow_logger

PRUNED_AT = "pruned_at_step"
"""Trial user attribute: the step at which the trial was pruned."""
SECONDS_TO_TARGET = "seconds_to_target"
"""Trial user attribute: seconds from the first training step to the validation that reached the target."""
RUN_ID = "mlflow_run_id"
"""Trial user attribute: the trial's MLflow run."""


def make_pruner(pruner: str, startup_trials: int, warmup_steps: int) -> optuna.pruners.BasePruner:
    """The study's pruner; built the same way by the sweep and inside each trial."""
    if pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)


class ReportToStudy(L.Callback):
    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_number: int,
        metric: str = "val/bpb",
        pruner: str = "median",
        startup_trials: int = 5,
        warmup_steps: int = 0,
        target: float | None = None,
    ):
        """Reports ``metric`` to trial ``trial_number`` of an Optuna study at each validation; stops training when
        the study's pruner prunes the trial, or when ``metric`` reaches ``target``. Added by ``lm-lightning sweep``.

        Args:
            storage: Optuna storage URL of the study.
            study_name: The study.
            trial_number: This trial's number in the study.
            metric: The validation metric reported.
            pruner: ``median`` or ``none`` (as ``sweep.pruner``).
            startup_trials: As ``sweep.startup_trials``.
            warmup_steps: As ``sweep.warmup_steps``.
            target: As ``sweep.target``: record the seconds of training until ``metric`` reaches it, and stop there.
        """
        self.storage, self.study_name, self.trial_number, self.metric = storage, study_name, trial_number, metric
        self.pruner, self.startup_trials, self.warmup_steps, self.target = pruner, startup_trials, warmup_steps, target
        self._study: optuna.Study | None = None
        self._trial_id = -1
        self._train_start: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        pruner = make_pruner(self.pruner, self.startup_trials, self.warmup_steps)
        self._study = optuna.load_study(study_name=self.study_name, storage=self.storage, pruner=pruner)
        self._trial_id = self._study._storage.get_trial_id_from_study_id_trial_number(self._study._study_id, self.trial_number)
        if (logger := mlflow_logger(trainer)) is not None:
            self._study._storage.set_trial_user_attr(self._trial_id, RUN_ID, logger.run_id)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._train_start is None:
            self._train_start = time.time()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        stop = self._report(trainer) if trainer.is_global_zero else False
        if trainer.strategy.broadcast(stop, src=0):
            trainer.should_stop = True

    def _report(self, trainer: L.Trainer) -> bool:
        """Reports this validation's value; whether the trial is done."""
        value = trainer.callback_metrics.get(self.metric)
        if value is None or self._study is None:
            return False
        value, step, storage = float(value), trainer.global_step, self._study._storage
        storage.set_trial_intermediate_value(self._trial_id, step, value)
        if self.target is not None and self._reached(value):
            storage.set_trial_user_attr(self._trial_id, SECONDS_TO_TARGET, time.time() - (self._train_start or time.time()))
            return True
        if self._study.pruner.prune(self._study, storage.get_trial(self._trial_id)):
            storage.set_trial_user_attr(self._trial_id, PRUNED_AT, step)
            if (logger := mlflow_logger(trainer)) is not None:
                logger.experiment.set_tag(logger.run_id, "pruned", "true")
            print(f"trial {self.trial_number} pruned at step {step}: {self.metric} {value:.4f}", flush=True)
            return True
        return False

    def _reached(self, value: float) -> bool:
        maximize = self._study.direction == optuna.study.StudyDirection.MAXIMIZE
        return not math.isnan(value) and (value >= self.target if maximize else value <= self.target)
