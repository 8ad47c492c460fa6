"""What every run records in MLflow besides Lightning's metrics: its config (as params and ``config.yaml``),
tags saying what it ran on, the tokenizer, the best model, and text samples."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from lm_lightning.tracking.logger import mlflow_logger

# The keys a person compares runs by; the whole resolved config is the run's config.yaml artifact.
PARAM_KEYS = (
    "seed_everything",
    "model.",
    "data.",
    "trainer.max_steps",
    "trainer.precision",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
    "trainer.val_check_interval",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
)
# How this invocation ran, not what the run is: never params.
NOT_PARAMS = ("data.cache_dir", "data.num_workers")


def run_params(config: Namespace) -> dict[str, str]:
    """The params of a run: its config's comparable keys, dotted (``model.n_layer``), values as text."""
    params = {}
    for key, value in config.items():  # jsonargparse flattens nested config to dotted leaves
        if key.startswith(PARAM_KEYS) and key not in NOT_PARAMS:
            params[key] = str(value.as_dict() if isinstance(value, Namespace) else value)
    return params


def git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


class MLflowConfig(SaveConfigCallback):
    """Logs the resolved config to the MLflow run: the comparable keys as dotted params, all of it as ``config.yaml``.

    A resumed run keeps its ``config.yaml`` and gets the config it was resumed with as
    ``config-resume-<n>.yaml``; its params are only added to (see ``MLflowLogger.log_hyperparams``).

    Replaces LightningCLI's ``SaveConfigCallback``, which asserts a ``log_dir`` that an MLflow
    logger with a database or server tracking URI does not have (lightning issue 19441).
    """

    def save_config(self, trainer, pl_module, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        name = "config.yaml"
        if getattr(logger, "resumed", False):
            logged = [a.path for a in logger.experiment.list_artifacts(logger.run_id)]
            name = f"config-resume-{sum(p.startswith('config-resume-') for p in logged) + 1}.yaml"
        logger.experiment.log_text(logger.run_id, self.parser.dump(self.config, skip_none=False), name)
        logger.log_hyperparams(run_params(self.config))


class MLflowRunInfo(L.Callback):
    """Tags the MLflow run (git commit, corpus hash, parameter count), logs the tokenizer, logs the best model
    when training ends, and says where things are."""

    def _log_run_info(self, trainer, pl_module) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        datamodule = trainer.datamodule
        tags = {"n_params": str(pl_module.model.num_params()), "vocab_size": str(pl_module.model.config.vocab_size)}
        if pl_module.source is not None:  # fine-tuning from model.init_from
            tags.update(pl_module.source.tags())
        if commit := git_commit(Path.cwd()):
            tags["git_commit"] = commit
        if datamodule is not None and datamodule.meta:
            tags["corpus_sha256"] = datamodule.meta["corpus_sha256"]
            tags["tokenizer"] = datamodule.meta["tokenizer"]
            tags["data.path"] = str(datamodule.path or "builtin:pydoc_data")
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, key, value)
        if pl_module.tokenizer_json:
            logger.experiment.log_text(logger.run_id, pl_module.tokenizer_json, "tokenizer/tokenizer.json")

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        self._log_run_info(trainer, pl_module)

    @rank_zero_only
    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._log_run_info(trainer, pl_module)

    @rank_zero_only
    def on_test_start(self, trainer, pl_module) -> None:
        self._log_run_info(trainer, pl_module)

    @rank_zero_only
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # When the first step starts (after data preparation and setup): time-to-quality is measured from here.
        logger = mlflow_logger(trainer)
        if logger is not None and trainer.global_step == 0 and batch_idx == 0:
            logger.experiment.set_tag(logger.run_id, "train_start_ms", str(int(time.time() * 1000)))

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        from lm_lightning.tracking.pyfunc import log_text_model  # imports mlflow's model code: only when needed

        logger = mlflow_logger(trainer)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if logger is not None and best:
            logger.experiment.set_tag(logger.run_id, "best_checkpoint", str(Path(best).resolve()))
        # The logger's log_model switch covers the servable model as well as the checkpoint files.
        if logger is not None and best and getattr(logger, "_log_model", False):
            log_text_model(logger, best)
        if best:
            print(f"best checkpoint: {Path(best).resolve()}")
        if logger is not None:
            print(f"MLflow run: {logger.run_id} (experiment {logger.experiment_name!r}, tracking {logger.tracking_uri}; browse with: mlflow ui)")


def log_samples(logger: MLFlowLogger, step: int, prompts: list[str], texts: list[str]) -> None:
    """Log the continuations ``texts`` of ``prompts`` at ``step`` as ``samples/step_000200.txt``."""
    body = "".join(f"### prompt {prompt!r}\n{prompt}{text}\n\n" for prompt, text in zip(prompts, texts))
    logger.experiment.log_text(logger.run_id, body, f"samples/step_{step:06d}.txt")
