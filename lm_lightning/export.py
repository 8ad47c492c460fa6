"""Hugging Face transformers folders from our model, per model family, and our model back from them.

Three families have a transformers class our model matches weight for weight:

- ``gpt2`` (``GPT2LMHeadModel``): learned positions, LayerNorm, GELU MLP (the defaults);
- ``llama`` (``LlamaForCausalLM``): RoPE, RMSNorm, SwiGLU, grouped-query attention allowed;
- ``qwen3`` (``Qwen3ForCausalLM``): Llama's with ``qk_norm`` and no biases.

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
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from lm_lightning.errors import UserError
from lm_lightning.model import GPT, GPTConfig, skip_init
from lm_lightning.tokenizer import begin_of_text, end_of_text, folder_tokenizer

# HF's GPT-2 keeps these layers as Conv1D, whose weight is the transpose of nn.Linear's.
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS, PICKLED_WEIGHTS_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class ExportError(UserError):
    """A model that cannot be exported, or a folder that cannot be written to or loaded from."""


def _is_conv1d(name: str) -> bool:
    return name.endswith(tuple(f"{layer}.weight" for layer in CONV1D))


def hf_family(config: GPTConfig) -> str:
    """``gpt2``, ``llama`` or ``qwen3``: the transformers family of ``config``; a combination none of
    them has raises :class:`ExportError` naming the field."""
    if config.logit_softcap is not None:
        raise ExportError(
            f"logit_softcap={config.logit_softcap} has no transformers class (GPT-2, Llama and Qwen3 do not "
            "soft-cap logits); train with model.logit_softcap unset to export"
        )
    if config.pos_embedding == "learned":
        family = "gpt2"
        needs: dict[str, Any] = {"norm": "layernorm", "mlp": "gelu", "qk_norm": False, "n_kv_head": (None, config.n_head)}
    else:
        family = "qwen3" if config.qk_norm else "llama"
        needs = {"norm": "rmsnorm", "mlp": "swiglu"}
        if family == "qwen3":
            needs["bias"] = False  # Qwen3's MLP has no biases
    for field, allowed in needs.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if getattr(config, field) not in allowed:
            raise ExportError(
                f"{field}={getattr(config, field)!r} has no transformers class with pos_embedding={config.pos_embedding!r}"
                f"{' and qk_norm=True' if family == 'qwen3' else ''}: {ARCHITECTURES[family]} needs {field}={allowed[-1]!r}"
            )
    return family


def _llama_layout(config: GPTConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """(our name, transformers names, sizes along dim 0) for every Llama / Qwen3 tensor: one of ours is
    the concatenation of its transformers tensors (fused QKV, fused gate and up projections)."""
    qkv = (config.n_embd, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim)
    layout = [
        ("transformer.wte.weight", ("model.embed_tokens.weight",), ()),
        ("transformer.ln_f.weight", ("model.norm.weight",), ()),
    ]
    if not config.tie_embeddings:
        layout.append(("lm_head.weight", ("lm_head.weight",), ()))
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        layout += [
            (ours + "ln_1.weight", (theirs + "input_layernorm.weight",), ()),
            (ours + "ln_2.weight", (theirs + "post_attention_layernorm.weight",), ()),
        ]
        if config.qk_norm:
            layout += [(ours + f"attn.{n}.weight", (theirs + f"self_attn.{n}.weight",), ()) for n in ("q_norm", "k_norm")]
        for kind in ("weight", "bias") if config.bias else ("weight",):
            gate_up = (theirs + f"mlp.gate_proj.{kind}", theirs + f"mlp.up_proj.{kind}")
            layout += [
                (ours + f"attn.c_attn.{kind}", tuple(theirs + f"self_attn.{p}_proj.{kind}" for p in "qkv"), qkv),
                (ours + f"attn.c_proj.{kind}", (theirs + f"self_attn.o_proj.{kind}",), ()),
                (ours + f"mlp.c_fc.{kind}", gate_up, (config.mlp_width,) * 2),
                (ours + f"mlp.c_proj.{kind}", (theirs + f"mlp.down_proj.{kind}",), ()),
            ]
    return layout


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under the names and layouts of the model's transformers family.

    GPT-2: a model without biases gets zero biases (HF's GPT-2 always has them). A tied head is left
    out: transformers ties it back on load.
    """
    ours = {name: t.detach() for name, t in model.state_dict().items()}
    if hf_family(model.config) != "gpt2":
        state = {}
        for name, theirs, sizes in _llama_layout(model.config):
            parts = ours[name].split(list(sizes)) if sizes else (ours[name],)
            state.update({n: p.contiguous() for n, p in zip(theirs, parts)})
        return state
    state = {}
    for name, tensor in ours.items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        state[name] = (tensor.t() if _is_conv1d(name) else tensor).contiguous()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is None and name != "lm_head":
            state[f"{name}.bias"] = torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)
    return state


