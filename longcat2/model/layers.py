"""Small building blocks: RMSNorm, SwiGLU MLP, RoPE with DeepSeek-YaRN.

Design choices:
- RMSNorm normalises in fp32 and casts back before the weight multiply (the transformers convention, so
  bf16 logits match the reference bit-for-bit in spirit and fp32 logits match to rounding). It runs as
  `F.rms_norm` (one fused op instead of five; a decode step is dispatch-bound on CPU): with the weight
  inside for fp32, outside (after the cast) otherwise, which is the same arithmetic.
- RoPE returns per-pair angles (cos/sin of shape [..., rope_dim/2]), computed in fp32 and cast once per
  forward to the activation dtype (every layer then rotates without casting again); `apply_rope` rotates either
  interleaved pairs (x0,x1),(x2,x3)... (MLA and the LongCat indexer) or half-split pairs (x_i, x_{i+d/2})
  (the DeepSeek-V3.2 indexer). Both write the rotated pairs out as [first-of-pair | second-of-pair]:
  the same permutation on queries and keys, so dot products equal the textbook rotation.
- DeepSeek-YaRN: inverse frequencies blended between interpolation and extrapolation with a linear ramp over
  the correction range from beta_fast/beta_slow; cos/sin scaled by mscale(factor, mscale)/mscale(factor,
  mscale_all_dim) (1 for the released configs); the softmax scale gets mscale(factor, mscale_all_dim)^2
  (see ModelConfig.softmax_scale).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longcat2.config import ModelConfig, yarn_mscale

INDEXER_NORM_EPS = 1e-6  # indexer k_norm (as DeepSeek-V3.2 and transformers)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the rope dims and the cos/sin multiplier (DeepSeek-YaRN when configured)."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    inv_freq_extra = 1.0 / pos_freqs
    rs = cfg.yarn
    if rs is None:
        return inv_freq_extra, 1.0
    factor = float(rs["factor"])
    orig = float(rs["original_max_position_embeddings"])
    beta_fast = float(rs.get("beta_fast") or 32)
    beta_slow = float(rs.get("beta_slow") or 1)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extra_weight = 1.0 - ramp  # 1 → keep the original frequency (high-frequency dims)
    inv_freq = (inv_freq_extra / factor) * (1 - extra_weight) + inv_freq_extra * extra_weight
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all:
        attn_factor = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all))
    else:
        attn_factor = yarn_mscale(factor)
    return inv_freq, float(attn_factor)


class RotaryEmbedding(nn.Module):
    """Maps positions [B, T] (or [T]) to (cos, sin) of shape [B, T, rope_dim/2] in fp32.

    inv_freq is a plain fp32 CPU tensor, not a buffer: it survives meta-device construction and is never
    cast to a low-precision model dtype."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inv_freq, self.attn_factor = rope_inv_freq(cfg)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ cos, sin [..., T, r/2], cast to `dtype` (the activations') when given."""
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)  # [..., T, r/2]
        cos, sin = angles.cos() * self.attn_factor, angles.sin() * self.attn_factor
        return (cos, sin) if dtype in (None, cos.dtype) else (cos.to(dtype), sin.to(dtype))


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True
) -> torch.Tensor:
    """Rotate the last dim of x [B, T, r] or [B, T, heads, r] with cos/sin [(B,) T, r/2]."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if interleave:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
    if cos.dtype != x.dtype:  # (cos/sin normally arrive in the activation dtype already)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
