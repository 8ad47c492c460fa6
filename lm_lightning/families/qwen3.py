"""Qwen3 (``Qwen3ForCausalLM``): Llama's layers with RMSNorm on each head's queries and keys, any ``head_dim``
(128 in every published size, whatever the width), ``attention_bias`` on q/k/v/o and none in the MLP."""

from __future__ import annotations

from typing import Any

from lm_lightning.families.base import (
    LLAMA_NORMS, Family, biases, decoder_config, decoder_hf_config, decoder_weights, require, rope_fields, rope_parameters,
)
from lm_lightning.families.qwen2 import qwen_sliding, qwen_sliding_out
from lm_lightning.model import GPTConfig

DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "head_dim": 128}


def read_config(hf: dict[str, Any]) -> GPTConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    attention = bool(hf.get("attention_bias", False))
    return decoder_config(hf, DEFAULTS, **rope_fields(rope_parameters(hf, 10000.0)), **biases(attention, attention, False),
                          qk_norm=True, **qwen_sliding(hf))


def write_config(config: GPTConfig) -> dict[str, Any]:
    return decoder_hf_config(config) | {"attention_bias": config.biases[0]} | qwen_sliding_out(config)


def weight_map(config: GPTConfig) -> list:
    return decoder_weights(config, LLAMA_NORMS)


FAMILY = Family("qwen3", "Qwen3ForCausalLM", read_config, write_config, weight_map)
