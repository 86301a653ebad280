"""MoE training mechanics: zero-expert compute-budget control, device-level balance loss, z-loss, statistics.

Design choices:
- Budget control is the aux-loss-free bias update of longcat_spec.md §4.3, applied once per optimizer step
  to every MoE layer, for FFN (routed) experts only:
      Δb_i = μ · ( (K_e/K) · (1/N) − T_i / (K · T_all) ),   i < N = n_routed_experts
  T_i = routing slots given to expert i, T_all = tokens, K = moe_topk, K_e = target FFN experts per token.
  Summed over i the error is (K_e − F)/K (F = measured FFN experts per token), so the same update both
  evens the load across FFN experts and pushes the FFN share towards K_e/K; zero-expert biases stay fixed
  and absorb the rest. The bias accumulates the error (integral action); `μ` may follow the LR schedule
  (the "decay schedule on the update" of the report). Counts cover all micro-batches of the step and are
  summed across ranks (`all_reduce`), so every rank applies the identical update.
- The bias is a buffer (`router.e_score_correction_bias`, fp32): it is saved with the model weights and
  restored on resume, so budget control is part of the bit-exact resume.
- Device-level balance loss (DeepSeek-V2/V3 style, §4.3): FFN experts split into D contiguous groups (one
  per expert-parallel device), zero experts form group D+1; L = α · mean_layers Σ_g f'_g · P'_g with
  f'_g = mean over the group's experts of f_j = E/(K·T)·(slots of j) and P'_g = Σ_{j∈g} mean_t p_{t,j}.
  Off by default (α = 0).
- Hidden z-loss (§4.3): L_Z = λ · mean_t (logsumexp_i |h_{t,i}|)², on the last hidden state (fp32).
- Statistics come from what each `MoE` records (`last_topk`, `last_probs`) right after each forward:
  per-layer FFN counts, zero-expert slots, router entropy. `RoutingStats.summary()` gives the per-step
  numbers that go to metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from longcat2.model.moe import MoE


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


# ---------------------------------------------------------------------- statistics
@dataclass
class RoutingStats:
    """Accumulates routing decisions over the micro-batches of one optimizer step."""

    n_layers: int
    n_routed: int
    n_total: int
    top_k: int
    counts: torch.Tensor = field(init=False)  # [L, n_total] slots per expert (fp64 for exact sums)
    tokens: int = 0  # tokens per layer
    entropy_sum: float = 0.0  # Σ over layers and tokens of router entropy (nats)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.n_layers, self.n_total, dtype=torch.float64)

    @classmethod
    def for_model(cls, moes: list[MoE]) -> RoutingStats:
        m = moes[0]
        return cls(len(moes), m.n_routed, m.router.num_experts, m.router.top_k)

    def reset(self) -> None:
        self.counts.zero_()
        self.tokens = 0
        self.entropy_sum = 0.0

    @torch.no_grad()
    def record(self, moes: list[MoE]) -> None:
        """Read each MoE's last routing decision (call right after a forward)."""
        n = 0
        for i, m in enumerate(moes):
            if m.last_topk is None:
                continue
            ids = m.last_topk.reshape(-1)
            self.counts[i] += (
                torch.bincount(ids, minlength=self.n_total).to(self.counts.device, torch.float64).cpu()
            )
            n = m.last_topk.shape[0]
            if m.last_probs is not None:
                p = m.last_probs.detach().float()
                self.entropy_sum += float(-(p * torch.log(p.clamp_min(1e-30))).sum())
        self.tokens += n

    def all_reduce(self, reduce_fn) -> None:
        """Sum counts/tokens/entropy across ranks with `reduce_fn(tensor) -> tensor` (in place)."""
        packed = torch.cat(
            [
                self.counts.reshape(-1),
                torch.tensor([float(self.tokens), self.entropy_sum], dtype=torch.float64),
            ]
        )
        packed = reduce_fn(packed)
        self.counts = packed[:-2].reshape(self.n_layers, self.n_total)
        self.tokens = int(packed[-2].item())
        self.entropy_sum = float(packed[-1].item())

    def ffn_per_token(self) -> torch.Tensor:
        """[L] measured FFN (routed) experts per token."""
        if self.tokens == 0:
            return torch.zeros(self.n_layers, dtype=torch.float64)
        return self.counts[:, : self.n_routed].sum(-1) / self.tokens

    def summary(self, include_load: bool | None = None) -> dict[str, Any]:
        if self.tokens == 0:
            return {}
        ffn = self.ffn_per_token()
        routed = self.counts[:, : self.n_routed]
        mean = routed.mean(-1).clamp_min(1e-12)
        load = routed / mean[:, None]  # 1.0 = perfectly even among FFN experts
        out: dict[str, Any] = {
            "ffn_experts_per_token": round(float(ffn.mean()), 4),
            "ffn_experts_per_layer": [round(float(v), 3) for v in ffn],
            "expert_load_max": round(float(load.max(-1).values.mean()), 4),
            "expert_load_min": round(float(load.min(-1).values.mean()), 4),
            "expert_load_cv": round(float((routed.std(-1, unbiased=False) / mean).mean()), 4),
            "router_entropy": round(self.entropy_sum / (self.tokens * self.n_layers), 4),
        }
        if include_load is None:
            include_load = self.n_routed <= 64
        if include_load:  # load share per FFN expert, summed over layers (sums to 1)
            total = routed.sum().clamp_min(1e-12)
            out["expert_load"] = [round(float(v), 4) for v in routed.sum(0) / total]
        return out


