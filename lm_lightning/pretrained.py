"""A model to start from: a transformers folder (GPT-2, Llama, Qwen3), a folder written by ``lm-lightning
export``, or a training checkpoint (``.ckpt``) of ours. ``fit --model.init_from``, ``generate`` and
``evaluate`` load one with :func:`load_source`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from lm_lightning.chat_template import ChatTemplate, load_chat_template
from lm_lightning.checkpoint import RUN_ID_KEY, TRAINING_ONLY_FIELDS, load_checkpoint, load_gpt, tokenizer_of
from lm_lightning.errors import ConfigError
from lm_lightning.export import load_pretrained
from lm_lightning.families import hf_config
from lm_lightning.lora import LORA_KEY, load_lora_checkpoint
from lm_lightning.model import GPT, GPTConfig, skip_init
from lm_lightning.tokenizer import declared_special_tokens, token_bytes


@dataclass(frozen=True)
class SourceInfo:
    """Where a model came from, as MLflow tags record it."""

    path: str
    """The path given, resolved."""
    kind: str
    """``transformers`` (a folder), ``checkpoint`` (a ``.ckpt`` of ours) or ``lora`` (a LoRA run's ``.ckpt``, merged)."""
    family: str
    """The transformers ``model_type`` (``gpt2``, ``llama``, ``mistral``, ...), or ``custom`` for a checkpoint no
    transformers class matches."""
    config_hash: str
    """First 16 hex digits of the SHA-256 of the model config (every field, as JSON)."""
    stop_tokens: tuple[int, ...] = ()
    """End-of-sequence token ids the folder declares (generation stops at them as well as at end-of-text)."""
    run_id: str | None = None
    """The MLflow run that wrote a checkpoint (``None`` for a folder)."""
    chat_template: ChatTemplate | None = None
    """The source's chat template (a folder's ``tokenizer_config.json`` or ``chat_template.jinja``, a checkpoint's
    ``chat_template``); ``None`` if it has none."""

    def tags(self) -> dict[str, str]:
        return {"init_from": self.path, "init_from.kind": self.kind, "init_from.family": self.family,
                "init_from.config_hash": self.config_hash}


def _family(config: GPTConfig) -> str:
    """The transformers family ``config`` records or is inferred to have, if it can export to it."""
    try:
        return hf_config(config, 0)["model_type"]
    except ValueError:
        return "custom"


def config_hash(config: GPTConfig) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()[:16]


def load_source(path: str | Path, require_chat_template: bool = False) -> tuple[GPT, Tokenizer, SourceInfo]:
    """The model (in eval mode), tokenizer and :class:`SourceInfo` of a transformers folder or a ``.ckpt`` of ours,
    each file read once.

    Everything is checked before it is returned (config, weights against config, tokenizer against the
    embedding, a byte-level tokenizer); a problem is one line (a ``UserError``). ``require_chat_template``: a source
    without a chat template is refused before its weights are read.
    """
    path = Path(path)
    checkpoint = load_checkpoint(path, mmap=True) if path.suffix == ".ckpt" and not path.is_dir() else None
    # A missing folder is load_pretrained's one line, below.
    template = load_chat_template(path, require_chat_template, checkpoint) if path.exists() else None
    if checkpoint is None:
        model, tokenizer = load_pretrained(path)
        stop = [tokenizer.token_to_id(t) for t in declared_special_tokens(path, tokenizer)["eos"]]
        kind, run_id = "transformers", None
    elif LORA_KEY in checkpoint:  # adapters: merged onto their base
        model, tokenizer, base = load_lora_checkpoint(checkpoint, path)
        stop, kind = ([] if base.endswith(".ckpt") else [tokenizer.token_to_id(t) for t in declared_special_tokens(base, tokenizer)["eos"]]), "lora"
        run_id = checkpoint.get(RUN_ID_KEY)
    else:
        model, tokenizer = load_gpt(path, checkpoint)
        stop, kind, run_id = [], "checkpoint", checkpoint.get(RUN_ID_KEY)
    token_bytes(tokenizer)  # refuses a tokenizer that is not byte-level now, not after tokenizing a corpus with it
    info = SourceInfo(str(path.resolve()), kind, _family(model.config), config_hash(model.config),
                      tuple(i for i in stop if i is not None), run_id, template)
    return model, tokenizer, info


def init_config(source: GPTConfig, given: Mapping[str, Any], path: str) -> GPTConfig:
    """The config to fine-tune ``source`` with, given the model fields a user set (``given``: only those).

    The rule: a field not given (or given as ``None``, unset) takes the source's value; a field given must equal the
    source's, or it is a :class:`ConfigError` naming both values. Two exceptions: ``dropout`` is the user's (a training setting), and
    ``block_size`` may be smaller than the source's (the model then reads shorter windows; a learned position table
    is cut to its first ``block_size`` rows).
    """
    updates: dict[str, Any] = {"dropout": given.get("dropout", GPTConfig().dropout)}
    differ = []
    for f in fields(GPTConfig):
        if f.name in TRAINING_ONLY_FIELDS or given.get(f.name) in (None, getattr(source, f.name)):
            continue
        value = given[f.name]
        if f.name == "block_size" and value < source.block_size:
            updates["block_size"] = value
        else:
            differ.append(f"model.{f.name}={value} but {path} has {f.name}={getattr(source, f.name)}")
    if differ:
        raise ConfigError(f"{'; '.join(differ)}: leave the model's shape unset with model.init_from (it comes from the source)")
    return dataclasses.replace(source, **updates)


_HANDED_DOWN: dict[tuple, tuple[GPT, Tokenizer, SourceInfo]] = {}
"""Sources :func:`apply_init_from` loaded, kept for the one :func:`init_model` of the same fit to take: read once."""


def _source_key(path: str | Path) -> tuple:
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_mtime_ns, stat.st_size


def init_model(path: str, given: Mapping[str, Any]) -> tuple[GPT, Tokenizer, SourceInfo]:
    """The model to fine-tune from ``path`` (in train mode), with :func:`init_config`'s rule applied to ``given``: the
    one :func:`apply_init_from` loaded for this fit, else loaded now."""
    model, tokenizer, info = _HANDED_DOWN.pop(_source_key(path), None) or load_source(path)
    config = init_config(model.config, given, path)
    if config == model.config:
        return model.train(), tokenizer, info
    state = model.state_dict()
    if "transformer.wpe.weight" in state:
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: config.block_size]
    with skip_init():
        tuned = GPT(config)
    tuned.load_state_dict(state)
    return tuned.train(), tokenizer, info


