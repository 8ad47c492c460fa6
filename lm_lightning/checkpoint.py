"""Checkpoint files: written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from tokenizers import Tokenizer

from lm_lightning.model import GPT, GPTConfig
from lm_lightning.tokenizer import tokenizer_from_str


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file in the same folder, then renames it over the target.

    Lightning writes checkpoints in place, so a run killed mid-save (or a full disk) would leave a
    truncated ``last.ckpt`` that looks whole. A rename is atomic: readers see the old file or the new.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location)


def load_checkpoint(path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors for a missing, truncated or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .ckpt file (or 'last' / 'best')")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # Every weights_only failure mentions weights_only; only a disallowed class names a global.
        if "Unsupported global" in str(e):
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
