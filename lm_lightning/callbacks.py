"""The Lightning side of training: callbacks of our own (throughput, a graceful Ctrl-C, text samples, what
an exact resume needs, ``last.ckpt``) and the atomic checkpoint writer."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lm_lightning.chat_template import CHAT_TEMPLATE_KEY, ChatTemplate, checkpoint_template
from lm_lightning.checkpoint import RUN_ID_KEY, load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from lm_lightning.generate import Sampling, TextGenerator
from lm_lightning.hardware import peak_flops, precision_dtype
from lm_lightning.tokenizer import tokenizer_from_str
from lm_lightning.tracking.logger import mlflow_logger
from lm_lightning.tracking.records import BestScores, log_samples  # noqa: F401  BestScores: configs name it here


class TokensPerSecond(L.Callback):
    """Logs ``train/tokens_per_s`` and ``train/mfu`` (model FLOPs utilisation) over each
    ``log_every_n_steps`` window of training, validation excluded (on a GPU also ``train/peak_memory_mb``, the most its
    tensors have held so far: ``torch.cuda.max_memory_allocated``), and at each validation ``train/seconds``:
    the seconds spent training so far (validation, samples and saves excluded; continued on resume), the
    time a run needed to reach its validation scores whatever its validation schedule.

    Wall time between logging steps needs no device sync: over a window of many steps the queue of
    asynchronous work stays bounded, so the average is right without stalling every step. MFU is
    the model's training FLOPs (6N + attention, per token) over the device's peak: a datasheet value
    for known GPUs, else a matmul measured on this machine.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._tokens = 0
        self._peak = 0.0
        self._train_seconds = 0.0  # trained before the current stretch of training
        self._stretch = 0.0  # when the current stretch began (training start, or the batch after a validation)

    def _reset(self) -> None:
        self._start, self._tokens = time.perf_counter(), 0

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self._train_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._train_seconds = state["train_seconds"]

    def on_train_start(self, trainer, pl_module) -> None:
        self._peak, source = peak_flops(pl_module.device, precision_dtype(trainer.precision))
        if trainer.is_global_zero:
            print(f"peak {self._peak / 1e12:.2f} TFLOP/s per device ({source}) for train/mfu")
        self._reset()
        self._stretch = self._start

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._start is not None:  # None before training starts (the sanity check) and after a validation
            self._train_seconds += time.perf_counter() - self._stretch
        self._start = None  # restart at the next training batch: validation, samples and saves are not training

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            pl_module.log("train/seconds", self._train_seconds, rank_zero_only=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._reset()
            self._stretch = self._start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, (tuple, list)):  # conversations (ids, trained): positions computed, padding included
            batch = batch[0]
        self._tokens += batch[:, 1:].numel() * trainer.world_size
        if self._start is not None and (trainer.global_step % trainer.log_every_n_steps == 0):
            elapsed = time.perf_counter() - self._start
            if elapsed > 0:
                tokens_per_s = self._tokens / elapsed
                flops = pl_module.model.flops_per_token(batch.shape[1] - 1) * tokens_per_s / trainer.world_size
                if flops > self._peak:  # a peak measured while the machine was busy: measure it again
                    self._peak = peak_flops(pl_module.device, precision_dtype(trainer.precision), flops)[0]
                pl_module.log("train/tokens_per_s", tokens_per_s, prog_bar=True, rank_zero_only=True)
                pl_module.log("train/mfu", flops / self._peak, rank_zero_only=True)
                if pl_module.device.type == "cuda":
                    peak_mb = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
                    pl_module.log("train/peak_memory_mb", peak_mb, rank_zero_only=True)
            self._reset()


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar without its noise: no ``v_num`` (the MLflow run id's last characters), and for a
    step-based run (``trainer.max_steps``, where the one "epoch" is the whole run) "train" instead of "Epoch 0"."""

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_steps > 0:
            self.train_progress_bar.set_description("train")


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


class TextSamples(L.Callback):
    """At each validation of ``fit``, continues a few fixed prompts and logs the text to the MLflow run
    as ``samples/step_000200.txt``, so runs' samples compare side by side as training progresses. A run on
    conversations answers fixed user turns instead (``chat_prompts``, else the first held-out conversations).

    Sampling draws from its own seeded ``torch.Generator``: the same step gives the same draws, and
    training's random state is untouched.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        max_new_tokens: int = 64,
        seed: int = 1234,
        chat_prompts: list[str] | None = None,
        num_chat_samples: int = 2,
        **sampling,
    ):
        """
        Args:
            prompts: Prompts to continue, e.g. ``["ROMEO:", "床前明月光"]``; ``""`` starts a new document.
                Unset: ``[""]``, which suits any corpus. ``[]`` turns samples off.
            chat_prompts: For a run on conversations: user turns the model answers, each a conversation of its
                own, rendered with the run's chat template. Unset: the first ``num_chat_samples`` validation
                conversations, up to their first assistant turn (held-out questions the model answers).
            num_chat_samples: How many validation conversations are answered when ``chat_prompts`` is unset.
            max_new_tokens: Tokens generated per prompt.
            seed: Seed of the sampler's own generator.
            sampling: The other ``Sampling`` settings (temperature, top_k, top_p, stop).
        """
        self.sampling = Sampling(max_new_tokens=max_new_tokens, seed=seed, **sampling)
        self.prompts = [""] if prompts is None else list(prompts)
        self.chat_prompts, self.num_chat_samples = chat_prompts, num_chat_samples
        self._generator: TextGenerator | None = None
        self._template: ChatTemplate | None = None

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        logger = mlflow_logger(trainer)
        if trainer.sanity_checking or trainer.state.fn != "fit" or logger is None or not self.prompts or not pl_module.tokenizer_json:
            return
        if self._generator is None:
            tokenizer = tokenizer_from_str(pl_module.tokenizer_json)
            self._template = checkpoint_template({CHAT_TEMPLATE_KEY: pl_module.chat_template}, tokenizer)
            stop = self._template.stop_token_ids(tokenizer) if self._template is not None else ()
            self._generator = TextGenerator(pl_module.model, tokenizer, stop)
        template, tokenizer = self._template, self._generator.tokenizer
        # Lightning puts the model back in train mode only after on_validation_end: dropout is off here.
        if template is None:
            prompts = self.prompts
            texts = [self._generator.complete(prompt, self.sampling)[0] for prompt in prompts]
        else:
            contexts = self._chat_contexts(trainer, template, tokenizer)
            prompts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in contexts]
            device = pl_module.model.lm_head.weight.device
            texts = [
                "".join(step[0] for step in self._generator.sample_ids(torch.tensor(ids, device=device), self.sampling))
                for ids in contexts
            ]
        log_samples(logger, trainer.global_step, prompts, texts)

    def _chat_contexts(self, trainer, template, tokenizer) -> list[list[int]]:
        """Token ids the chat samples answer: ``chat_prompts`` rendered, or held-out conversations up to their
        first assistant token."""
        if self.chat_prompts:
            return [template.encode(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in self.chat_prompts]
        datamodule = getattr(trainer, "datamodule", None)
        conversations = getattr(datamodule, "conversations", {}).get("val")
        if conversations is None:
            return []
        contexts = []
        for i in range(min(self.num_chat_samples, len(conversations))):
            start, end = int(conversations.starts[i]), int(conversations.starts[i + 1])
            trained = conversations.mask[start:end].nonzero()[0]
            cut = start + (int(trained[0]) if len(trained) else end - start)
            contexts.append(datamodule.tokens["val"][start:cut].tolist()[-trainer.lightning_module.config.block_size :])
        return contexts


class ValidateLastStep(L.Callback):
    """Validates the last step of a step-based fit when ``val_check_interval`` would not: a run shorter than
    ``val_check_interval`` still ends with validation metrics, ``best.ckpt`` and its MLflow model, and the
    ``last.ckpt`` a run ends with is written after its last validation (see ``LastCheckpoint``)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step and trainer.limit_val_batches != 0:
            trainer.should_stop = True  # Lightning validates the step that stops training (``_should_check_val_fx``)


class ResumeState(L.Callback):
    """Adds to every checkpoint what Lightning leaves out and an exact resume needs: the states of the random
    number generators (dropout masks continue as if never stopped) and the MLflow run id (lightning issue 6205).
    """

    def state_dict(self) -> dict[str, Any]:
        return rng_states()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_states(state)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if (logger := mlflow_logger(trainer)) is not None:
            checkpoint[RUN_ID_KEY] = logger.run_id


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt``, the checkpoint a run resumes from: every ``every_n_train_steps`` steps, when
    training ends (early stopping included), and when SIGTERM (or a first Ctrl-C, see ``GracefulCtrlC``)
    stops the run at the end of a step.

    ``ModelCheckpoint`` alone writes ``last.ckpt`` only when it saves something else, so a step-based
    ``last`` would miss the final steps and a stopped run would lose everything since the last save.
    It never saves on other exceptions, which can strike mid-step: after a crash, a non-finite loss or a
    second Ctrl-C, the last good checkpoint stays.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 100):
        """
        Args:
            dirpath: Folder of ``last.ckpt``. Unset: the run's ``checkpoints`` folder, next to ``best.ckpt``.
            every_n_train_steps: Steps between saves; a ``kill -9`` loses at most this many steps.
        """
        # Always overwrite last.ckpt: a version counter would write last-v1.ckpt beside it after a resume.
        super().__init__(
            dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps, enable_version_counter=False
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if (logger := mlflow_logger(trainer)) is not None and hasattr(logger, "journal_dir"):
            logger.journal_dir = Path(self.dirpath).parent  # MLflow records kept while its server is away

    def _save_last_now(self, trainer: L.Trainer) -> None:
        # ModelCheckpoint's own private steps of a save (pinned by tests/test_lightning_internals.py): there is
        # no public "save last now".
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # The step a fit ends on (see ValidateLastStep) is saved after its validation, as a mid-run save is: a
        # checkpoint written when training ends holds a finished epoch, which Lightning continues one logged step
        # late, and one written before the validation would validate the step again.
        if trainer.state.fn == "fit" and not trainer.sanity_checking and (trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last_now(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save_last_now(trainer)
            rank_zero_info(f"stopped at step {trainer.global_step}; saved {self.last_model_path}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file in the same folder, then renames it over the target (``save_checkpoint``).

    A run killed mid-save (``kill -9``) or a full disk leaves the previous checkpoint as it was, never a
    truncated file that looks whole; the temporaries of killed runs are removed on the next save. (Lightning's
    own writer buffers the whole checkpoint in memory first, and leaves no temporary to recognise.) Reads are
    ``weights_only``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location)
