"""Hugging Face transformers folders from our model, and our model back from them.

What a family is (gpt2, llama, mistral, qwen2, qwen3, gemma3_text, smollm3, olmo2: its class, config keys and
weight names) lives in :mod:`lm_lightning.families`; this module writes and reads the folders.

An exported folder (``config.json``, ``model.safetensors``, ``generation_config.json``,
``tokenizer.json``, ``tokenizer_config.json``) loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` without network access. The JSON files are written here, so
exporting needs no transformers install. Loading reads such a folder, or one saved by transformers'
``save_pretrained`` (one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``; a
``pytorch_model.bin`` only if it loads with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from lm_lightning.checkpoint import assign_weights, check_size, check_weights, load_error_line
from lm_lightning.errors import UserError
from lm_lightning.files import read_source_text
from lm_lightning.families import config_from_hf, hf_config, hf_state, state_from_hf
from lm_lightning.model import GPT, GPTConfig, skip_init
from lm_lightning.tokenizer import begin_of_text, end_of_text, folder_tokenizer

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS, PICKLED_WEIGHTS_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


class ExportError(UserError):
    """A model that cannot be exported, or a folder that cannot be written to or loaded from."""


def export_pretrained(
    model: GPT, tokenizer: Tokenizer, out: str | Path, overwrite: bool = False, chat_template: str | None = None
) -> Path:
    """Write ``model`` and ``tokenizer`` to the folder ``out`` as a transformers model of its family, the one its
    config records (:func:`lm_lightning.families.family_of`); a model its family cannot express is refused, naming
    the field, before anything is written. A ``chat_template`` (Jinja) goes into ``tokenizer_config.json``, where
    transformers' ``apply_chat_template`` reads it."""
    out = Path(out)
    eot_id, bos_id = end_of_text(tokenizer), begin_of_text(tokenizer)
    try:
        config = hf_config(model.config, eot_id, bos_id)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; pass a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    eot, bos = tokenizer.id_to_token(eot_id), tokenizer.id_to_token(config["bos_token_id"])
    save_file(hf_state(model), out / WEIGHTS, metadata={"format": "pt"})
    files = {
        "config.json": config,
        "generation_config.json": {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": eot_id,
            "pad_token_id": eot_id,  # no padding token; batched generation pads with end-of-text
            "do_sample": True,
            "temperature": 0.8,
        },
        "tokenizer_config.json": {
            # The generic fast tokenizer loads tokenizer.json as it is; GPT2Tokenizer would rebuild
            # GPT-2's own pre-tokenizer and lose ours (which splits runs of CJK characters).
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": eot,
            "unk_token": eot,
            "model_max_length": model.config.block_size,
            "clean_up_tokenization_spaces": False,
        },
    }
    if chat_template is not None:
        files["tokenizer_config.json"]["chat_template"] = chat_template
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    return out


