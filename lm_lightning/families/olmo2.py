"""OLMo 2 (``Olmo2ForCausalLM``): no norm before attention and MLP, one after each (before the residual sum), and
RMSNorm over the whole width of the query and key projections (all heads together), before RoPE."""

from __future__ import annotations

from typing import Any

from lm_lightning.families.base import (
    Family, biases, decoder_config, decoder_hf_config, decoder_weights, require, rope_fields, rope_parameters,
)
from lm_lightning.model import GPTConfig

DEFAULTS = {"rms_norm_eps": 1e-5, "tie_word_embeddings": False}
NORMS = {"post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}


def read_config(hf: dict[str, Any]) -> GPTConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    attention = bool(hf.get("attention_bias", False))
    return decoder_config(hf, DEFAULTS, **rope_fields(rope_parameters(hf, 10000.0)), **biases(attention, attention, False),
                          qk_norm=True, qk_norm_over="width", pre_norm=False, post_norm=True)


def write_config(config: GPTConfig) -> dict[str, Any]:
    return decoder_hf_config(config) | {"attention_bias": config.biases[0]}


def weight_map(config: GPTConfig) -> list:
    return decoder_weights(config, NORMS)


FAMILY = Family("olmo2", "Olmo2ForCausalLM", read_config, write_config, weight_map)
