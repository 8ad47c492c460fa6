"""Callbacks of our own: throughput, a graceful Ctrl-C, and what every run records in MLflow."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lm_lightning.generate import TextGenerator, check_sampling
from lm_lightning.hardware import peak_flops, precision_dtype
from lm_lightning.mlflow_model import log_text_model
from lm_lightning.tokenizer import tokenizer_from_str


class TokensPerSecond(L.Callback):
    """Logs ``train/tokens_per_s`` and ``train/mfu`` (model FLOPs utilisation) over each
    ``log_every_n_steps`` window of training, validation excluded.

    Wall time between logging steps needs no device sync: over a window of many steps the queue of
    asynchronous work stays bounded, so the average is right without stalling every step. MFU is
    the model's training FLOPs (6N + attention, per token) over the device's peak: a datasheet value
    for known GPUs, else a matmul measured on this machine.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._tokens = 0
        self._peak = 0.0

    def _reset(self) -> None:
        self._start, self._tokens = time.perf_counter(), 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._peak, source = peak_flops(pl_module.device, precision_dtype(trainer.precision))
        if trainer.is_global_zero:
            print(f"peak {self._peak / 1e12:.2f} TFLOP/s per device ({source}) for train/mfu")
        self._reset()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start = None  # restart at the next training batch: validation, samples and saves are not training

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch[:, 1:].numel() * trainer.world_size
        if self._start is not None and (trainer.global_step % trainer.log_every_n_steps == 0):
            elapsed = time.perf_counter() - self._start
            if elapsed > 0:
                tokens_per_s = self._tokens / elapsed
                flops = pl_module.model.flops_per_token(batch.shape[1] - 1) * tokens_per_s / trainer.world_size
                pl_module.log("train/tokens_per_s", tokens_per_s, prog_bar=True, rank_zero_only=True)
                pl_module.log("train/mfu", flops / self._peak, rank_zero_only=True)
            self._reset()


class GracefulCtrlC(L.Callback):
    """The first Ctrl-C stops training as SIGTERM does: at the end of the current step, after which ``last.ckpt``
    is saved and the MLflow run marked KILLED. A second Ctrl-C interrupts at once, saving nothing.

    Python's own Ctrl-C raises ``KeyboardInterrupt`` wherever the program is, so a checkpoint saved then could
    hold a half-applied optimizer step. Installed when training starts, after Lightning has saved the
    process's signal handlers, which it puts back when training ends.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        on_sigterm = signal.getsignal(signal.SIGTERM)

        def on_ctrl_c(signum, frame) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            rank_zero_info("Ctrl-C: stopping after this step and saving last.ckpt (Ctrl-C again to stop at once)")
            if callable(on_sigterm):
                on_sigterm(signum, frame)

        signal.signal(signal.SIGINT, on_ctrl_c)


def git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def mlflow_logger(trainer: L.Trainer) -> MLFlowLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


# Config keys that say how this invocation was started, not what the run is: never params.
NOT_PARAMS = ("config", "ckpt_path", "trainer.logger.init_args.run_id")


class MLflowConfig(SaveConfigCallback):
    """Logs the resolved config to the MLflow run: as dotted params and as ``config.yaml``.

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
        params = flatten(self.config.as_dict())
        logger.log_hyperparams({k: v for k, v in params.items() if k not in NOT_PARAMS})


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class MLflowRunInfo(L.Callback):
    """Tags the MLflow run (git commit, corpus hash, parameter count), logs the tokenizer, and says where things are."""

    def _log_run_info(self, trainer, pl_module) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        datamodule = trainer.datamodule
        tags = {"n_params": str(pl_module.model.num_params()), "vocab_size": str(pl_module.model.config.vocab_size)}
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


class TextSamples(L.Callback):
    """At each validation of ``fit``, continues a few fixed prompts and logs the text to the MLflow run
    as ``samples/step_000200.txt``, so runs' samples compare side by side as training progresses.

    Sampling draws from its own seeded ``torch.Generator``: the same step gives the same draws, and
    training's random state is untouched.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int = 1234,
    ):
        """
        Args:
            prompts: Prompts to continue, e.g. ``["ROMEO:", "床前明月光"]``; ``""`` starts a new document.
                Unset: ``[""]``, which suits any corpus. ``[]`` turns samples off.
            max_new_tokens: Tokens generated per prompt.
            temperature: Softmax temperature of the sampler (0: greedy).
            top_k: Sample only from the ``top_k`` most likely tokens. Unset: from all.
            seed: Seed of the sampler's own generator.
        """
        check_sampling(max_new_tokens, 1, temperature, top_k, 1.0)
        self.prompts = [""] if prompts is None else list(prompts)
        self.kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        self._generator: TextGenerator | None = None

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        logger = mlflow_logger(trainer)
        if trainer.sanity_checking or trainer.state.fn != "fit" or logger is None or not self.prompts or not pl_module.tokenizer_json:
            return
        if self._generator is None:
            self._generator = TextGenerator(pl_module.model, tokenizer_from_str(pl_module.tokenizer_json))
        # Lightning puts the model back in train mode only after on_validation_end: dropout is off here.
        texts = [self._generator.generate(prompt, **self.kwargs)[0] for prompt in self.prompts]
        body = "".join(f"### prompt {prompt!r}\n{prompt}{text}\n\n" for prompt, text in zip(self.prompts, texts))
        logger.experiment.log_text(logger.run_id, body, f"samples/step_{trainer.global_step:06d}.txt")
