"""GPT-2 (``GPT2LMHeadModel``): learned positions, LayerNorm, GELU (tanh) MLP, biases everywhere; our defaults.

Our parameter names are GPT-2's, so the table only marks the four ``Conv1D`` layers, whose weights transformers
stores transposed.
"""

from __future__ import annotations

from typing import Any

from lm_lightning.families.base import Family, WeightEntry, require
from lm_lightning.model import GPTConfig

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def read_config(hf: dict[str, Any]) -> GPTConfig:
    require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False) or hf.get("reorder_and_upcast_attn", False):
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
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def write_config(config: GPTConfig) -> dict[str, Any]:
    return {
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


def weight_map(config: GPTConfig) -> list[WeightEntry]:
    names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    if not config.tie_embeddings:
        names.append("lm_head.weight")
    for i in range(config.n_layer):
        names += [f"transformer.h.{i}.{layer}.{kind}" for layer in ("ln_1", "ln_2", *CONV1D) for kind in ("weight", "bias")]
    return [WeightEntry(name, (name,), transpose=name.endswith(tuple(f"{c}.weight" for c in CONV1D))) for name in names]


FAMILY = Family(
    "gpt2", "GPT2LMHeadModel", read_config, write_config, weight_map,
    zero_biases=True,
    ignored=(".attn.bias", ".attn.masked_bias"),  # the causal-mask buffers older GPT-2 checkpoints hold
)
