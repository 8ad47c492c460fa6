"""The output head and its cross-entropy, a slice of positions at a time, so that the logits of the
whole batch never exist at once.

The logits are the largest tensors of a training step: batch 8 x 256 positions x GPT-2's 50,257
tokens is 412 MB in fp32, and the plain ``cross_entropy(head(x))`` keeps the logits, their log-softmax
and then their gradient (three of them at the peak of the backward pass), more than the whole
124M model's weights, gradients and AdamW state when only adapters train. Here each slice's gradient
with respect to the hidden states and the head's weight is computed in the forward pass, where its
softmax is at hand, and the slice's logits are dropped: the backward pass only scales what was kept
(Liger Kernel's fused linear cross-entropy does the same in Triton). The FLOPs are those of the plain
head (one matmul forward, two for the gradients); no logit is computed twice.

This file imports nothing but torch, like model.py, which calls it from ``GPT.forward``; ``torch.compile`` traces
the autograd Function with the blocks, without a graph break.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SLICE_ELEMENTS = 2**24
"""The most logits in a slice (64 MB in fp32)."""

CACHED_SLICE_ELEMENTS = 2**20
"""The fewest logits in a slice (4 MB in fp32), for a small vocabulary, where ``n_embd`` rows would make slices so
small that their per-slice work shows (a 1024 x 256 head over 1024 positions: 3.5 ms at 256 rows, 3.2 ms in one)."""


def slice_rows(vocab_size: int, n_embd: int) -> int:
    """Positions per slice: ``n_embd``, so that a slice has as many logits as the head's weight has elements,
    at least ``CACHED_SLICE_ELEMENTS`` and at most ``SLICE_ELEMENTS`` logits.

    Every slice reads the whole weight, so its matmul needs enough rows to amortise that read; beyond
    that, a slice whose logits stay in the CPU's cache between the matmul, the log-softmax and the
    gradient is faster than a larger one. Measured on 2 Zen 4 cores (benchmarks/head_slices.py): a
    8192 x 128 head over 1024 positions, without gradients, takes 21-25 ms in slices of 128 rows against 32-35 ms
    in one; the speedrun's validation (34 such batches) went from 1.5-1.7 s to 1.1-1.35 s.
    """
    return max(1, min(max(n_embd, CACHED_SLICE_ELEMENTS // vocab_size), SLICE_ELEMENTS // vocab_size))


def _slices(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    target_weights: torch.Tensor,
    softcap: float | None,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-position losses and, where asked, the gradients of ``sum(target_weights * losses)``."""
    n = hidden.size(0)
    rows = slice_rows(*weight.shape)
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    # Summed over slices in fp32 whatever the matmul's dtype (autocast's bf16 is rounded once per slice).
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
    for start in range(0, n, rows):
        h, t = hidden[start : start + rows], targets[start : start + rows, None]
        z = F.linear(h, weight)  # under autocast, in its dtype, as nn.Linear would be
        logits = z.float()
        if softcap is not None:
            capped = torch.tanh(logits / softcap)
            logits = softcap * capped
        log_probs = torch.log_softmax(logits, dim=-1)
        losses[start : start + rows] = -log_probs.gather(1, t).squeeze(1)
        if not (grad_hidden or grad_weight):
            continue
        # d loss / d logits = softmax - one_hot(target), in place of the log-probabilities; each position's
        # weight multiplies the (N, n_embd) sides of the matmuls below, not the (N, vocab_size) gradient.
        grad = log_probs.exp_()
        grad.scatter_add_(1, t, torch.full_like(t, -1, dtype=grad.dtype))
        if softcap is not None:
            grad.mul_(1 - capped * capped)  # d(softcap * tanh(z / softcap)) / dz
        grad = grad.to(z.dtype)
        w = target_weights[start : start + rows, None]
        if grad_hidden:
            d_hidden[start : start + rows] = (grad @ weight.to(z.dtype)) * w
        if grad_weight:
            h = (h * w).to(z.dtype)
            if grad.dtype == d_weight.dtype:
                d_weight.addmm_(grad.t(), h)
            else:  # autocast's bf16: a product per slice, summed in fp32
                d_weight += grad.t() @ h
    return losses, d_hidden, d_weight


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, target_weights, softcap):
        losses, d_hidden, d_weight = _slices(
            hidden, weight, targets, target_weights, softcap, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(losses)
        return (losses * target_weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_loss, _grad_losses):
        d_hidden, d_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        d_hidden = None if d_hidden is None else (d_hidden * grad_loss).to(hidden_dtype)
        d_weight = None if d_weight is None else (d_weight * grad_loss).to(weight_dtype)
        return d_hidden, d_weight, None, None, None


def head_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    target_weights: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the head ``hidden @ weight.T`` (optionally soft-capped) against ``targets``.

    ``hidden`` is ``(N, n_embd)``, ``weight`` ``(vocab_size, n_embd)``, ``targets`` ``(N,)``. Returns
    ``(loss, losses)``: ``loss = sum(target_weights * losses)``, differentiable (``target_weights``
    defaults to ``1 / N``: the mean), and the per-position losses in fp32, not differentiable.
    """
    if target_weights is None:
        target_weights = torch.full(targets.shape, 1 / max(targets.numel(), 1), device=hidden.device)
    target_weights = target_weights.float()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _HeadCrossEntropy.apply(hidden, weight, targets, target_weights, softcap)
    losses = _slices(hidden, weight, targets, target_weights, softcap, False, False)[0]
    return (losses * target_weights).sum(), losses
