"""The checkpoint contract: what a checkpoint holds beyond Lightning's own keys, how it is written
(atomically) and read (``weights_only``, never unpickling code), and how it is checked against a config.

A training checkpoint is Lightning's dictionary (``state_dict``, ``optimizer_states``, ``loops``,
``callbacks``, ``hyper_parameters``, ...) plus these keys, all plain strings, numbers, tensors and
containers, so that it loads with ``torch.load(weights_only=True)``:

- ``tokenizer_json``: the tokenizer, whole (generation and export need nothing else);
- ``skipped_batches``: batches skipped for a non-finite loss (``--model.nonfinite_loss skip``);
- ``mlflow_run_id``: the MLflow run that wrote it, which a resume continues;
- ``callbacks["ResumeState"]``: the random number generators' states (see ``rng_states``).

Checkpoints written before the training-loss window became a metric hold it as ``train_loss_window``
(a sum and a count); ``LanguageModel`` reads either.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from lm_lightning.errors import UserError
from lm_lightning.files import atomic_write
from lm_lightning.model import GPT, GPTConfig, skip_init
from lm_lightning.tokenizer import TokenizerError, load_tokenizer, tokenizer_from_str

LAST = "last.ckpt"
TOKENIZER_KEY = "tokenizer_json"
SKIPPED_BATCHES_KEY = "skipped_batches"
RUN_ID_KEY = "mlflow_run_id"
LEGACY_LOSS_WINDOW_KEY = "train_loss_window"

# Every model field but these fixes the weights' shapes or meaning: a checkpoint must match them all.
TRAINING_ONLY_FIELDS = ("dropout", "zero_init_proj")
SHAPE_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name not in TRAINING_ONLY_FIELDS)


class CheckpointError(UserError):
    """A checkpoint file that cannot be used."""


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write ``checkpoint`` to a temporary file in the same folder, then rename it over ``path``: a kill or a full
    disk mid-save leaves the previous file whole."""
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), "checkpoint")


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
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


def model_config(hparams: Mapping[str, Any]) -> GPTConfig:
    """The model fields among a checkpoint's (or a config's) hyperparameters; absent fields take their
    defaults, which are what checkpoints written before the field existed were trained with."""
    names = {f.name for f in fields(GPTConfig)}
    try:
        return GPTConfig(**{k: v for k, v in hparams.items() if k in names})
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's model config is not valid: {e}") from None


def check_shape(saved: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Refuse, with one line, a checkpoint whose model (its saved hyperparameters) differs from ``config``'s.

    A field ``config`` leaves unset (``None``, e.g. ``vocab_size``) is taken from the checkpoint.
    """
    defaults = GPTConfig()
    differ = [
        f"{k}={saved.get(k, getattr(defaults, k))} (config: {config[k]})"
        for k in SHAPE_KEYS
        if config.get(k) is not None and saved.get(k, getattr(defaults, k)) != config[k]
    ]
    if differ:
        raise CheckpointError(
            f"the checkpoint has a different model shape: {', '.join(differ)}; "
            "set model.* to the checkpoint's values (its position table fixes model.block_size)"
        )


def check_same_tokenizer(checkpoint_json: str | None, data_json: str | None) -> None:
    """Refuse a checkpoint whose tokenizer is not the data's."""
    if checkpoint_json is not None and data_json is not None and checkpoint_json != data_json:
        raise CheckpointError(
            "the checkpoint's tokenizer differs from the data's tokenizer; set data.tokenizer_path to the "
            "tokenizer the checkpoint was trained with (lm-lightning saves it in the run's artifacts)"
        )


def tokenizer_of(path: str | Path) -> Tokenizer:
    """The tokenizer saved in a training checkpoint (``.ckpt``, read without its tensors), else
    :func:`~lm_lightning.tokenizer.load_tokenizer`'s: a ``tokenizer.json`` or a transformers folder's."""
    path = Path(path)
    if path.suffix != ".ckpt" or not path.is_file():
        return load_tokenizer(path)
    text = load_checkpoint(path, mmap=True).get(TOKENIZER_KEY)
    if not text:
        raise TokenizerError(f"checkpoint {path} holds no tokenizer; it is not an lm-lightning training checkpoint")
    return tokenizer_from_str(text, source=str(path))


def check_weights(state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse, in one line naming the tensor, weights that would load and then compute garbage: an integer
    (quantized) tensor in a float model, or one holding NaN or infinity."""
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"cannot load {source}: tensor {name} is {tensor.dtype}, not a float; quantized "
                                  "weights are not supported, use the model's unquantized (fp32/bf16/fp16) weights")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"cannot load {source}: tensor {name} holds NaN or infinite values; "
                                  "the weights are corrupt, use a good copy of the model")


def load_gpt(path: str | Path, map_location: Any = "cpu") -> tuple[GPT, Tokenizer]:
    """The model (in eval mode) and tokenizer of a training checkpoint: what generation and export need."""
    checkpoint = load_checkpoint(path, map_location)
    hparams = checkpoint.get("hyper_parameters") or {}
    if not checkpoint.get(TOKENIZER_KEY) or "state_dict" not in checkpoint or "vocab_size" not in hparams:
        raise CheckpointError(f"cannot load checkpoint {path}: it is not an lm-lightning training checkpoint")
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    check_weights(state, path)
    with skip_init():  # every weight is loaded next
        model = GPT(model_config(hparams))
    model.load_state_dict(state)
    return model.eval(), tokenizer_from_str(checkpoint[TOKENIZER_KEY], source=str(path))


def rng_states() -> dict[str, Any]:
    """The states of Python's, numpy's and torch's (CPU and CUDA) generators, as tensors and plain containers
    (numpy's own tuple holds an ndarray, which ``weights_only`` refuses)."""
    keys, pos, has_gauss, cached_gaussian = np.random.get_state()[1:]
    numpy_state = {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(state: dict[str, Any]) -> None:
    """Put back the generators' states saved by ``rng_states``."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
