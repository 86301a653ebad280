"""Optimizers and learning-rate schedules: Muon for hidden matrices, AdamW for the rest, one object.

Design choices:
- One `torch.optim.Optimizer` (`MuonAdamW`) holds both kinds of parameter group (`group["muon"]` says
  which), so the trainer has one `step()`, one `zero_grad()`, one `state_dict()` to checkpoint and one set of
  learning rates for the schedule to scale.
- Muon (Jordan et al. 2024; Moonlight, Liu et al. 2025): SGD momentum (Nesterov by default), then the
  update is orthogonalised with the quintic Newton–Schulz iteration (coefficients 3.4445, −4.7750, 2.0315;
  5 steps), which maps G = U S Vᵀ to ≈ U Vᵀ (singular values land in ~[0.7, 1.2], not exactly 1 — that is
  the point of those coefficients: fast, good enough). The iteration is batched over leading dimensions, so
  stacked expert weights [E, out, in] are orthogonalised *per expert matrix*, never as one big matrix.
- Update scale follows Moonlight: `0.2 · sqrt(max(out, in))` times the orthogonalised update, which gives
  Muon updates the RMS (≈0.2) of AdamW updates, so one learning rate and one weight decay work for both
  groups (`--muon-lr` can still differ). Decoupled weight decay (p ← p·(1 − lr·wd)) in both.
- Newton–Schulz runs in bf16 (as in the reference implementation; its error is far below the iteration's
  own ±30 % spread of singular values) wherever the device has bf16 GEMMs (accelerators; CPUs with
  AVX512-BF16/AMX, where they are 2–6× faster than fp32), and in fp32 on CPUs without them, where PyTorch's
  bf16 matmul is a fallback loop (measured on an AVX2-only EPYC: 3.2 s vs 0.10 s for an [8, 256, 512]
  stack; a training step with Muon took 23 s instead of ~0.5 s). The kernels are deterministic, so
  bit-exact resume is unaffected (the choice depends only on the device).
- `param_groups_for(model)` decides Muon vs AdamW by name and shape: Muon for ≥2-D hidden weights
  (attention, dense FFN, expert stacks, MTP projections, n-gram projections); AdamW for embeddings
  (word, MTP, n-gram tables), `lm_head`, the router classifier and everything 1-D (norms, biases). No weight
  decay on embeddings, n-gram tables and 1-D parameters.
- Schedules are pure functions of the step (`Schedule.factor(step)`): warmup (linear from 1/warmup) then
  `cosine` to `min_lr_ratio`, `wsd` (warmup-stable-decay: constant, then a linear decay over the last
  `decay_frac` of training) or `constant`. The trainer writes `base_lr · factor` into each group before each
  step, so resuming needs only the step counter.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from longcat2.train.env import bf16_supported

NS_COEFFS = (3.4445, -4.7750, 2.0315)


@functools.cache
def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 where `device` has bf16 GEMMs, else fp32 (see the module doc)."""
    return torch.bfloat16 if bf16_supported(device) else torch.float32


SCHEDULES = ("cosine", "wsd", "constant")


def newton_schulz(
    g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of `g` ([..., m, n]) → U Vᵀ with G = U S Vᵀ.

    Batched over leading dims (a stacked expert tensor [E, out, in] gets one orthogonalisation per expert).
    Returns a tensor of `g`'s dtype.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz: need a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.to(dtype or g.dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide orientation: X Xᵀ is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with `muon=True`, AdamW for the others.

    Muon group keys: lr, weight_decay, momentum, nesterov, ns_steps.
    AdamW group keys: lr, weight_decay, betas, eps.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            betas=betas,
            eps=eps,
            muon=False,
        )
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict[str, Any]) -> None:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.mul_(beta).add_(g)
            upd = g.add(buf, alpha=beta) if group["nesterov"] else buf
            upd = newton_schulz(upd, steps=group["ns_steps"], dtype=newton_schulz_dtype(p.device))
            scale = 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))
            if wd:
                p.mul_(1.0 - lr * wd)
            p.add_(upd.to(p.dtype), alpha=-lr * scale)

    def _adamw_group(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        # Parameters that share a step count are updated with one set of foreach kernels.
        by_step: dict[int, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            by_step.setdefault(int(state["step"].item()), []).append(p)
        for step, params in by_step.items():
            grads = [p.grad for p in params]
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_lerp_(m, grads, 1.0 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
            bc1 = 1.0 - beta1**step
            bc2 = 1.0 - beta2**step
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(bc2))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, value=-lr / bc1)


# ---------------------------------------------------------------------- parameter grouping
_ADAM_NO_DECAY_MARKERS = ("embed_tokens", "ngram_embeddings.embedders")
_ADAM_DECAY_MARKERS = ("lm_head", "router.classifier")


def classify(name: str, p: torch.Tensor) -> str:
    """'muon' | 'adamw' (with weight decay) | 'adamw_no_decay' for one named parameter."""
    if p.ndim < 2 or any(m in name for m in _ADAM_NO_DECAY_MARKERS):
        return "adamw_no_decay"
    if any(m in name for m in _ADAM_DECAY_MARKERS):
        return "adamw"
    return "muon"


def param_groups_for(
    model: nn.Module,
    lr: float,
    muon_lr: float | None = None,
    weight_decay: float = 0.1,
    use_muon: bool = True,
) -> list[dict[str, Any]]:
    """Build `MuonAdamW` parameter groups; `base_lr` is stored per group for the schedule."""
    buckets: dict[str, list[torch.Tensor]] = {"muon": [], "adamw": [], "adamw_no_decay": []}
    names: dict[str, list[str]] = {k: [] for k in buckets}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        kind = classify(name, p)
        if kind == "muon" and not use_muon:
            kind = "adamw"
        buckets[kind].append(p)
        names[kind].append(name)
    mlr = lr if muon_lr is None else muon_lr
    settings = {  # bucket → (is Muon, peak LR, weight decay)
        "muon": (True, mlr, weight_decay),
        "adamw": (False, lr, weight_decay),
        "adamw_no_decay": (False, lr, 0.0),
    }
    groups: list[dict[str, Any]] = []
    for kind, (muon, group_lr, wd) in settings.items():
        if buckets[kind]:
            groups.append(
                dict(
                    params=buckets[kind],
                    names=names[kind],
                    muon=muon,
                    lr=group_lr,
                    base_lr=group_lr,
                    weight_decay=wd,
                )
            )
    return groups


# ---------------------------------------------------------------------- schedules
@dataclass
class Schedule:
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_frac: float = 0.2  # wsd: fraction of training spent decaying

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule: one of {SCHEDULES}, got {self.kind!r}")
        if self.total_steps <= 0:
            raise ValueError(f"steps: must be > 0, got {self.total_steps}")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ValueError(f"decay_frac: must be in [0, 1], got {self.decay_frac}")

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate for optimizer step `step` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        lo = self.min_lr_ratio
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
        # wsd
        decay_steps = max(1, round(self.decay_frac * self.total_steps)) if self.decay_frac > 0 else 0
        decay_start = max(self.warmup_steps, self.total_steps - decay_steps)
        if decay_steps == 0 or step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, self.total_steps - decay_start))
        return 1.0 - (1.0 - lo) * progress


def apply_schedule(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
