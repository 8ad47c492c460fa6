"""Gemma 3, text only (``Gemma3ForCausalLM``, ``model_type: gemma3_text``: 270M, 1B): per block four norms (before
and after attention and the MLP), RMSNorm scaling by ``1 + weight``, token embeddings scaled by sqrt(hidden_size),
attention scaled by ``query_pre_attn_scalar ** -0.5``, per-head QK-norm, a gated GELU-tanh MLP, and sliding-window
layers (5 in 6 by default) with their own plain RoPE base beside the full layers' (possibly scaled) one. The
multimodal ``gemma3`` (a vision tower) is refused."""

from __future__ import annotations

import warnings
from typing import Any

from lm_lightning.families.base import (
    Family, biases, decoder_config, decoder_hf_config, decoder_weights, layer_types, require, rope_fields, rope_out,
    sliding_layers,
)
from lm_lightning.model import GPTConfig

DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "head_dim": 256}
NORMS = {"ln_1": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
         "ln_2": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}


def gemma_rope(hf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full and the sliding layers' RoPE parameters, as ``Gemma3TextConfig.convert_rope_params_to_dict`` makes
    them: v5's per-layer-type ``rope_parameters``; v4's ``rope_scaling`` merged into the full layers' (a
    disagreement is warned about), ``rope_theta`` and ``rope_local_base_freq`` filling in the bases."""
    nested = {kind: dict(params) for kind, params in (hf.get("rope_parameters") or {}).items() if isinstance(params, dict)}
    full = nested.get("full_attention", {"rope_type": "default"})
    if hf.get("rope_scaling"):
        merged = {**full, **hf["rope_scaling"]}
        if "full_attention" in nested and merged != full:
            warnings.warn(f"config.json has rope_scaling {hf['rope_scaling']} and rope_parameters.full_attention {full}, "
                          "which disagree; rope_scaling is merged over it, as transformers 5 does", stacklevel=2)
        full = merged
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local = nested.get("sliding_attention", {"rope_type": "default"})
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    for params in (full, local):
        params["rope_type"] = params.pop("type", params.get("rope_type", "default"))
    return full, local


def read_config(hf: dict[str, Any]) -> GPTConfig:
    require(hf, "hidden_activation", ("gelu_pytorch_tanh",), "gelu_pytorch_tanh")
    require(hf, "attn_logit_softcapping", (None,), None)
    require(hf, "use_bidirectional_attention", (False, None), False)
    full, local = gemma_rope(hf)
    if local["rope_type"] != "default":
        raise ValueError(f"rope_parameters.sliding_attention rope_type={local['rope_type']!r} is not supported; sliding layers take plain RoPE")
    if not hf.get("layer_types"):  # the pattern older configs give: every sliding_window_pattern-th layer is full
        pattern = hf.get("sliding_window_pattern", 6)
        hf = {**hf, "layer_types": ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(hf["num_hidden_layers"])]}
    sliding = sliding_layers(hf, hf.get("sliding_window", 4096))
    attention = bool(hf.get("attention_bias", False))
    return decoder_config(
        hf, DEFAULTS, **rope_fields(full, "rope_parameters.full_attention"), **biases(attention, attention, False), **sliding,
        rope_local_theta=float(local["rope_theta"]) if sliding["sliding_window"] else None,
        mlp="geglu", qk_norm=True, post_norm=True, norm_unit_offset=True,
        embed_scale=hf["hidden_size"] ** 0.5,  # as Gemma3TextModel computes it
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        logit_softcap=hf.get("final_logit_softcapping"),
    )


def whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def write_config(config: GPTConfig) -> dict[str, Any]:
    local_theta = config.rope_local_theta or config.rope_theta
    out = decoder_hf_config(config)
    del out["hidden_act"]
    return out | {
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": config.biases[0],
        "query_pre_attn_scalar": whole(config.query_pre_attn_scalar or config.head_size),  # an int to transformers' strict config
        "sliding_window": config.sliding_window,
        "layer_types": layer_types(config),
        "rope_parameters": {"full_attention": rope_out(config), "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "rope_local_base_freq": local_theta,
        "final_logit_softcapping": config.logit_softcap,
        "attn_logit_softcapping": None,
    }


def weight_map(config: GPTConfig) -> list:
    return decoder_weights(config, NORMS)


FAMILY = Family("gemma3_text", "Gemma3ForCausalLM", read_config, write_config, weight_map)
