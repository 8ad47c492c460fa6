"""A Hugging Face transformers GPT-2 folder from our model, and our model back from such a folder.

The folder (``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json``) loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` without network access. The JSON files are written here, so
exporting needs no transformers install.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from lm_lightning.model import GPT, GPTConfig
from lm_lightning.tokenizer import EOT, tokenizer_from_str

# HF's GPT-2 keeps these layers as Conv1D, whose weight is the transpose of nn.Linear's.
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
WEIGHTS = "model.safetensors"


class ExportError(ValueError):
    """A folder that cannot be written to or loaded from."""


def _is_conv1d(name: str) -> bool:
    return name.endswith(tuple(f"{layer}.weight" for layer in CONV1D))


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under HF GPT-2 names and layouts; a model without biases gets zero biases (HF's GPT-2 always has them)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to transformer.wte.weight: HF ties it back on load
            continue
        state[name] = (tensor.t() if _is_conv1d(name) else tensor).detach().contiguous()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is None and name != "lm_head":
            state[f"{name}.bias"] = torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)
    return state


def hf_config(config: GPTConfig, eot_id: int) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # the tanh approximation, as our MLP
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
    }


def export_pretrained(model: GPT, tokenizer: Tokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` and ``tokenizer`` to the folder ``out`` as a transformers GPT-2 model."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; pass a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    eot_id = tokenizer.token_to_id(EOT)
    save_file(hf_state_dict(model), out / WEIGHTS, metadata={"format": "pt"})
    files = {
        "config.json": hf_config(model.config, eot_id),
        "generation_config.json": {
            "bos_token_id": eot_id,
            "eos_token_id": eot_id,
            "pad_token_id": eot_id,  # GPT-2 has no padding token; batched generation pads with end-of-text
            "do_sample": True,
            "temperature": 0.8,
        },
        "tokenizer_config.json": {
            # The generic fast tokenizer loads tokenizer.json as it is; GPT2Tokenizer would rebuild
            # GPT-2's own pre-tokenizer and lose ours (which splits runs of CJK characters).
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOT,
            "eos_token": EOT,
            "unk_token": EOT,
            "model_max_length": model.config.block_size,
            "clean_up_tokenization_spaces": False,
        },
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    return out


def load_pretrained(folder: str | Path) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode) and tokenizer of a folder written by :func:`export_pretrained`."""
    folder = Path(folder)
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        weights = load_file(folder / WEIGHTS)
        tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load {folder}: not a folder written by lm-lightning export ({e})") from None
    try:
        if hf["model_type"] != "gpt2" or hf["n_inner"] is not None or hf["activation_function"] != "gelu_new":
            raise ValueError("another GPT-2 variant")
        config = GPTConfig(
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            dropout=hf["resid_pdrop"],
        )
        model = GPT(config)
        state = {name: (t.t() if _is_conv1d(name) else t) for name, t in weights.items()}
        state["lm_head.weight"] = state["transformer.wte.weight"]
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as e:  # RuntimeError: weights that do not fit the config
        first = str(e).strip().splitlines()[0]
        raise ExportError(f"cannot load {folder}: not a GPT-2 model written by lm-lightning export ({first})") from None
    return model.eval(), tokenizer_from_str(tokenizer_json, source=str(folder / "tokenizer.json"))
