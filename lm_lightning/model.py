"""A decoder-only Transformer in plain PyTorch: GPT-2 by default; Llama, Mistral, Qwen2/3, Gemma 3, SmolLM3,
OLMo 2 and modded-nanoGPT style by configuration (``lm_lightning.families`` maps each transformers family onto
these fields).

This file imports nothing but torch (and head_loss.py, the head's loss, torch only too), so the model
can be read, tested and exported on its own.
Every block is ``x + post(attn(pre(x)))`` then ``x + post(mlp(pre(x)))``: pre-norm by default (GPT-2, Llama),
post-norm (OLMo 2) or both (Gemma 3) by configuration. Attention runs through
``F.scaled_dot_product_attention``, which picks a fused flash or memory-efficient kernel where the
device has one. The defaults of :class:`GPTConfig` are GPT-2's architecture (learned positions,
LayerNorm, a GELU MLP, biases, an output head tied to the token embedding), so a checkpoint written
before the other choices existed loads with the same parameter names and gives the same logits.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lm_lightning.head_loss import head_cross_entropy

CHOICES = {
    "pos_embedding": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu", "geglu", "relu2"),
    "qk_norm_over": ("head", "width"),
}
# The keys each kind of rope_scaling needs (transformers' names); yarn's others are optional.
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


@functools.cache
def _config_types() -> dict[str, Any]:
    return typing.get_type_hints(GPTConfig)


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the declared type ``hint`` (the kinds GPTConfig uses: scalars, Literal, Optional,
    list and dict); an int is a float, a bool is not an int."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is Literal:  # which choice: __post_init__'s CHOICES check names them
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


@dataclass
class GPTConfig:
    """Shape and architecture of the model: the one place a model field is declared.

    Field names follow GPT-2 and nanoGPT; the docstring under each field is its ``--model.<field>`` help.
    """

    vocab_size: int | None = None
    """Rows of the token embedding; unset = the tokenizer's vocabulary size."""
    block_size: int = 256
    """Context length in tokens: the longest sequence the model reads at once."""
    n_layer: int = 4
    """Number of Transformer blocks."""
    n_head: int = 4
    """Attention (query) heads per block; n_embd must be a multiple of it unless head_dim is set."""
    n_embd: int = 256
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention weights and residual branches (0 = off)."""
    bias: bool = True
    """Biases in the linear layers and LayerNorms (GPT-2 has them; Llama and Qwen3 do not); qkv_bias,
    attn_proj_bias and mlp_bias override it per layer."""
    pos_embedding: Literal["learned", "rope"] = "learned"
    """Positions: a learned table of block_size rows (GPT-2) or rotary embeddings on queries and keys (rope)."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding's frequencies (with pos_embedding=rope)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation layer everywhere (blocks, final norm, qk_norm): LayerNorm (GPT-2) or RMSNorm (Llama)."""
    norm_eps: float = 1e-5
    """Epsilon of every normalisation layer."""
    mlp: Literal["gelu", "swiglu", "geglu", "relu2"] = "gelu"
    """MLP of the blocks: GELU (GPT-2), SwiGLU (Llama, Qwen3), GeGLU: gated GELU, tanh approximation (Gemma), or
    squared ReLU (modded-nanoGPT)."""
    mlp_hidden: int | None = None
    """MLP hidden width; unset = 4 * n_embd (gelu, relu2), or 8/3 * n_embd rounded up to a multiple of 64 (swiglu, geglu)."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention; 1 = multi-query); unset = n_head. Must divide n_head."""
    qk_norm: bool = False
    """Normalise each head's queries and keys before attention (Qwen3, modded-nanoGPT)."""
    tie_embeddings: bool = True
    """Share the output head's weights with the token embedding (GPT-2); false = a separate head."""
    logit_softcap: float | None = None
    """Soft-cap the logits to (-c, c) as c * tanh(logits / c) (Gemma 2, modded-nanoGPT); unset = off."""
    zero_init_proj: bool = False
    """Initialise the blocks' output projections (and an untied head) to zero, as modded-nanoGPT and nanochat do."""
    head_dim: int | None = None
    """Width of one attention head; unset = n_embd / n_head. Qwen3 and Gemma 3 set it apart (Qwen3-4B: 128 with 2560 / 32)."""
    qkv_bias: bool | None = None
    """Biases on the query, key and value projections; unset = bias (Qwen2 has these and no others)."""
    attn_proj_bias: bool | None = None
    """Bias on attention's output projection; unset = bias."""
    mlp_bias: bool | None = None
    """Biases in the MLP's linear layers; unset = bias."""
    rope_scaling: dict[str, Any] | None = None
    """Scaled RoPE for long contexts, in transformers' keys: {rope_type: linear, factor} (positions divided by
    factor), {rope_type: llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    (Llama 3.1+), or {rope_type: yarn, factor, original_max_position_embeddings, beta_fast, beta_slow,
    attention_factor, mscale, mscale_all_dim, truncate} (Qwen, SmolLM3 long context); unset = plain RoPE."""
    sliding_window: int | None = None
    """Attention window: a query sees itself and the sliding_window - 1 tokens before it (Mistral, Gemma 3), on the
    layers in sliding_window_layers; unset = every layer sees the whole context."""
    sliding_window_layers: list[int] | None = None
    """Layers (counted from 0) that attend within sliding_window; unset = every layer."""
    rope_local_theta: float | None = None
    """RoPE base of the sliding-window layers, whose RoPE is then never scaled (Gemma 3: 10000 against 1e6 on its
    full-attention layers); unset = those layers use the same RoPE as the others."""
    nope_layers: list[int] | None = None
    """Layers (counted from 0) without rotary positions: they see only causal order (SmolLM3: every fourth)."""
    pre_norm: bool = True
    """Normalise the input of each block's attention and MLP (ln_1, ln_2): GPT-2, Llama, Gemma 3; OLMo 2 does not."""
    post_norm: bool = False
    """Normalise the output of each block's attention and MLP before it joins the residual stream
    (post_attn_norm, post_mlp_norm): OLMo 2, Gemma 3."""
    norm_unit_offset: bool = False
    """RMSNorm scales by 1 + weight, computed in float32, with weights starting at 0 (Gemma), instead of by weight."""
    embed_scale: float | None = None
    """Multiply the token embeddings by this before the first block (Gemma: sqrt(n_embd)); unset = 1."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma 3); unset = by head size ** -0.5."""
    qk_norm_over: Literal["head", "width"] = "head"
    """With qk_norm: normalise each head's queries and keys apart (Qwen3, Gemma 3), or all heads' together, across
    the projections' whole width (OLMo 2)."""
    family: str | None = None
    """The transformers model_type the weights came from (gpt2, llama, mistral, qwen2, qwen3, gemma3_text,
    smollm3, olmo2); export writes it back. Unset (a model trained here) = by shape: learned positions give gpt2,
    rope gives qwen3 with qk_norm, else llama."""

    def __post_init__(self) -> None:
        # A config read from a file (config.json, a checkpoint's hyperparameters) may hold anything: types first,
        # so that a "two" or a null is named here rather than failing in arithmetic below.
        hints = _config_types()
        for f in fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, hints[f.name]):
                raise ValueError(f"{f.name}={value!r} is not of type {_type_name(hints[f.name])}")
        for name in ("block_size", "n_layer", "n_head", "n_embd", "vocab_size", "mlp_hidden", "n_kv_head", "head_dim", "sliding_window"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive integer")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not a choice; choose one of {', '.join(choices)}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"choose n_embd as a multiple of n_head (e.g. {self.n_head * max(1, round(self.n_embd / self.n_head))}) or set head_dim"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                "choose n_kv_head as a divisor of n_head (1 = multi-query, unset = n_head)"
            )
        if self.pos_embedding == "rope" and self.head_size % 2:
            raise ValueError(
                f"pos_embedding=rope needs an even head size, but {'head_dim' if self.head_dim else 'n_embd / n_head'} = "
                f"{self.head_size}; change n_embd, n_head or head_dim"
            )
        for name in ("sliding_window_layers", "nope_layers"):
            outside = [i for i in getattr(self, name) or () if not 0 <= i < self.n_layer]
            if outside:
                raise ValueError(f"{name} has layer {outside[0]}, outside 0..{self.n_layer - 1} (n_layer={self.n_layer})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in ROPE_SCALING_KEYS:
                raise ValueError(f"rope_scaling rope_type={kind!r} is not a choice; choose one of {', '.join(ROPE_SCALING_KEYS)}")
            missing = [key for key in ROPE_SCALING_KEYS[kind] if self.rope_scaling.get(key) is None]
            if missing:
                raise ValueError(f"rope_scaling of rope_type={kind} needs {', '.join(missing)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("rope_theta", "norm_eps", "rope_local_theta", "embed_scale", "query_pre_attn_scalar"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"logit_softcap={self.logit_softcap} must be positive (unset it to turn soft-capping off)")

    @property
    def head_size(self) -> int:
        """Width of one attention head, ``head_dim`` resolved."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads, ``n_kv_head`` resolved."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        """MLP hidden width, ``mlp_hidden`` resolved. SwiGLU has three matrices instead of two, so
        2/3 of 4 * n_embd keeps its parameter count (Llama's rule); multiples of 64 suit matmul kernels."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp in ("swiglu", "geglu"):
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @property
    def biases(self) -> tuple[bool, bool, bool]:
        """Whether the query/key/value projection, attention's output projection and the MLP have biases
        (``qkv_bias``, ``attn_proj_bias``, ``mlp_bias`` resolved)."""
        return tuple(self.bias if b is None else b for b in (self.qkv_bias, self.attn_proj_bias, self.mlp_bias))

    def layer_window(self, layer: int) -> int | None:
        """The attention window of ``layer`` (None: the whole context)."""
        if self.sliding_window is None or (self.sliding_window_layers is not None and layer not in self.sliding_window_layers):
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> str | None:
        """Which rotary table ``layer`` uses: ``global``, ``local`` (sliding-window layers with rope_local_theta),
        or None (learned positions, or a layer in nope_layers)."""
        if self.pos_embedding != "rope" or layer in (self.nope_layers or ()):
            return None
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return "local"
        return "global"


@contextmanager
def skip_init() -> Iterator[None]:
    """Build models without initialising their weights (``torch.nn.init`` does nothing inside), for weights that
    are about to be loaded: random initialisation of a 124M model takes longer than reading its file. Not
    thread-safe (transformers' ``no_init_weights`` does the same)."""
    names = ("normal_", "uniform_", "zeros_", "ones_", "kaiming_uniform_", "trunc_normal_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to ``max_len``.

    Generation prefills it with the prompt, then feeds one token per step, so each step costs
    attention over the cache instead of a full forward over the whole sequence. It holds
    ``n_kv_head`` heads, not ``n_head``: the memory grouped-query attention saves. Keys are stored
    with their rotary embedding applied, so ``length`` is also the position of the next token.

    Rows at different positions (requests batched by a server, each joined when it arrived) keep their own
    lengths in ``lengths`` ``(B,)`` instead: each row then feeds one token per step at its own position and
    attends to its own keys only (:func:`attention_mask`). :meth:`rows` builds such a cache from prefilled
    single-row caches, :meth:`select` keeps some rows and :meth:`join` adds others.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        if max_len > config.block_size:
            raise ValueError(f"cache length {max_len} exceeds block_size={config.block_size}")
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.lengths: torch.Tensor | None = None
        """Per-row lengths ``(B,)`` of a cache whose rows are at different positions; ``None``: all at ``length``."""

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys and values for ``layer``; return all keys and values so far."""
        if self.lengths is not None:  # one token per row, each at its own position; keys past a row's length are masked
            rows = torch.arange(k.shape[0], device=k.device)
            self.keys[layer, rows, :, self.lengths] = k[:, :, 0]
            self.values[layer, rows, :, self.lengths] = v[:, :, 0]
            end = int(self.lengths.max()) + 1
            return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def expand(self, batch_size: int) -> None:
        """Copy the one sequence cached so far to ``batch_size`` rows: samples of one prompt prefill it once."""
        self.keys = self.keys.expand(-1, batch_size, -1, -1, -1).contiguous()
        self.values = self.values.expand(-1, batch_size, -1, -1, -1).contiguous()

    def positions(self, T: int) -> torch.Tensor | None:
        """Positions ``(B, T)`` of the next ``T`` tokens of each row, where rows have lengths of their own."""
        if self.lengths is None:
            return None
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices), in that order (a row may repeat: samples of one prompt)."""
        self.keys, self.values = self.keys[:, rows], self.values[:, rows]
        self.lengths = self.lengths[rows] if self.lengths is not None else torch.full_like(rows, self.length)

    def join(self, other: KVCache) -> None:
        """Append the rows of ``other`` (a cache of the same model), widening the shorter to the longer ``max_len``."""
        width = max(self.max_len, other.max_len)
        own, theirs = self.lengths, other.lengths
        if own is None:
            own = torch.full((self.keys.shape[1],), self.length, device=self.keys.device)
        if theirs is None:
            theirs = torch.full((other.keys.shape[1],), other.length, device=other.keys.device)
        pad = lambda t: F.pad(t, (0, 0, 0, width - t.shape[3]))  # noqa: E731
        self.keys = torch.cat([pad(self.keys), pad(other.keys)], dim=1)
        self.values = torch.cat([pad(self.values), pad(other.values)], dim=1)
        self.lengths = torch.cat([own, theirs])


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed in its weight's dtype. Under CPU autocast the input arrives in bfloat16 while the
    weight stays float32, and torch's fused kernel needs the two alike (else a slower path, and a warning); the
    statistics are then taken in float32, as autocast does for LayerNorm.

    With ``unit_offset`` (Gemma) the scale is ``1 + weight``, weights start at 0, and everything is computed in
    float32 and cast back, as Gemma's own RMSNorm does.
    """

    def __init__(self, size: int, eps: float, unit_offset: bool = False):
        super().__init__(size, eps=eps)
        self.unit_offset = unit_offset
        if unit_offset:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset:
            return (F.rms_norm(x.float(), self.normalized_shape, None, self.eps) * (1.0 + self.weight.float())).type_as(x)
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def make_norm(config: GPTConfig, size: int) -> nn.Module:
    """The configured normalisation over the last ``size`` features."""
    if config.norm == "rmsnorm":
        return RMSNorm(size, eps=config.norm_eps, unit_offset=config.norm_unit_offset)
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.bias)


def rope_frequencies(config: GPTConfig, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``(head_size / 2,)`` of the rotary embedding with base ``theta``, and the factor its
    cosines and sines are multiplied by (1 but for yarn).

    Frequency ``i`` turns by ``theta ** (-2i / head_size)`` radians per position; ``scaling`` (``rope_scaling``'s
    keys) stretches the low frequencies for contexts longer than the model was trained on. Computed as
    transformers' ``modeling_rope_utils`` does, step for step, so imported models give the same logits.
    """
    dim = config.head_size
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = (scaling or {}).get("rope_type")
    if kind == "linear":  # every position divided by factor
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":  # long wavelengths divided by factor, short ones kept, a smooth ramp between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":  # interpolate the dimensions that turn less than beta_slow times over the original context
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high + 0.001 if low == high else high) - low), 0, 1)
        extrapolation = 1 - ramp
        pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq, attention_factor
    return inv_freq, 1.0


def rope_tables(config: GPTConfig, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines ``(block_size, head_size / 2)`` of the rotary embedding (see :func:`rope_frequencies`), in float32."""
    inv_freq, factor = rope_frequencies(config, theta, scaling)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)
    return angles.cos() * factor, angles.sin() * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, T, heads, head_size)`` by position; ``cos``, ``sin``: ``(T, head_size / 2)``, or
    ``(B, T, head_size / 2)`` where each row is at positions of its own.

    Pairs are (i, i + head_size / 2), the two halves of the head (transformers' ``rotate_half``,
    not interleaved), so Llama and Qwen3 weights need no permutation.
    """
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention_mask(
    q_len: int, kv_len: int, window: int | None, device: torch.device, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, bool]:
    """Which keys each query may see, as ``(attn_mask, is_causal)`` for ``scaled_dot_product_attention``.

    The ``q_len`` queries are the last positions of the ``kv_len`` keys (a cache holds the others). A query sees
    every key up to its own, and with a ``window`` only the ``window - 1`` before it. Where that is plain causal
    attention (no cache, or one new token) no mask is built, so the fused kernels run. ``positions`` ``(B, q_len)``:
    each row's queries are at positions of their own (a cache with per-row lengths); the mask is then ``(B, 1,
    q_len, kv_len)`` and also hides the keys past each row's own.
    """
    past = kv_len - q_len
    if positions is not None:
        q = positions[:, None, :, None]
        k = torch.arange(kv_len, device=device)
        mask = k <= q
        if window is not None:
            mask &= k > q - window
        return mask, False
    if window is None or kv_len <= window:
        if past == 0:
            return None, True
        if q_len == 1:
            return None, False
    q = torch.arange(past, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask, False


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_size
        self.dropout = config.dropout
        self.window = config.layer_window(layer)
        self.scale = config.query_pre_attn_scalar**-0.5 if config.query_pre_attn_scalar else None  # None: 1/sqrt(head_dim)
        qkv_bias, proj_bias, _ = config.biases
        self.widths = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim)
        # One matmul for queries, keys and values (fewer, larger kernels); with grouped-query
        # attention the key and value parts are n_kv_head heads wide.
        self.c_attn = nn.Linear(config.n_embd, sum(self.widths), bias=qkv_bias)
        self.c_proj = nn.Linear(self.widths[0], config.n_embd, bias=proj_bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm and config.qk_norm_over  # "head", "width" or False
        if config.qk_norm:
            self.q_norm = make_norm(config, self.head_dim if self.qk_norm == "head" else self.widths[0])
            self.k_norm = make_norm(config, self.head_dim if self.qk_norm == "head" else self.widths[1])

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.widths, dim=2)
        if self.qk_norm == "width":  # OLMo 2: all heads' queries (keys) normalised together
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        mask, is_causal = attention_mask(T, k.shape[2], self.window, x.device, cache.positions(T) if cache is not None else None)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal, scale=self.scale,
            enable_gqa=self.n_kv_head != self.n_head,  # query head i reads key/value head i // (n_head / n_kv_head)
        )
        y = y.transpose(1, 2).contiguous().view(B, T, self.widths[0])
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden, bias = config.mlp_width, config.biases[2]
        # The gated MLPs' gate and up projections are one matmul, split after.
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.kind in ("swiglu", "geglu") else hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "geglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.gelu(gate, approximate="tanh") * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU, so exported weights match HF exactly
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        # Without pre-norm (OLMo 2) ln_1 and ln_2 hold nothing, so the state dict has no such names.
        self.ln_1 = make_norm(config, config.n_embd) if config.pre_norm else nn.Identity()
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd) if config.pre_norm else nn.Identity()
        self.mlp = MLP(config)
        self.post_norm = config.post_norm
        if config.post_norm:
            self.post_attn_norm = make_norm(config, config.n_embd)
            self.post_mlp_norm = make_norm(config, config.n_embd)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        h = self.attn(self.ln_1(x), rope, cache, layer)
        x = x + (self.post_attn_norm(h) if self.post_norm else h)
        h = self.mlp(self.ln_2(x))
        return x + (self.post_mlp_norm(h) if self.post_norm else h)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("vocab_size is unset: set it to the tokenizer's vocabulary size (or larger)")
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_embedding == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        layers.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        )
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.layer_rope = [config.layer_rope(i) for i in range(config.n_layer)]  # "global", "local" or None per layer
        # Not parameters and not saved: derived from the config, rebuilt on load.
        if "global" in self.layer_rope:
            cos, sin = rope_tables(config, config.rope_theta, config.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if "local" in self.layer_rope:
            cos, sin = rope_tables(config, config.rope_local_theta, None)
            self.register_buffer("rope_local_cos", cos, persistent=False)
            self.register_buffer("rope_local_sin", sin, persistent=False)
        self.activation_checkpointing = False  # recompute each block in backward instead of storing activations
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    # Each block starts as the identity and grows from there (modded-nanoGPT, nanochat).
                    nn.init.zeros_(p)
                else:
                    # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the residual
                    # stream's variance does not grow with depth.
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init_proj and not config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)  # uniform predictions at step 0

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied head counted once). With ``non_embedding``, without the tables that
        are only looked up, never multiplied: learned positions, and the token embedding when the head
        is untied (a tied one is the head's matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM paper's appendix B:
        6 per matmul parameter, plus attention's scores and weighted values over ``seq_len`` keys
        (n_head * head_size wide, whatever the number of key/value heads)."""
        cfg = self.config
        t = seq_len or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * t

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
        target_weights: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` of shape ``(B, T)``.

        With a ``cache``, ``idx`` continues the sequence already in it, at positions from
        ``cache.length``, and the cache is advanced. With ``last_only``, logits of the last position
        only, ``(B, 1, vocab_size)``: generation needs no others, and the head is the largest matmul
        of a prefill.

        With ``targets`` ``(B, T)``, no logits but the training loss: ``(loss, losses)``, the sum of
        ``target_weights * losses`` (default: the mean) and the per-position cross-entropies ``(B * T,)``,
        computed a slice of positions at a time (head_loss.py), so that the batch's logits never exist whole.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        positions = cache.positions(T) if cache is not None else None
        if positions is not None:
            start = int(positions.max()) + 1 - T
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        x = self.transformer.wte(idx)
        if self.config.embed_scale is not None:
            # Rounded to the embedding's dtype first, as Gemma does (in bf16 sqrt(1152) = 33.94 becomes 34).
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype, device=x.device)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device) if positions is None else positions)
        at = slice(start, start + T) if positions is None else positions
        ropes = {None: None}
        if "global" in self.layer_rope:
            ropes["global"] = (self.rope_cos[at], self.rope_sin[at])
        if "local" in self.layer_rope:
            ropes["local"] = (self.rope_local_cos[at], self.rope_local_sin[at])
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            rope = ropes[self.layer_rope[i]]
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache, i)
        if cache is not None:
            cache.length += T
            if cache.lengths is not None:
                cache.lengths = cache.lengths + T
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        if targets is not None:
            weights = None if target_weights is None else target_weights.reshape(-1)
            # The head's weight is read inside forward, where FSDP has gathered it.
            return head_cross_entropy(
                x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), weights, self.config.logit_softcap
            )
        logits = self.lm_head(x)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits
