"""What a model family is: its transformers class, its config mapping both ways, and one weight-layout table that
drives both import and export (as torchtitan's ``from_hf_map`` does); plus the config readings several families share.

A family module states only its differences: the keys it reads and writes, and the names of its tensors.
Nothing here imports transformers: folders are read and written as JSON and safetensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lm_lightning.model import GPTConfig

# RoPE kinds our model computes (lm_lightning.model.rope_frequencies); "default" is plain RoPE.
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Keys of a config.json that name a mechanism our model lacks, and what it is.
UNSUPPORTED_KEYS = {
    "num_experts": "mixture-of-experts",
    "num_local_experts": "mixture-of-experts",
    "n_routed_experts": "mixture-of-experts",
    "vision_config": "a vision tower",
    "audio_config": "an audio tower",
}


@dataclass(frozen=True)
class WeightEntry:
    """One of our tensors and the transformers tensors it is made of."""

    ours: str
    """Our parameter name (``transformer.h.0.attn.c_attn.weight``)."""
    theirs: tuple[str, ...]
    """The transformers names, in order: ours is their concatenation along dim 0 (fused q/k/v, gate/up)."""
    split: tuple[int, ...] = ()
    """Sizes along dim 0 of each of ``theirs`` (empty: one tensor, taken whole)."""
    transpose: bool = False
    """Theirs is ours transposed (GPT-2's ``Conv1D``)."""


@dataclass(frozen=True)
class Family:
    """A transformers model family our model expresses exactly."""

    model_type: str
    """transformers' ``model_type`` (the registry key)."""
    architecture: str
    """The ``...ForCausalLM`` class that ``config.json``'s ``architectures`` names."""
    read_config: Callable[[dict[str, Any]], GPTConfig]
    """``config.json`` -> our config (``ValueError``, one line naming the key, for what it cannot express)."""
    write_config: Callable[[GPTConfig], dict[str, Any]]
    """Our config -> the family's own ``config.json`` keys (the registry adds the shared ones)."""
    weight_map: Callable[[GPTConfig], list[WeightEntry]]
    """Every tensor of a model of this config, ours against theirs."""
    zero_biases: bool = False
    """The transformers class always has biases: a model without them exports zeros (GPT-2)."""
    ignored: tuple[str, ...] = ()
    """Name endings of tensors in some folders that are not weights (buffers saved by older transformers)."""


def decoder_weights(config: GPTConfig, norms: dict[str, str]) -> list[WeightEntry]:
    """The weight map of a Llama-style model (``model.embed_tokens``, ``model.layers.i.self_attn.q_proj``, ...):
    q/k/v fused into our ``c_attn``, gate/up into our ``c_fc``. ``norms``: our block norm -> theirs, the one thing
    the families name differently (Llama's ``post_attention_layernorm`` is our ln_2; OLMo 2's is post_attn_norm)."""
    qkv_bias, proj_bias, mlp_bias = config.biases
    q, kv = config.n_head * config.head_size, config.kv_heads * config.head_size
    entries = [
        WeightEntry("transformer.wte.weight", ("model.embed_tokens.weight",)),
        WeightEntry("transformer.ln_f.weight", ("model.norm.weight",)),
    ]
    if not config.tie_embeddings:
        entries.append(WeightEntry("lm_head.weight", ("lm_head.weight",)))
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        entries += [WeightEntry(f"{ours}{o}.weight", (f"{theirs}{t}.weight",)) for o, t in norms.items()]
        if config.qk_norm:
            entries += [WeightEntry(f"{ours}attn.{n}.weight", (f"{theirs}self_attn.{n}.weight",)) for n in ("q_norm", "k_norm")]
        for kind in ("weight", "bias"):
            if kind == "weight" or qkv_bias:
                entries.append(WeightEntry(f"{ours}attn.c_attn.{kind}", tuple(f"{theirs}self_attn.{p}_proj.{kind}" for p in "qkv"), (q, kv, kv)))
            if kind == "weight" or proj_bias:
                entries.append(WeightEntry(f"{ours}attn.c_proj.{kind}", (f"{theirs}self_attn.o_proj.{kind}",)))
            if kind == "weight" or mlp_bias:
                gate_up = (f"{theirs}mlp.gate_proj.{kind}", f"{theirs}mlp.up_proj.{kind}")
                entries.append(WeightEntry(f"{ours}mlp.c_fc.{kind}", gate_up, (config.mlp_width,) * 2))
                entries.append(WeightEntry(f"{ours}mlp.c_proj.{kind}", (f"{theirs}mlp.down_proj.{kind}",)))
    return entries


LLAMA_NORMS = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}


