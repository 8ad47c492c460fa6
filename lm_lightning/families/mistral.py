"""Mistral (``MistralForCausalLM``): Llama's layers without biases, with a sliding attention window on every layer
(``sliding_window``; 4096 in Mistral 7B v0.1, none from v0.2)."""

from __future__ import annotations

from typing import Any

from lm_lightning.families.base import (
    LLAMA_NORMS, Family, decoder_config, decoder_hf_config, decoder_weights, require, rope_fields, rope_parameters,
)
from lm_lightning.model import GPTConfig

DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def read_config(hf: dict[str, Any]) -> GPTConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    # Mistral ignores layer_types (transformers warns): its window, if any, is on every layer.
    return decoder_config(hf, DEFAULTS, **rope_fields(rope_parameters(hf, 10000.0)), bias=False,
                          sliding_window=hf.get("sliding_window", 4096))


def write_config(config: GPTConfig) -> dict[str, Any]:
    return decoder_hf_config(config) | {"sliding_window": config.sliding_window}


def weight_map(config: GPTConfig) -> list:
    return decoder_weights(config, LLAMA_NORMS)


FAMILY = Family("mistral", "MistralForCausalLM", read_config, write_config, weight_map)
