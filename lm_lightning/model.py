"""A decoder-only Transformer in plain PyTorch: GPT-2 by default, Llama / Qwen3 / modded-nanoGPT
style by configuration.

This file imports nothing but torch, so the model can be read, tested and exported on its own.
Every block is pre-norm: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``. Attention runs through
``F.scaled_dot_product_attention``, which picks a fused flash or memory-efficient kernel where the
device has one. The defaults of :class:`GPTConfig` are GPT-2's architecture (learned positions,
LayerNorm, a GELU MLP, biases, an output head tied to the token embedding), so a checkpoint written
before the other choices existed loads with the same parameter names and gives the same logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHOICES = {
    "pos_embedding": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu", "relu2"),
}


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
    """Attention (query) heads per block; n_embd must be a multiple of it."""
    n_embd: int = 256
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention weights and residual branches (0 = off)."""
    bias: bool = True
    """Biases in the linear layers and LayerNorms (GPT-2 has them; Llama and Qwen3 do not)."""
    pos_embedding: Literal["learned", "rope"] = "learned"
    """Positions: a learned table of block_size rows (GPT-2) or rotary embeddings on queries and keys (rope)."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding's frequencies (with pos_embedding=rope)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation layer everywhere (blocks, final norm, qk_norm): LayerNorm (GPT-2) or RMSNorm (Llama)."""
    norm_eps: float = 1e-5
    """Epsilon of every normalisation layer."""
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    """MLP of the blocks: GELU (GPT-2), SwiGLU (Llama, Qwen3) or squared ReLU (modded-nanoGPT)."""
    mlp_hidden: int | None = None
    """MLP hidden width; unset = 4 * n_embd (gelu, relu2), or 8/3 * n_embd rounded up to a multiple of 64 (swiglu)."""
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

    def __post_init__(self) -> None:
        for name in ("block_size", "n_layer", "n_head", "n_embd", "vocab_size", "mlp_hidden", "n_kv_head"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive integer")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not a choice; choose one of {', '.join(choices)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"choose n_embd as a multiple of n_head (e.g. {self.n_head * max(1, round(self.n_embd / self.n_head))})"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                "choose n_kv_head as a divisor of n_head (1 = multi-query, unset = n_head)"
            )
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ValueError(
                f"pos_embedding=rope needs an even head size, but n_embd / n_head = {self.head_dim}; "
                "change n_embd or n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"logit_softcap={self.logit_softcap} must be positive (unset it to turn soft-capping off)")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

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
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd


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
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        if max_len > config.block_size:
            raise ValueError(f"cache length {max_len} exceeds block_size={config.block_size}")
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys and values for ``layer``; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def expand(self, batch_size: int) -> None:
        """Copy the one sequence cached so far to ``batch_size`` rows: samples of one prompt prefill it once."""
        self.keys = self.keys.expand(-1, batch_size, -1, -1, -1).contiguous()
        self.values = self.values.expand(-1, batch_size, -1, -1, -1).contiguous()


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed in its weight's dtype. Under CPU autocast the input arrives in bfloat16 while the
    weight stays float32, and torch's fused kernel needs the two alike (else a slower path, and a warning); the
    statistics are then taken in float32, as autocast does for LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def make_norm(config: GPTConfig, size: int) -> nn.Module:
    """The configured normalisation over the last ``size`` features."""
    if config.norm == "rmsnorm":
        return RMSNorm(size, eps=config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines ``(block_size, head_dim / 2)`` of the rotary embedding, in float32.

    Frequency ``i`` turns by ``theta ** (-2i / head_dim)`` radians per position, computed as
    transformers' Llama does so exported models give the same logits.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, T, heads, head_dim)`` by position; ``cos``, ``sin``: ``(T, head_dim / 2)``.

    Pairs are (i, i + head_dim / 2), the two halves of the head (transformers' ``rotate_half``,
    not interleaved), so Llama and Qwen3 weights need no permutation.
    """
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.dropout = config.dropout
        # One matmul for queries, keys and values (fewer, larger kernels); with grouped-query
        # attention the key and value parts are n_kv_head heads wide.
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = make_norm(config, self.head_dim)
            self.k_norm = make_norm(config, self.head_dim)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape
        sizes = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim)
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in self.c_attn(x).split(sizes, dim=2))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mask = None
        is_causal = True
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
            if past > 0:
                # New queries sit at positions past..past+T-1 and may see every key up to their own.
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal,
            enable_gqa=self.n_kv_head != self.n_head,  # query head i reads key/value head i // (n_head / n_kv_head)
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.mlp_width
        # SwiGLU's gate and up projections are one matmul, split after.
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU, so exported weights match HF exactly
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


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
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        )
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.pos_embedding == "rope":
            # Not parameters and not saved: derived from the config, rebuilt on load.
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
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
        (n_head * head_dim = n_embd wide, whatever the number of key/value heads)."""
        cfg = self.config
        t = seq_len or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * t

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` of shape ``(B, T)``.

        With a ``cache``, ``idx`` continues the sequence already in it, at positions from
        ``cache.length``, and the cache is advanced. With ``last_only``, logits of the last position
        only, ``(B, 1, vocab_size)``: generation needs no others, and the head is the largest matmul
        of a prefill.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        x = self.transformer.wte(idx)
        rope = None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache, i)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.transformer.ln_f(x))
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits
