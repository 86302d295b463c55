"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from pretrain.config import TrainConfig
from pretrain.hardware import native_bf16
from pretrain.models.spec import spec_of


class MultiOptimizer:
    """Several optimizers stepped as one (e.g. Muon for hidden matrices + AdamW for the rest).

    ``param_groups`` is the concatenation of the parts' groups, so a schedule can set every group's lr;
    ``state_dict`` / ``load_state_dict`` save and restore every part.
    """

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts

    @property
    def param_groups(self):
        return [g for p in self.parts for g in p.param_groups]

    @property
    def state(self):
        out = {}
        for p in self.parts:
            out.update(p.state)
        return out

    def step(self, closure=None):
        for p in self.parts:
            p.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parts:
            p.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"parts": [p.state_dict() for p in self.parts]}

    def load_state_dict(self, state_dict) -> None:
        parts = state_dict.get("parts")
        if parts is None or len(parts) != len(self.parts):
            raise ValueError("optimizer state does not match this optimizer (different train.optimizer?)")
        for p, s in zip(self.parts, parts):
            p.load_state_dict(s)


def zeropower_newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize a matrix (U V^T of its SVD) with a quintic Newton-Schulz iteration
    (Keller Jordan's Muon coefficients). bf16 on CUDA and on CPUs with native bf16; fp32 on other CPUs,
    where bf16 matrix products are emulated and many times slower."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if native_bf16(g.device) else g.float()
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        m = x @ x.mT
        x = a * x + (b * m + c * m @ m) @ x
    return (x.mT if transposed else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D hidden-layer weights.

    Nesterov momentum, then the update is orthogonalized and scaled by sqrt(max(1, rows/cols)); decoupled
    weight decay. Written here (rather than torch.optim.Muon) so the orthogonalization runs in fp32 on
    CPUs without native bf16 and the same code runs on torch 2.11+.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps))

    BATCH_ELEMENTS = 1 << 26
    """At most this many elements (64M) go through one batched Newton-Schulz (its temporaries grow with
    them)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            # matrices of one shape (dtype, device) are orthogonalized together, in one batched Newton-Schulz:
            # the same arithmetic per matrix in a fraction of the operator calls, which dominate on a CPU
            same: dict[tuple[Any, ...], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    same.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            for (shape, _, _), params in same.items():
                per = max(1, self.BATCH_ELEMENTS // math.prod(shape))
                for i in range(0, len(params), per):
                    self._update(params[i:i + per], shape, group)

    def _update(self, params: list[torch.Tensor], shape: tuple[int, ...], group: dict[str, Any]) -> None:
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        grads = [p.grad for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
        updates = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
        stacked = zeropower_newton_schulz(torch.stack(updates), group["ns_steps"])
        stacked *= max(1.0, shape[-2] / shape[-1]) ** 0.5
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, list(stacked.unbind(0)), alpha=-group["lr"])


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices (dim >= 2) only; norms' gains are not decayed.

    With ``train.optimizer: muon`` the hidden-layer matrices use Muon (orthogonalized momentum, learning
    rate ``train.muon_lr``) and embeddings, output head and gains keep AdamW. Each group remembers its
    peak lr as ``base_lr``; the schedule scales it.
    """
    named, seen = [], set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            named.append((name, p))
    spec = spec_of(model)
    extra = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}  # one kernel per step
    adam_params = named
    parts: list[torch.optim.Optimizer] = []
    if cfg.optimizer == "muon":
        hidden = [p for n, p in named if spec.is_hidden_matrix(n, p)]
        adam_params = [(n, p) for n, p in named if not spec.is_hidden_matrix(n, p)]
        parts.append(Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay))
    decay = [p for n, p in adam_params if spec.decays(n, p)]
    no_decay = [p for n, p in adam_params if not spec.decays(n, p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    parts.insert(0, torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), eps=1e-8, **extra))
    for opt in parts:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return parts[0] if len(parts) == 1 else MultiOptimizer(parts)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig, time_frac: float = 0.0) -> float:
    """Scale every group's peak lr by the schedule at ``step`` (and ``time_frac``, see lr_at); returns the
    main (AdamW) lr."""
    scale = lr_at(step, cfg, time_frac) / cfg.lr
    scale_lr(optimizer, scale)
    return cfg.lr * scale


def scale_lr(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """Every parameter group's lr = its peak (``base_lr``) x ``scale``."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * scale


def lr_at(step: int, cfg: TrainConfig, time_frac: float = 0.0) -> float:
    """Learning rate of pre-training's optimizer step ``step`` (0-based): :func:`schedule` with the train
    config."""
    return schedule(step, cfg.lr, cfg.lr * cfg.min_lr_ratio, cfg.warmup_steps, cfg.max_steps, cfg.schedule,
                    cfg.decay_frac, time_frac)


def schedule(step: int, peak: float, floor: float, warmup: int, total: int, kind: str = "cosine",
             decay_frac: float = 0.2, time_frac: float = 0.0) -> float:
    """The learning rate at optimizer step ``step`` (0-based) of ``total``: linear warmup over ``warmup``
    steps, then ``kind``: 'cosine' (to ``floor`` at ``total``), 'linear' (likewise, in a straight line), 'wsd'
    (hold the peak, then decay linearly over the last ``decay_frac``) or 'constant'. Pre-training and
    fine-tuning (linear to 0) both take their schedule from here.

    ``time_frac`` (train.time_schedule: the fraction of the time budget spent) moves the decay on when
    time runs out before the steps do: after the warmup (always in steps) the lr is the lower of the
    schedule at ``step`` and the schedule at that fraction of training."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    by_steps = _decayed(step, peak, floor, warmup, total, kind, decay_frac)
    if time_frac <= 0.0:
        return by_steps
    tf = min(1.0, time_frac)
    if kind == "cosine":
        by_time = floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * tf))
    elif kind == "linear":
        by_time = floor + (peak - floor) * (1.0 - tf)
    else:  # wsd: the decay takes the last decay_frac of the time
        by_time = peak + (floor - peak) * max(0.0, (tf - (1.0 - decay_frac)) / decay_frac)
    return min(by_steps, by_time)


def _decayed(step: int, peak: float, floor: float, warmup: int, total: int, kind: str,
             decay_frac: float) -> float:
    if kind == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return floor + (peak - floor) * max(0.0, (total - step) / max(total - warmup, 1))
    # wsd: hold the peak, then decay linearly to the floor over the last decay_frac of training
    decay_steps = max(1, int(total * decay_frac))
    decay_start = total - decay_steps
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / decay_steps)
    return peak + (floor - peak) * progress