def apply_init_from(config, given: Mapping[str, Any]) -> None:
    """Fill a ``fit`` config (a jsonargparse namespace) from ``model.init_from``, before anything is built: the
    model fields become the source's, with :func:`init_config`'s rule applied to the model fields the command line
    and config files set (``given``), so the logged config is the model trained;
    ``data.block_size`` follows; ``data.tokenizer_path`` is the source (its tokenizer), or must hold the same.

    The source is loaded whole here, so a bad one is refused before the MLflow store, the run folder or the token
    cache is written, and handed down to ``LanguageModel`` (:func:`init_model`), which does not read it again.
    """
    path = config.model.init_from
    names = [f.name for f in fields(GPTConfig)]
    source = load_source(path)
    _HANDED_DOWN.clear()  # one fit's source at a time: an earlier fit in this process that never built its model
    _HANDED_DOWN[_source_key(path)] = source
    model, tokenizer, _ = source
    resolved = init_config(model.config, {k: given[k] for k in names if k in given}, path)
    for name in names:
        config.model[name] = getattr(resolved, name)
    config.data.block_size = resolved.block_size
    tokenizer_path = config.data.tokenizer_path
    if tokenizer_path and tokenizer_of(tokenizer_path).to_str() != tokenizer.to_str():
        raise ConfigError(f"data.tokenizer_path={tokenizer_path} is not the tokenizer of model.init_from={path}; unset data.tokenizer_path")
    config.data.tokenizer_path = str(path)
