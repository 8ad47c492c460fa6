"""Llama (``LlamaForCausalLM``): RoPE (plain, ``linear`` or Llama 3's ``llama3`` scaling), RMSNorm, SwiGLU,
grouped-query attention, any ``head_dim``; ``attention_bias`` covers q/k/v/o, ``mlp_bias`` the MLP. Llama 2 and 3.x,
TinyLlama."""

from __future__ import annotations

from typing import Any

from lm_lightning.families.base import (
    LLAMA_NORMS, Family, biases, decoder_config, decoder_hf_config, decoder_weights, require, rope_fields, rope_parameters,
)
from lm_lightning.model import GPTConfig

DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def read_config(hf: dict[str, Any]) -> GPTConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    require(hf, "pretraining_tp", (1, None), 1)
    attention = bool(hf.get("attention_bias", False))
    return decoder_config(hf, DEFAULTS, **rope_fields(rope_parameters(hf, 10000.0)),
                          **biases(attention, attention, bool(hf.get("mlp_bias", False))))


def write_config(config: GPTConfig) -> dict[str, Any]:
    qkv, _, mlp = config.biases
    return decoder_hf_config(config) | {"attention_bias": qkv, "mlp_bias": mlp, "pretraining_tp": 1}


def weight_map(config: GPTConfig) -> list:
    return decoder_weights(config, LLAMA_NORMS)


FAMILY = Family("llama", "LlamaForCausalLM", read_config, write_config, weight_map, ignored=("rotary_emb.inv_freq",))
