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
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lm_lightning.tracking.datasets import BUILTIN, corpus_inputs
from lm_lightning.tracking.journal import unreachable
from lm_lightning.tracking.logger import mlflow_logger
from lm_lightning.tracking.ui import prepare_experiment, run_address

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

    def _log_run_info(self, trainer, pl_module, splits: tuple[str, ...]) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        datamodule = trainer.datamodule
        tags = {"n_params": str(pl_module.model.num_params()), "vocab_size": str(pl_module.model.config.vocab_size)}
        params = list(pl_module.model.parameters())
        tags["total_params"] = str(sum(p.numel() for p in params))
        tags["trainable_params"] = str(sum(p.numel() for p in params if p.requires_grad))  # the adapters of a LoRA run
        if pl_module.source is not None:  # fine-tuning from model.init_from
            tags.update(pl_module.source.tags())
        if commit := git_commit(Path.cwd()):
            tags["git_commit"] = commit
        if datamodule is not None and datamodule.meta:
            tags["corpus_sha256"] = datamodule.meta["corpus_sha256"]
            tags["tokenizer"] = datamodule.meta["tokenizer"]
            tags["data.path"] = str(datamodule.path or BUILTIN)
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, key, value)
        prepare_experiment(logger.experiment, logger.experiment_id)
        if datamodule is not None and datamodule.meta:
            log_corpus(logger, datamodule, splits)
        if pl_module.tokenizer_json:
            logger.experiment.log_text(logger.run_id, pl_module.tokenizer_json, "tokenizer/tokenizer.json")

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        config = pl_module.model.config
        print(f"model: {pl_module.model.num_params():,} parameters ({config.n_layer} layers x {config.n_embd})")
        self._log_run_info(trainer, pl_module, ("train", "val"))

    @rank_zero_only
    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._log_run_info(trainer, pl_module, ("val",))

    @rank_zero_only
    def on_test_start(self, trainer, pl_module) -> None:
        self._log_run_info(trainer, pl_module, ("test",))

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        # Checkpoints are stored once, in the run's folder; the run points to it.
        logger = mlflow_logger(trainer)
        if logger is not None and trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            logger.experiment.set_tag(logger.run_id, "checkpoint_dir", str(Path(trainer.checkpoint_callback.dirpath).resolve()))

    @rank_zero_only
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # When the first step starts (after data preparation and setup): time-to-quality is measured from here.
        logger = mlflow_logger(trainer)
        if logger is not None and trainer.global_step == 0 and batch_idx == 0:
            logger.experiment.set_tag(logger.run_id, "train_start_ms", str(int(time.time() * 1000)))

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        from lm_lightning.export import ExportError
        from lm_lightning.tracking.pyfunc import log_text_model  # imports mlflow's model code: only when needed

        logger = mlflow_logger(trainer)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if logger is not None and best:
            logger.experiment.set_tag(logger.run_id, "best_checkpoint", str(Path(best).resolve()))
        # The logger's log_model switch: the servable model (the checkpoints stay in the run folder).
        if logger is not None and best and getattr(logger, "_log_model", False):
            try:
                log_text_model(logger, best, best_logged_step(logger), getattr(logger, "registered_model_name", None))
            except ExportError as e:  # a model transformers has no class for (relu2, soft-capping): the run stands
                rank_zero_warn(f"the best model is not logged as an MLflow model: {e}; its checkpoint is {best}")
            except Exception as e:
                if not unreachable(e):
                    raise
                rank_zero_warn(f"the MLflow tracking store is unreachable: the best model is not logged; its checkpoint is {best}")
        print(fit_summary(trainer, logger, best))


def ui_address(logger: MLFlowLogger) -> str:
    """The run's page in the MLflow UI (model-training layout): on the tracking server, or where a plain ``mlflow ui``
    serves a local store."""
    return run_address(str(logger._tracking_uri), logger.experiment_id, logger.run_id)


def best_logged_step(logger: MLFlowLogger) -> int:
    """The step the best validation's metrics are logged at (that of the last ``best/val_bpb``): the logged model's
    step, whose metrics MLflow links to it."""
    history = logger.experiment.get_metric_history(logger.run_id, "best/val_bpb")
    return max(history, key=lambda m: (m.timestamp, m.step)).step if history else 0


def log_corpus(logger: MLFlowLogger, datamodule, splits: tuple[str, ...]) -> None:
    """The corpus as the run's dataset inputs, one per split read (``training``, ``validation``, ``testing``): the
    MLflow UI's Dataset column and filter. A store that cannot be reached costs only these inputs."""
    hp = datamodule.hparams
    inputs = corpus_inputs(datamodule.path or BUILTIN, datamodule.meta, splits, (hp.val_fraction, hp.test_fraction))
    try:
        logger.experiment.log_inputs(logger.run_id, datasets=inputs)
    except Exception as e:
        if not unreachable(e):
            raise
        rank_zero_warn("the MLflow tracking store is unreachable: the corpus is not recorded as the run's dataset input")


class BestScores(L.Callback):
    """Logs ``best/val_loss`` and ``best/val_bpb`` at each validation of ``fit`` that reaches a new best ``val/loss``
    (the score ``best.ckpt`` is chosen by), at its step: the runs table can sort by them, and the run page shows
    the best scores, not the last ones."""

    def __init__(self) -> None:
        self.best: dict[str, float] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or trainer.state.fn != "fit" or "val/loss" not in metrics:
            return
        loss = float(metrics["val/loss"])
        if self.best and loss >= self.best["val_loss"]:
            return
        self.best = {"val_loss": loss, "val_bpb": float(metrics["val/bpb"]), "step": trainer.global_step}
        # At the step Lightning logged val/* at (its logging counter, one behind global_step after an optimizer
        # step; pinned by tests/test_lightning_internals.py), so the curves line up in the charts.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics({"best/val_loss": loss, "best/val_bpb": self.best["val_bpb"]}, step=step)

    def state_dict(self) -> dict[str, float]:
        return dict(self.best)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best = dict(state)


def fit_summary(trainer, logger: MLFlowLogger | None, best: str) -> str:
    """The one line ``fit`` ends with: the best score, its step, the checkpoint and the run's address."""
    scores = next((c.best for c in trainer.callbacks if isinstance(c, BestScores)), {})
    parts = [f"best val/bpb {scores['val_bpb']:.4f} at step {scores['step']}" if scores else "no validation score"]
    if best:
        parts.append(f"checkpoint {Path(best).resolve()}")
    if logger is not None:
        parts.append(f"run {ui_address(logger)} (mlflow ui)")
    return "; ".join(parts)


SAMPLES_TABLE = "samples.json"


def log_samples(logger: MLFlowLogger, step: int, prompts: list[str], texts: list[str]) -> None:
    """Log the continuations ``texts`` of ``prompts`` at ``step`` as ``samples/step_000200.txt``, and as rows
    (step, sample, prompt) of the table ``samples.json``, which the MLflow UI's evaluation view lines up across runs."""
    body = "".join(f"### prompt {prompt!r}\n{prompt}{text}\n\n" for prompt, text in zip(prompts, texts))
    logger.experiment.log_text(logger.run_id, body, f"samples/step_{step:06d}.txt")
    # The UI's artifact view compares the first column after the one it groups by (step): the samples.
    rows = {"step": [step] * len(prompts), "sample": [p + t for p, t in zip(prompts, texts)], "prompt": list(prompts)}
    logger.experiment.log_table(logger.run_id, data=rows, artifact_file=SAMPLES_TABLE)
