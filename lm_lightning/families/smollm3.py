"""SmolLM3 (``SmolLM3ForCausalLM``): Llama's layers where every fourth layer has no rotary positions
(``no_rope_layers``: 1 = RoPE, 0 = none; by default from ``no_rope_layer_interval``)."""

from __future__ import annotations

from typing import Any

from lm_lightning.families.base import (
    LLAMA_NORMS, Family, biases, decoder_config, decoder_hf_config, decoder_weights, layer_types, require, rope_fields,
    rope_parameters, sliding_layers,
)
from lm_lightning.model import GPTConfig

DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": True}


def read_config(hf: dict[str, Any]) -> GPTConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    n, interval = hf["num_hidden_layers"], hf.get("no_rope_layer_interval", 4)
    uses_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    attention = bool(hf.get("attention_bias", False))
    nope = [i for i, rope in enumerate(uses_rope) if not rope]
    return decoder_config(hf, DEFAULTS, **rope_fields(rope_parameters(hf, 2_000_000.0)),
                          **biases(attention, attention, bool(hf.get("mlp_bias", False))),
                          nope_layers=nope or None, **sliding_layers(hf, window))


def write_config(config: GPTConfig) -> dict[str, Any]:
    qkv, _, mlp = config.biases
    return decoder_hf_config(config) | {
        "attention_bias": qkv,
        "mlp_bias": mlp,
        "no_rope_layers": [int(i not in (config.nope_layers or ())) for i in range(config.n_layer)],
        "use_sliding_window": config.sliding_window is not None,
        "sliding_window": config.sliding_window,
        "layer_types": layer_types(config),
    }


def weight_map(config: GPTConfig) -> list:
    return decoder_weights(config, LLAMA_NORMS)


FAMILY = Family("smollm3", "SmolLM3ForCausalLM", read_config, write_config, weight_map)