# ---------------------------------------------------------------------- budget control
@dataclass
class BudgetController:
    """e_score_correction_bias update steering FFN experts per token to `target` (spec §4.3)."""

    target: float  # K_e
    rate: float  # μ

    @torch.no_grad()
    def update(self, moes: list[MoE], stats: RoutingStats, rate_scale: float = 1.0) -> None:
        if self.rate == 0.0 or stats.tokens == 0:
            return
        k, n = stats.top_k, stats.n_routed
        if n == 0:
            return
        target_share = (self.target / k) / n
        mu = self.rate * rate_scale
        for i, m in enumerate(moes):
            t_i = stats.counts[i, :n]
            delta = mu * (target_share - t_i / (k * stats.tokens))
            bias = m.router.e_score_correction_bias
            bias[:n] += delta.to(bias.device, bias.dtype)


def default_target(top_k: int, n_routed: int) -> float:
    """K_e default: 2/3 of the top-k (LongCat-2.0/Flash average ≈ 8 of 12, spec §6), at most n_routed."""
    return float(min(n_routed, round(top_k * 2 / 3, 3)))


# ---------------------------------------------------------------------- losses
def device_balance_loss(moes: list[MoE], n_groups: int) -> torch.Tensor:
    """DeepSeek-style device-level balance loss over D FFN groups + the zero-expert group (mean over layers)."""
    losses = []
    for m in moes:
        probs, ids = m.last_probs, m.last_topk
        if probs is None or ids is None:
            continue
        n_routed, n_total, k = m.n_routed, m.router.num_experts, m.router.top_k
        t = probs.shape[0]
        d = max(1, min(n_groups, n_routed)) if n_routed else 0
        group = torch.empty(n_total, dtype=torch.long, device=ids.device)
        if n_routed:
            group[:n_routed] = torch.arange(n_routed, device=ids.device) * d // n_routed
        group[n_routed:] = d
        n_g = d + 1 if n_total > n_routed else d
        sizes = torch.bincount(group, minlength=n_g).clamp_min(1).to(probs.dtype)
        slots = torch.bincount(ids.reshape(-1), minlength=n_total).to(probs.dtype)
        f = slots * n_total / (k * t)  # per expert, 1.0 = uniform
        f_g = torch.zeros(n_g, dtype=probs.dtype, device=probs.device).index_add(0, group, f) / sizes
        p_g = torch.zeros(n_g, dtype=probs.dtype, device=probs.device).index_add(0, group, probs.mean(0))
        losses.append((f_g.detach() * p_g).sum())
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()


def hidden_z_loss(hidden: torch.Tensor) -> torch.Tensor:
    """mean_t (logsumexp_i |h_{t,i}|)² over the last hidden state, in fp32 (multiply by λ outside)."""
    z = torch.logsumexp(hidden.float().abs(), dim=-1)
    return (z * z).mean()
