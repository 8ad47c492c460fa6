"""The optimizer: AdamW alone, or Muon for the blocks' matrices with AdamW for everything else.

Imports nothing but torch (and the model's layout). Lightning's automatic optimization steps one
optimizer, so the Muon + AdamW pair is one :class:`torch.optim.Optimizer` whose parameter groups are
both optimizers' groups: a learning-rate scheduler scales every group, and one ``state_dict`` holds
both states, so checkpoints and exact resume work as with AdamW alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn as nn

from lm_lightning.model import GPT

OPTIMIZERS = ("adamw", "muon")


def _orthogonalize(updates: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Newton-Schulz orthogonalisation of a stack of matrices of one shape ``(n, rows, cols)``, rows <= cols, in
    bf16: ``torch.optim.Muon``'s iteration (same coefficients, normalisation and steps) as batched matmuls, so
    matrices of one shape cost one kernel per product instead of one each."""
    a, b, c = coefficients
    x = updates.bfloat16()
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


@torch.no_grad()
def muon_step(group: dict[str, Any], state: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
    """One step of ``torch.optim.Muon`` over ``group`` (its hyperparameters, its ``momentum_buffer`` state, the
    same update), with the matrices of one orientation-normalised shape orthogonalised together.

    torch's Muon orthogonalises one matrix at a time: at width 128 that is most of a step's optimizer time,
    spent in small kernels (benchmarks/muon_step.py)."""
    lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
    by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for p in group["params"]:
        if p.grad is None:
            continue
        buf = state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad, memory_format=torch.preserve_format))
        buf.lerp_(p.grad, 1 - momentum)
        update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
        tall = p.size(0) > p.size(1)
        by_shape.setdefault(tuple(update.mT.shape if tall else update.shape), []).append((p, update.mT if tall else update))
    for pairs in by_shape.values():
        ortho = _orthogonalize(torch.stack([u for _, u in pairs]), group["ns_coefficients"], group["ns_steps"], group["eps"])
        for (p, _), o in zip(pairs, ortho):
            rows, cols = p.shape
            p.mul_(1 - lr * wd)  # decoupled decay with the unadjusted rate, as torch's Muon
            p.add_(o.mT if rows > cols else o, alpha=-lr * math.sqrt(max(1, rows / cols)))


class MuonAdamW(torch.optim.Optimizer):
    """Muon over ``muon_groups`` and ``torch.optim.AdamW`` over ``adamw_groups``, as one optimizer. Muon is
    ``torch.optim.Muon``'s groups, defaults and state, stepped by :func:`muon_step` (batched by shape).

    ``param_groups`` is AdamW's groups then Muon's (the same dicts the two optimizers read; AdamW's
    first, so ``param_groups[0]["lr"]`` is ``learning_rate`` times the schedule, as with AdamW alone), and
    ``state`` is one mapping shared by both (their parameters are disjoint), so the base class's
    ``zero_grad``, ``state_dict`` and ``load_state_dict`` cover both.
    """

    def __init__(
        self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], muon: dict[str, Any], adamw: dict[str, Any]
    ):
        """``muon`` and ``adamw``: keyword arguments of ``torch.optim.Muon`` and ``torch.optim.AdamW``."""
        self.muon = torch.optim.Muon(muon_groups, **muon)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        self.n_adamw_groups = len(self.adamw.param_groups)
        super().__init__(self.adamw.param_groups + self.muon.param_groups, defaults={})
        self._share()

    def _share(self) -> None:
        """Point the two optimizers at this one's groups and state (again after ``load_state_dict`` replaced them)."""
        self.adamw.param_groups = self.param_groups[: self.n_adamw_groups]
        self.muon.param_groups = self.param_groups[self.n_adamw_groups :]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of both optimizers; ``closure`` (forward and backward) runs once, before them."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.muon.param_groups:
            muon_step(group, self.state)
        self.adamw.step()
        return loss


def _block_matrices(model: GPT) -> Iterator[tuple[str, nn.Parameter]]:
    """The weights of the linear layers inside the blocks: the hidden matrices Muon is made for."""
    for name, module in model.transformer.h.named_modules(prefix="transformer.h"):
        if isinstance(module, nn.Linear):
            yield f"{name}.weight", module.weight


def build_optimizer(
    model: GPT,
    optimizer: Literal["adamw", "muon"] = "adamw",
    learning_rate: float = 1e-3,
    muon_lr: float = 0.02,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool = False,
    muon_weight_decay: float | None = None,
) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s trainable parameters.

    ``adamw``: AdamW at ``learning_rate``, weight decay on matrices only (not on biases, norms or
    embeddings, as GPT-2 and nanoGPT), ``fused`` where the caller knows the device and precision allow it.
    ``muon``: Muon at ``muon_lr`` (Keller Jordan's lr scale, momentum 0.95, Nesterov, 5 Newton–Schulz
    steps) for the weights of the blocks' linear layers, with ``muon_weight_decay`` (unset: ``weight_decay``;
    at Muon's ~10x larger learning rate the same value shrinks the matrices ~10x faster); AdamW as above for
    embeddings, the head, norms and biases. Weight decay is decoupled in both (``p -= lr * wd * p``).
    A scheduler's factor multiplies every group's learning rate.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not a choice; choose one of {', '.join(OPTIMIZERS)}")
    adamw = dict(lr=learning_rate, betas=tuple(betas), fused=fused)
    muon_params: list[nn.Parameter] = []
    if optimizer == "muon":
        for name, p in _block_matrices(model):
            if p.requires_grad:
                if p.dim() != 2:  # e.g. parameters flattened by FSDP
                    raise ValueError(
                        f"optimizer=muon needs whole 2-D matrices, but {name} has shape {tuple(p.shape)}; "
                        "use optimizer=adamw (or a strategy that keeps parameters whole, such as DDP)"
                    )
                muon_params.append(p)
    taken = {id(p) for p in muon_params}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in taken:
            (decay if p.dim() >= 2 and "wte" not in name and "wpe" not in name else no_decay).append(p)
    adamw_groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "adamw":
        return torch.optim.AdamW(adamw_groups, **adamw)
    muon_wd = weight_decay if muon_weight_decay is None else muon_weight_decay
    muon = dict(lr=muon_lr, weight_decay=muon_wd, momentum=0.95, nesterov=True)
    return MuonAdamW([{"params": muon_params}], adamw_groups, muon=muon, adamw=adamw)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear from 0 over ``warmup_steps``, then cosine down to ``min_ratio`` at ``total_steps``."""

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule
