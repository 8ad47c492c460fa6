"""Checkpoint files: when ``last.ckpt`` is written, written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tokenizers import Tokenizer

from lm_lightning.files import atomic_write
from lm_lightning.model import GPT, GPTConfig
from lm_lightning.tokenizer import tokenizer_from_str

LAST = "last.ckpt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file in the same folder, then renames it over the target.

    A run killed mid-save (``kill -9``) or a full disk leaves the previous checkpoint as it was, never a
    truncated file that looks whole; the temporaries of killed runs are removed on the next save. (Lightning's
    own writer buffers the whole checkpoint in memory first, and leaves no temporary to recognise.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), "checkpoint")

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location)


def load_checkpoint(path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors for a missing, truncated or unsafe file.

    ``mmap=True`` maps tensors instead of reading them: a cheap way to read a large checkpoint's metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .ckpt file (or 'last')")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # Every weights_only failure mentions weights_only; only a disallowed class names a global.
        if "unsupported global" in str(e).lower():
            why = "it holds objects that are not plain tensors and containers, refused for safety"
        else:
            why = f"it is truncated or not a checkpoint ({first})"
        raise CheckpointError(f"cannot load checkpoint {path}: {why}") from None


def load_gpt(path, map_location: Any = "cpu") -> tuple[GPT, Tokenizer]:
    """The model (in eval mode) and tokenizer of a training checkpoint: what generation and export need."""
    checkpoint = load_checkpoint(path, map_location)
    hparams = checkpoint.get("hyper_parameters") or {}
    if not checkpoint.get("tokenizer_json") or "state_dict" not in checkpoint or "vocab_size" not in hparams:
        raise CheckpointError(f"cannot load checkpoint {path}: it is not an lm-lightning training checkpoint")
    config = GPTConfig(**{name: hparams[name] for name in GPTConfig.__dataclass_fields__ if name in hparams})
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model = GPT(config)
    model.load_state_dict(state)
    return model.eval(), tokenizer_from_str(checkpoint["tokenizer_json"], source=str(path))

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

    def _save_last_now(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last_now(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save_last_now(trainer)
            rank_zero_info(f"stopped at step {trainer.global_step}; saved {self.last_model_path}")