def _load_pickled(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        if "weights_only" not in str(e):
            raise OSError(f"{path.name} is not a weights file ({str(e).strip().splitlines()[0]})") from None
        raise ExportError(
            f"cannot load {path}: it holds objects that need pickle to load (they could run code), refused for safety; "
            "use the model's model.safetensors, or convert the weights on a machine you trust"
        ) from None


def _shards(folder: Path, index: str) -> list[Path]:
    """The files a weight index names, each checked to be a file inside ``folder`` (an index is data from
    elsewhere: a name such as ``../../etc/passwd``, an absolute path or a link out of the folder is refused), or,
    for a snapshot of the Hugging Face hub cache, a link into that repository's ``blobs`` folder."""
    try:
        weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
        names = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ExportError(f"cannot load {folder}: {index} is not a weight index (a JSON object with a weight_map of "
                          "tensor names to file names)") from None
    inside, shards = [folder.resolve()], []
    snapshots = folder.absolute().parent
    if snapshots.name == "snapshots":  # the Hugging Face hub cache: snapshots/<rev>/<file> links to ../../blobs/<hash>
        inside.append((snapshots.parent / "blobs").resolve())
    for name in sorted(names):
        shard = (folder / str(name)).resolve()
        if not isinstance(name, str) or not any(shard.is_relative_to(root) for root in inside):
            raise ExportError(f"cannot load {folder}: {index} names {name!r}, which is outside the folder; "
                              "a weight index may only name files inside its model folder")
        if not shard.is_file():
            raise ExportError(f"cannot load {folder}: {index} names {name}, which does not exist; copy the whole model folder")
        shards.append(shard)
    return shards


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors``, or of the shards its index lists; else of ``pytorch_model.bin``
    (or its shards), read with ``torch.load(weights_only=True)``."""
    for single, index, read in ((WEIGHTS, WEIGHTS_INDEX, load_file), (PICKLED_WEIGHTS, PICKLED_WEIGHTS_INDEX, _load_pickled)):
        if (folder / single).is_file():
            return read(folder / single)
        if (folder / index).is_file():
            weights = {}
            for shard in _shards(folder, index):
                weights.update(read(shard))
            return weights
    raise ExportError(f"cannot load {folder}: it has no {WEIGHTS} (nor {WEIGHTS_INDEX} with its shards)")


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a transformers folder, with a one-line :class:`ExportError` for a folder without one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder; pass a transformers model folder, an lm-lightning export or a .ckpt")
    if not (folder / "config.json").is_file():
        raise ExportError(f"cannot load {folder}: it has no config.json, so it is not a transformers model folder")
    try:
        hf = json.loads(read_source_text(folder / "config.json"))
    except ValueError as e:
        raise ExportError(f"cannot load {folder}: config.json is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ExportError(f"cannot load {folder}: config.json holds a {type(hf).__name__}, not a JSON object of settings")
    return hf


def folder_config(folder: str | Path) -> GPTConfig:
    """Our config for a transformers folder's ``config.json`` (its weights are not read)."""
    hf = read_hf_config(folder)
    try:
        return config_from_hf(hf)
    except ValueError as e:
        raise ExportError(f"cannot load {folder}: {e}") from None
    except KeyError as e:
        raise ExportError(f"cannot load {folder}: config.json has no {e}") from None
    except TypeError as e:  # a setting of the wrong type met in the family's arithmetic ("two" // 2)
        raise ExportError(f"cannot load {folder}: config.json has a setting of the wrong type ({e})") from None


def load_model(folder: str | Path, config: GPTConfig | None = None) -> GPT:
    """The model (in eval mode) of a transformers folder of a family in :mod:`lm_lightning.families`: ours from
    :func:`export_pretrained`, or one written by transformers' ``save_pretrained``. ``config``: its
    :func:`folder_config`, when the caller has read it already."""
    folder = Path(folder)
    config = config or folder_config(folder)
    try:
        weights = _read_weights(folder)
    except ExportError:
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # SafetensorError: a truncated file, a lying header
        raise ExportError(f"cannot load {folder}: its weights cannot be read ({e}); the file is damaged or incomplete, "
                          "copy or download the model's weight files again") from None
    check_size(config, weights, folder)
    with skip_init():  # every weight is loaded next
        model = GPT(config)
    try:
        state = state_from_hf(config, weights)
        check_weights(state, folder)
        assign_weights(model, state)
    except (KeyError, RuntimeError) as e:  # RuntimeError: weights that do not fit the config
        raise ExportError(f"cannot load {folder}: its weights do not fit its config.json ({load_error_line(e)})") from None
    return model.eval()


def load_pretrained(folder: str | Path) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode, see :func:`load_model`) and tokenizer (``tokenizer.json``, or GPT-2's
    ``vocab.json`` and ``merges.txt``) of a transformers folder; a tokenizer with more tokens than the
    model's embedding has rows is refused."""
    folder = Path(folder)
    config = folder_config(folder)  # a folder that is not a model is named as such before its tokenizer is looked for
    tokenizer = folder_tokenizer(folder)
    model = load_model(folder, config)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ExportError(
            f"cannot load {folder}: its tokenizer has {tokenizer.get_vocab_size()} tokens but the model's embedding "
            f"has {model.config.vocab_size} rows (vocab_size); the tokenizer is not this model's"
        )
    return model, tokenizer