def rope_parameters(hf: dict[str, Any], default_theta: float) -> dict[str, Any]:
    """The RoPE parameters transformers applies for a flat (not per-layer-type) config.json.

    Both layouts are read: v5's ``rope_parameters`` and v4's ``rope_scaling`` with ``rope_theta`` beside it. As
    transformers 5 does (``convert_rope_params_to_dict``), a non-empty ``rope_scaling`` replaces ``rope_parameters``
    and the top-level ``rope_theta`` fills in a missing base; a folder whose two disagree gets a warning.
    """
    def normal(params: dict[str, Any]) -> dict[str, Any]:
        params = dict(params)
        params["rope_type"] = params.pop("type", params.get("rope_type", "default"))
        params.setdefault("rope_theta", hf.get("rope_theta", default_theta))
        if hf.get("partial_rotary_factor") is not None:
            params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
        return params

    v5, v4 = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    params = normal(v4 or v5)
    if v4 and v5 and normal(v5) != params:
        warnings.warn(f"config.json has rope_scaling {v4} and rope_parameters {v5}, which disagree; rope_scaling is "
                      "used, as transformers 5 does", stacklevel=2)
    if params["rope_type"] in ("llama3", "yarn"):  # transformers' standardize_rope_params
        params.setdefault("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
    return params


def rope_fields(params: dict[str, Any], key: str = "rope_parameters") -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` of our config from transformers' RoPE parameters; a kind our model lacks
    (Phi-3's longrope, dynamic NTK) or a partial rotary embedding is a one-line ``ValueError`` naming it."""
    kind = params["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"{key} rope_type={kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported; RoPE covers whole heads here")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return {"rope_theta": float(params["rope_theta"]), "rope_scaling": scaling if kind != "default" else None}


def rope_out(config: GPTConfig) -> dict[str, Any]:
    """``config``'s global RoPE as transformers 5's ``rope_parameters``."""
    return {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}


def head_dim(hf: dict[str, Any], default: int | None = None) -> int | None:
    """Our ``head_dim``: unset where it is hidden_size / num_attention_heads, as a model trained here has it."""
    value = hf.get("head_dim") or default or hf["hidden_size"] // hf["num_attention_heads"]
    return None if value * hf["num_attention_heads"] == hf["hidden_size"] else value


def biases(qkv: bool, proj: bool, mlp: bool) -> dict[str, Any]:
    """Our bias fields for a family's three bias switches: one ``bias`` where they agree (as a model trained here
    says it), else each apart."""
    if qkv == proj == mlp:
        return {"bias": qkv}
    return {"bias": False, "qkv_bias": qkv, "attn_proj_bias": proj, "mlp_bias": mlp}


def sliding_layers(hf: dict[str, Any], window: int | None) -> dict[str, Any]:
    """``sliding_window`` and ``sliding_window_layers`` from a config's ``layer_types`` (transformers 5 writes
    them; a family computes them from its own keys where they are absent)."""
    types = hf.get("layer_types") or []
    layers = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    unknown = sorted({kind for kind in types} - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"layer_types {unknown[0]!r} is not supported; supported: sliding_attention, full_attention")
    if window is None or not layers:
        return {"sliding_window": None, "sliding_window_layers": None}
    return {"sliding_window": window, "sliding_window_layers": None if len(layers) == len(types) else layers}


def layer_types(config: GPTConfig) -> list[str]:
    """transformers 5's ``layer_types`` of ``config``."""
    return ["sliding_attention" if config.layer_window(i) else "full_attention" for i in range(config.n_layer)]


def decoder_config(hf: dict[str, Any], defaults: dict[str, Any], **fields: Any) -> GPTConfig:
    """Our config from the keys every Llama-style config.json shares (``defaults``: the family's values for keys a
    folder may leave out); ``fields``: what the family sets itself."""
    def get(key: str) -> Any:
        return hf.get(key, defaults.get(key))

    n_head = hf["num_attention_heads"]
    return GPTConfig(
        **{
            "vocab_size": hf["vocab_size"],
            "block_size": hf["max_position_embeddings"],
            "n_layer": hf["num_hidden_layers"],
            "n_head": n_head,
            "n_embd": hf["hidden_size"],
            "dropout": float(hf.get("attention_dropout") or 0.0),
            "pos_embedding": "rope",
            "norm": "rmsnorm",
            "norm_eps": get("rms_norm_eps"),
            "mlp": "swiglu",
            "mlp_hidden": hf["intermediate_size"],
            "n_kv_head": hf.get("num_key_value_heads") or n_head,
            "head_dim": head_dim(hf, defaults.get("head_dim")),
            "tie_embeddings": bool(get("tie_word_embeddings")),
            **fields,
        }
    )


def decoder_hf_config(config: GPTConfig) -> dict[str, Any]:
    """The keys every Llama-style config.json shares, for ``config``."""
    return {
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
        "rope_parameters": rope_out(config),
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_out(config) if config.rope_scaling else None,
        "attention_dropout": config.dropout,
    }


def require(hf: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
    """Refuse ``hf[key]`` outside ``allowed``, in one line naming the key."""
    value = hf.get(key, default)
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not supported; supported: {', '.join(map(repr, allowed))}")
