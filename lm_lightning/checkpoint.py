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

import os
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
        # A sum is one cheap pass and non-finite whenever an element is; only then is every element looked at
        # (a sum of finite values can overflow).
        if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise CheckpointError(f"cannot load {source}: tensor {name} holds NaN or infinite values; "
                                  "the weights are corrupt, use a good copy of the model")


def _available_memory() -> int:
    """Bytes of memory this machine can still give (Linux's MemAvailable; else all of it)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_size(config: GPTConfig, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse, before a model of ``config`` is allocated, a config that needs more parameters than ``state`` holds
    (an edited or hostile config: ``n_layer`` 10^6 on a two-layer file) or more memory than this machine has.

    The count is a lower bound (embedding, attention's query and output, the MLP's two matrices), in Python
    integers, so it never overflows and never refuses a config that fits its weights."""
    per_layer = config.n_embd * config.head_size * config.n_head * 2 + config.n_embd * config.mlp_width * 2
    needed = config.vocab_size * config.n_embd + config.n_layer * per_layer
    held = sum(t.numel() for t in {t.data_ptr(): t for t in state.values()}.values())  # a tied head once
    if needed > held:
        raise CheckpointError(
            f"cannot load {source}: its config (n_layer={config.n_layer}, n_embd={config.n_embd}, vocab_size="
            f"{config.vocab_size}, ...) needs at least {needed:,} parameters but its weights hold {held:,}; "
            "the config is not this model's, use the model's own config")
    tables = config.block_size * (config.n_embd if config.pos_embedding == "learned" else config.head_size)
    if 4 * (held + tables) > (available := _available_memory()):
        raise CheckpointError(f"cannot load {source}: it needs {4 * (held + tables) / 2**30:.1f} GiB of memory in fp32 "
                              f"(block_size={config.block_size}), this machine has {available / 2**30:.1f} GiB available")


def assign_weights(model: GPT, state: Mapping[str, torch.Tensor]) -> None:
    """Make ``state``'s tensors (as fp32) ``model``'s parameters instead of copying them into the ones it allocated:
    a memory-mapped file's tensors are then read once, on first use (copy-on-write), as transformers'
    ``from_pretrained`` does. A ``load_state_dict`` error (names or shapes that do not fit) is raised as it is."""
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    if model.config.tie_embeddings:  # assign gave the head a parameter of its own
        model.lm_head.weight = model.transformer.wte.weight


def load_error_line(error: Exception) -> str:
    """The line of a ``load_state_dict`` error (a ``RuntimeError`` listing every problem) that names the first
    tensor that does not fit: a size mismatch, a missing or an unexpected key; else its first line."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    return next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))), lines[0])


def load_gpt(path: str | Path, checkpoint: Mapping[str, Any] | None = None) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode) and tokenizer of a training checkpoint: what generation and export need.
    ``checkpoint``: the file's :func:`load_checkpoint`, when the caller has read it already."""
    if checkpoint is None:
        checkpoint = load_checkpoint(path, mmap=True)  # the optimizer's states are never read
    hparams = checkpoint.get("hyper_parameters") or {}
    if not checkpoint.get(TOKENIZER_KEY) or "state_dict" not in checkpoint or "vocab_size" not in hparams:
        raise CheckpointError(f"cannot load checkpoint {path}: it is not an lm-lightning training checkpoint")
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    config = model_config(hparams)
    if not isinstance(config.vocab_size, int):  # fit always writes it; None is what GPTConfig leaves for the tokenizer
        raise CheckpointError(f"cannot load {path}: its hyper_parameters give vocab_size={config.vocab_size!r}, not a number of tokens; "
                              "it was edited, use the checkpoint as fit wrote it")
    check_size(config, state, path)
    check_weights(state, path)
    with skip_init():  # every weight is loaded next
        model = GPT(config)
    try:
        assign_weights(model, state)
    except RuntimeError as e:  # names or shapes its hyperparameters do not give
        raise CheckpointError(f"cannot load {path}: its weights do not fit its hyper_parameters ({load_error_line(e)})") from None
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
