"""Model families as data: one module per transformers family, registered by its ``model_type``.

- :func:`config_from_hf`: a ``config.json`` -> our :class:`~lm_lightning.model.GPTConfig` (its ``family`` recorded);
- :func:`state_from_hf`: a folder's tensors -> our state dict, by the family's weight map;
- :func:`hf_config`, :func:`hf_state`: the reverse, for export, to the family recorded in the config;
- :func:`weight_map`: that table itself (our name, theirs, split sizes, transpose), for naming modules the
  transformers way (PEFT adapters).

Adding a family is one module with a :class:`~lm_lightning.families.base.Family` and its test.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lm_lightning.families import gemma3_text, gpt2, llama, mistral, olmo2, qwen2, qwen3, smollm3
from lm_lightning.families.base import UNSUPPORTED_KEYS, Family, WeightEntry
from lm_lightning.model import GPTConfig

FAMILIES: dict[str, Family] = {
    f.model_type: f for f in (m.FAMILY for m in (gpt2, llama, mistral, qwen2, qwen3, gemma3_text, smollm3, olmo2))
}
# Fields that change how a model trains, not what it computes: an export does not carry them.
TRAINING_FIELDS = ("dropout", "zero_init_proj", "family")

__all__ = ["FAMILIES", "Family", "WeightEntry", "config_from_hf", "family_of", "hf_config", "hf_state", "state_from_hf",
           "weight_map"]


def family_of(config: GPTConfig) -> Family:
    """The family ``config`` records; for a model trained here (``family`` unset), by its shape: learned positions
    give gpt2, rope gives qwen3 with qk_norm, else llama."""
    if config.family is not None:
        if config.family not in FAMILIES:
            raise ValueError(f"family={config.family!r} is not a known family; known: {', '.join(FAMILIES)}")
        return FAMILIES[config.family]
    if config.pos_embedding == "learned":
        return FAMILIES["gpt2"]
    return FAMILIES["qwen3" if config.qk_norm else "llama"]


INTEGER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions")
"""Shape settings that are integers whenever present (``head_dim``, ``num_key_value_heads``, GPT-2's ``n_inner`` may be
``null``: derived)."""


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """Our config for a transformers ``config.json``, with its ``family`` recorded; a ``ValueError`` (one line,
    naming the key) for what our model cannot express: another ``model_type``, mixture-of-experts, a vision tower,
    Phi-3's ``longrope``, ..."""
    for key, what in UNSUPPORTED_KEYS.items():
        if hf.get(key):
            raise ValueError(f"{key}={hf[key] if not isinstance(hf[key], dict) else '{...}'} ({what}) is not supported; "
                             "only dense decoder-only text models are")
    for key in INTEGER_KEYS:
        if key in hf and (not isinstance(hf[key], int) or isinstance(hf[key], bool)):
            raise ValueError(f"config.json {key}={hf[key]!r} must be an integer; the file is damaged, use the model's own")
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return dataclasses.replace(FAMILIES[model_type].read_config(hf), family=model_type)


def weight_map(config: GPTConfig) -> list[WeightEntry]:
    """Every tensor of a model of ``config``: our name against its family's (see :class:`WeightEntry`)."""
    return family_of(config).weight_map(config)


