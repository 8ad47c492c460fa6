"""Qwen2 and Qwen2.5 (``Qwen2ForCausalLM``): Llama's layers with biases on q/k/v only; a sliding window on the
layers from ``max_window_layers`` when ``use_sliding_window`` is on (off in every published Qwen2.5)."""

from __future__ import annotations

from typing import Any

from lm_lightning.families.base import (
    LLAMA_NORMS, Family, biases, decoder_config, decoder_hf_config, decoder_weights, layer_types, require, rope_fields,
    rope_parameters, sliding_layers,
)
from lm_lightning.model import GPTConfig

DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def qwen_sliding(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen's window: ``sliding_window`` counts only with ``use_sliding_window``; without ``layer_types`` it is on
    the layers from ``max_window_layers`` (transformers' ``Qwen2Config.__post_init__``)."""
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    if not hf.get("layer_types"):
        first = hf.get("max_window_layers", 28)
        hf = {**hf, "layer_types": ["sliding_attention" if window and i >= first else "full_attention" for i in range(hf["num_hidden_layers"])]}
    return sliding_layers(hf, window)


def qwen_sliding_out(config: GPTConfig) -> dict[str, Any]:
    types = layer_types(config)
    return {
        "use_sliding_window": config.sliding_window is not None,
        "sliding_window": config.sliding_window,
        "max_window_layers": types.index("sliding_attention") if "sliding_attention" in types else config.n_layer,
        "layer_types": types,
    }


def read_config(hf: dict[str, Any]) -> GPTConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    return decoder_config(hf, DEFAULTS, **rope_fields(rope_parameters(hf, 10000.0)), **biases(True, False, False),
                          **qwen_sliding(hf))


def write_config(config: GPTConfig) -> dict[str, Any]:
    return decoder_hf_config(config) | qwen_sliding_out(config)


def weight_map(config: GPTConfig) -> list:
    return decoder_weights(config, LLAMA_NORMS)


FAMILY = Family("qwen2", "Qwen2ForCausalLM", read_config, write_config, weight_map)
