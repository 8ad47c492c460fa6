"""Scoring a checkpoint with ``validate`` or ``test``: the model's shape and the tokenizer come from the checkpoint,
so the command needs only ``--ckpt_path`` and ``--data.path``."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from lm_lightning.checkpoint import RUN_ID_KEY, TOKENIZER_KEY, CheckpointError, load_checkpoint, model_config
from lm_lightning.files import atomic_write_text, cache_root
from lm_lightning.lora import LORA_KEY


def tokenizer_file(tokenizer_json: str, cache_dir: str | None) -> Path:
    """A checkpoint's tokenizer as a file in the cache (``tokenizers/<sha256>.json``), for ``data.tokenizer_path``."""
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    path = root / "tokenizers" / f"{hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, tokenizer_json, "tokenizer")
    return path


def adopt_checkpoint(config: Namespace, given: Mapping[str, Any]) -> dict[str, str]:
    """Set the model fields the user did not set (not in ``given``) to the checkpoint's, and
    ``data.tokenizer_path`` (unless set) to the checkpoint's tokenizer; the tags that say what was scored.

    A field the user did set is kept: a checkpoint of another shape is then refused as for ``fit``.
    """
    checkpoint = load_checkpoint(config.ckpt_path, mmap=True)
    hparams: dict[str, Any] = checkpoint.get("hyper_parameters") or {}
    if not checkpoint.get(TOKENIZER_KEY) or "vocab_size" not in hparams:
        raise CheckpointError(f"cannot score {config.ckpt_path}: it is not an lm-lightning training checkpoint")
    saved = vars(model_config(hparams))
    for key, value in saved.items():
        if key in config.model and key not in given:
            config.model[key] = value
    if LORA_KEY in checkpoint:  # adapters: the model is their base with them on it
        config.model.init_from = checkpoint[LORA_KEY]["path"]
        for key in ("lora_r", "lora_alpha", "lora_targets"):
            config.model[key] = hparams[key]
    config.data.block_size = config.model.block_size  # linked at parse time, before the shape was known
    if not config.data.tokenizer_path:
        config.data.tokenizer_path = str(tokenizer_file(checkpoint[TOKENIZER_KEY], config.data.cache_dir))
    tags = {"checkpoint": str(Path(config.ckpt_path).resolve())}
    if checkpoint.get(RUN_ID_KEY):
        tags["source_run_id"] = checkpoint[RUN_ID_KEY]
    return tags