def _take(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``weights[name]``, removed; also found without the base model's prefix (``transformer.``, ``model.``), as
    transformers finds it (the original GPT-2 files name ``h.0.attn.c_attn.weight``)."""
    if name in weights:
        return weights.pop(name)
    short = name.split(".", 1)[1]
    if short in weights:
        return weights.pop(short)
    raise KeyError(name)


def state_from_hf(config: GPTConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from a transformers folder's tensors (``config``: :func:`config_from_hf` of its config.json).
    A missing tensor, or one left over, raises ``KeyError`` naming it."""
    family, weights = family_of(config), dict(weights)
    state = {}
    for entry in family.weight_map(config):
        try:
            parts = [_take(weights, name) for name in entry.theirs]
        except KeyError as e:
            raise KeyError(f"missing tensor {e.args[0]}") from None
        parts = [p.t() if entry.transpose else p for p in parts]
        state[entry.ours] = parts[0] if len(parts) == 1 else torch.cat(parts)
    if config.tie_embeddings:
        weights.pop("lm_head.weight", None)  # a tied head saved anyway: the embedding
        state["lm_head.weight"] = state["transformer.wte.weight"]
    leftover = sorted(name for name in weights if not name.endswith(family.ignored or ("\0",)))
    if leftover:
        raise KeyError(f"unexpected tensors: {', '.join(leftover[:3])}")
    return state


def _mechanisms(config: GPTConfig) -> dict[str, Any]:
    """What a model of ``config`` computes, field by field, with unset fields resolved (two configs that give the
    same function give the same dict)."""
    first = ("pos_embedding", "norm", "mlp", "qk_norm", "pre_norm", "post_norm")  # named first when they differ
    names = [*first, *(f.name for f in dataclasses.fields(GPTConfig) if f.name not in first + TRAINING_FIELDS)]
    values = {name: getattr(config, name) for name in names}
    values.update(n_kv_head=config.kv_heads, mlp_hidden=config.mlp_width, head_dim=config.head_size,
                  query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_size)
    values.update(zip(("qkv_bias", "attn_proj_bias", "mlp_bias"), config.biases))
    ropes = [config.layer_rope(i) for i in range(config.n_layer)]
    values.update(
        sliding_window=[config.layer_window(i) for i in range(config.n_layer)],
        sliding_window_layers=None,  # in sliding_window's per-layer list
        nope_layers=[i for i, rope in enumerate(ropes) if rope is None] if config.pos_embedding == "rope" else None,
        rope_theta=config.rope_theta if "global" in ropes else None,
        rope_scaling=config.rope_scaling if "global" in ropes else None,
        rope_local_theta=config.rope_local_theta if "local" in ropes else None,
        qk_norm_over=config.qk_norm_over if config.qk_norm else None,
        norm_unit_offset=config.norm_unit_offset if config.norm == "rmsnorm" else None,
        bias=config.bias if config.norm == "layernorm" else None,  # else only in the three above
    )
    return values


def _check_expressible(config: GPTConfig, family: Family, hf: dict[str, Any]) -> None:
    """Refuse, naming the field, a config its family's config.json cannot state: the family's config read back
    must compute the same model."""
    read = family.read_config(hf)
    back = _mechanisms(read)
    for name, value in _mechanisms(config).items():
        if back[name] == value or (family.zero_biases and name.endswith("bias") and value is False):
            continue
        if isinstance(value, list) or isinstance(back[name], list):  # per-layer lists: the field as set
            value, back[name] = getattr(config, name), getattr(read, name)
        raise ValueError(f"{name}={value!r} has no transformers class in family {family.model_type}: "
                         f"{family.architecture} needs {name}={back[name]!r}")


def hf_config(config: GPTConfig, eot_id: int, bos_id: int | None = None) -> dict[str, Any]:
    """``config.json`` of ``config``'s family (see :func:`family_of`); a ``ValueError`` naming the field if the
    family cannot express the model (squared ReLU, soft-capped logits in Llama, ...)."""
    family = family_of(config)
    hf = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": config.vocab_size,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "bos_token_id": eot_id if bos_id is None else bos_id,
        "eos_token_id": eot_id,
        # No padding token: a family's default one (SmolLM3's 128004) may lie outside a small vocabulary, and
        # transformers' embedding would never train the row of one given here.
        "pad_token_id": None,
    } | family.write_config(config)
    _check_expressible(config, family, hf)
    return hf


def hf_state(model_or_config: torch.nn.Module | GPTConfig, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Our weights under the names and layouts of the model's family: a ``GPT`` (its own state), or a config and
    a state dict of ours. A tied head is left out (transformers ties it back); a family whose class always has
    biases gets zeros for those the model lacks (GPT-2)."""
    if isinstance(model_or_config, GPTConfig):
        config = model_or_config
    else:
        config, state = model_or_config.config, model_or_config.state_dict() if state is None else state
    family = family_of(config)
    ours = {name: t.detach() for name, t in state.items()}
    out = {}
    for entry in family.weight_map(config):
        tensor = ours.get(entry.ours)
        if tensor is None and family.zero_biases and entry.ours.endswith(".bias"):
            weight = ours[entry.ours[: -len("bias")] + "weight"]
            tensor = torch.zeros(weight.shape[0], dtype=weight.dtype)
        parts = tensor.split(list(entry.split)) if entry.split else (tensor,)
        out.update({name: (p.t() if entry.transpose else p).contiguous() for name, p in zip(entry.theirs, parts)})
    return out