def hf_config(config: GPTConfig, eot_id: int, bos_id: int | None = None) -> dict[str, Any]:
    """``config.json`` of the model's transformers family."""
    family = hf_family(config)
    common = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "bos_token_id": eot_id if bos_id is None else bos_id,
        "eos_token_id": eot_id,
    }
    if family == "gpt2":
        return common | {
            "n_positions": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.mlp_hidden,  # None: 4 * n_embd
            "activation_function": "gelu_new",  # the tanh approximation, as our MLP
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "scale_attn_weights": True,
        }
    llama = common | {
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": config.bias,
        "attention_dropout": config.dropout,
    }
    if family == "llama":
        return llama | {"mlp_bias": config.bias}
    return llama | {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer}


def export_pretrained(model: GPT, tokenizer: Tokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` and ``tokenizer`` to the folder ``out`` as a transformers model of its family
    (see :func:`hf_family`, which refuses, before anything is written, a model that has none)."""
    out = Path(out)
    eot_id, bos_id = end_of_text(tokenizer), begin_of_text(tokenizer)
    config = hf_config(model.config, eot_id, bos_id)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; pass a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    eot, bos = tokenizer.id_to_token(eot_id), tokenizer.id_to_token(config["bos_token_id"])
    save_file(hf_state_dict(model), out / WEIGHTS, metadata={"format": "pt"})
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
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    return out


def _rope_theta(hf: dict[str, Any]) -> float:
    """The RoPE base of a Llama / Qwen3 config (transformers 4.x or 5 layout); scaled RoPE is refused."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope_type={kind!r} (scaled RoPE) is not supported; only unscaled RoPE is")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """Our config for a transformers ``config.json``; ``ValueError`` (one line) for what our model cannot express."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(f"model_type={family!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    tied = hf.get("tie_word_embeddings", family == "gpt2")  # transformers' defaults
    if family == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function={hf['activation_function']!r} is not supported; only gelu_new is")
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError(
                "attention scaling other than 1/sqrt(head_dim) is not supported (scale_attn_weights, scale_attn_by_inverse_layer_idx)"
            )
        return GPTConfig(
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            dropout=hf.get("resid_pdrop", 0.0),
            mlp_hidden=hf.get("n_inner"),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=tied,
        )
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd / n_head):
        raise ValueError(f"head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads; our model needs them equal")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; only silu (SwiGLU) is")
    if hf.get("pretraining_tp", 1) != 1:
        raise ValueError(f"pretraining_tp={hf['pretraining_tp']} is not supported; only 1 is")
    bias = hf.get("attention_bias", False)
    if family == "llama" and hf.get("mlp_bias", False) != bias:
        raise ValueError("attention_bias differs from mlp_bias; our model has biases in every linear layer or in none")
    if family == "qwen3" and bias:
        raise ValueError("attention_bias=true is not supported for qwen3: its MLP has no biases, and our model's bias covers both")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported; only full attention is")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_embd=n_embd,
        dropout=hf.get("attention_dropout", 0.0),
        bias=bias,
        pos_embedding="rope",
        rope_theta=_rope_theta(hf),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        mlp_hidden=hf["intermediate_size"],
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        qk_norm=family == "qwen3",
        tie_embeddings=tied,
    )


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


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors``, or of the shards its index lists; else of ``pytorch_model.bin``
    (or its shards), read with ``torch.load(weights_only=True)``."""
    for single, index, read in ((WEIGHTS, WEIGHTS_INDEX, load_file), (PICKLED_WEIGHTS, PICKLED_WEIGHTS_INDEX, _load_pickled)):
        if (folder / single).is_file():
            return read(folder / single)
        if (folder / index).is_file():
            shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
            weights = {}
            for shard in sorted(shards):
                weights.update(read(folder / shard))
            return weights
    raise OSError(f"it has no {WEIGHTS} (nor {WEIGHTS_INDEX} with its shards)")


def _our_state(config: GPTConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from transformers tensors of ``config``'s family; a missing or leftover tensor raises ``KeyError``."""
    weights = dict(weights)
    if config.pos_embedding == "learned":  # GPT-2: our names, Conv1D layouts
        state = {name: (t.t() if _is_conv1d(name) else t) for name, t in weights.items()}
        tied = state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["transformer.wte.weight"] if config.tie_embeddings else tied
        if state["lm_head.weight"] is None:
            raise KeyError("lm_head.weight")
        return state
    state = {}
    for name, theirs, _ in _llama_layout(config):
        state[name] = torch.cat([weights.pop(n) for n in theirs])
    weights.pop("lm_head.weight", None)  # a tied head saved anyway: the embedding
    if weights:
        raise KeyError(f"unexpected tensors: {', '.join(sorted(weights)[:3])}")
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a transformers folder, with a one-line :class:`ExportError` for a folder without one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder; pass a transformers model folder, an lm-lightning export or a .ckpt")
    if not (folder / "config.json").is_file():
        raise ExportError(f"cannot load {folder}: it has no config.json, so it is not a transformers model folder")
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ExportError(f"cannot load {folder}: config.json is not valid JSON ({e})") from None


def folder_config(folder: str | Path) -> GPTConfig:
    """Our config for a transformers folder's ``config.json`` (its weights are not read)."""
    hf = read_hf_config(folder)
    try:
        return config_from_hf(hf)
    except ValueError as e:
        raise ExportError(f"cannot load {folder}: {e}") from None
    except KeyError as e:
        raise ExportError(f"cannot load {folder}: config.json has no {e}") from None


def load_model(folder: str | Path) -> GPT:
    """The model (in eval mode) of a transformers GPT-2, Llama or Qwen3 folder: ours from
    :func:`export_pretrained`, or one written by transformers' ``save_pretrained``."""
    folder = Path(folder)
    config = folder_config(folder)
    try:
        weights = _read_weights(folder)
    except ExportError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"cannot load {folder}: not a transformers model folder ({e})") from None
    with skip_init():  # every weight is loaded next
        model = GPT(config)
    try:
        model.load_state_dict(_our_state(config, weights))
    except (KeyError, RuntimeError) as e:  # RuntimeError: weights that do not fit the config
        lines = [line.strip() for line in str(e).strip().splitlines()]
        first = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))), lines[0])
        raise ExportError(f"cannot load {folder}: its weights do not fit its config.json ({first})") from None
    return model.eval()


def load_pretrained(folder: str | Path) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode, see :func:`load_model`) and tokenizer (``tokenizer.json``, or GPT-2's
    ``vocab.json`` and ``merges.txt``) of a transformers folder; a tokenizer with more tokens than the
    model's embedding has rows is refused."""
    folder = Path(folder)
    folder_config(folder)  # a folder that is not a model is named as such before its tokenizer is looked for
    tokenizer = folder_tokenizer(folder)
    model = load_model(folder)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ExportError(
            f"cannot load {folder}: its tokenizer has {tokenizer.get_vocab_size()} tokens but the model's embedding "
            f"has {model.config.vocab_size} rows (vocab_size); the tokenizer is not this model's"
        )
    return model, tokenizer
