"""Mixture of experts with zero-computation (identity) experts and a bias-corrected router.

Design choices:
- Router in fp32: softmax over routed + zero experts; `e_score_correction_bias` (a persistent fp32 buffer,
  updated by the trainer's aux-loss-free balancing, never by gradients) only shifts the *selection*;
  gates are the unbiased probabilities × `routed_scaling_factor`, not renormalised. Zero experts get the
  same scaled gate (transformers/vLLM/MLX convention).
- Routed experts are stacked parameters [E, out, in] (per-expert HF keys are split/merged by the checkpoint
  adapter). Tokens are sorted by expert and run as one grouped GEMM (`torch._grouped_mm`) when the device and
  dtype allow it, else as a loop over the contiguous per-expert segments of the sorted tokens: either way
  only experts that received tokens do work. The experts module is always called (even with no rows), so
  expert parallelism swaps only `experts` (see `longcat2.parallel.dispatch`): one MoE forward for one
  process and many.
- Zero experts cost nothing: their contribution is (Σ zero-expert gates) · x, added locally.
- The MoE records the last routing decision (`last_topk`, detached) for load statistics and bias control.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcat2.config import ModelConfig


class FP32Linear(nn.Linear):
    """A linear layer that always computes in fp32, whatever the dtype of its weight and input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.float() if self.bias is not None else None
        return F.linear(x.float(), self.weight.float(), b)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.n_routed_experts + cfg.zero_expert_num
        self.top_k = cfg.moe_topk
        self.scaling = cfg.routed_scaling_factor
        self.classifier = FP32Linear(cfg.hidden_size, self.num_experts, bias=cfg.router_bias)
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] → gates [N, k] fp32, expert ids [N, k], probs [N, E] fp32."""
        probs = self.classifier(x).softmax(dim=-1)
        with torch.no_grad():
            choice = probs + self.e_score_correction_bias  # (an fp32 buffer)
            ids = choice.topk(self.top_k, dim=-1).indices
        gates = probs.gather(1, ids) * self.scaling
        return gates, ids, probs


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
    align = 4 if x.dtype == torch.float32 else 8  # 16-byte aligned strides
    return all(d % align == 0 for d in w.shape[1:]) and w.dtype == x.dtype


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense (grouped_mm rejects stride-0 grads)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g.contiguous()


def _segment_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    parts = [seg @ weight[e].t() for e, seg in enumerate(x.split(counts)) if seg.shape[0]]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size
        self.num_experts = e
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, H] grouped by expert (counts [E]) → [M, H]."""
        offs = counts.cumsum(0).to(torch.int32)  # shared by the three grouped GEMMs
        g = linear_by_expert(x_sorted, self.gate_proj, counts, offs)
        u = linear_by_expert(x_sorted, self.up_proj, counts, offs)
        return linear_by_expert(F.silu(g) * u, self.down_proj, counts, offs)


def linear_by_expert(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, in] sorted by expert with `counts` [E] rows each; weight [E, out, in] → [M, out].
    `offs`: counts.cumsum(0) as int32, when the caller already has it."""
    if x.shape[0] == 0:  # no rows: still an output that depends on the weight (EP/FSDP need its gradient)
        return F.linear(x, weight[0])
    if _grouped_mm_ok(x, weight):
        if offs is None:
            offs = counts.cumsum(0).to(torch.int32)
        out = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
        return _ContiguousGrad.apply(out) if out.requires_grad else out  # (an autograd node costs ~10 µs)
    return _segment_linear(x, weight, counts.tolist())


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_routed = cfg.n_routed_experts
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.last_topk: torch.Tensor | None = None  # [N, k] expert ids of the last forward (detached)
        self.last_probs: torch.Tensor | None = None  # [N, E] router probabilities (with grad, for aux losses)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        gates, ids, probs = self.router(x)
        self.last_topk, self.last_probs = ids.detach(), probs
        k = ids.shape[1]
        n_dispatched = self.experts.num_experts  # expert ids the experts module serves; the rest are identity
        flat_ids = ids.reshape(-1)  # [N*k]
        flat_gates = gates.reshape(-1)
        # identity experts: Σ gates · x, computed locally
        zero_gate = (gates * (ids >= n_dispatched)).sum(-1, keepdim=True)  # [N, 1]
        out = (zero_gate * x.float()).to(x.dtype)
        # one stable sort groups the [N*k] choices by expert, positions ascending within an expert; the
        # dispatched experts' choices come first (identity experts have the largest ids)
        order = torch.sort(flat_ids, stable=True).indices
        counts_all = torch.bincount(flat_ids, minlength=self.router.num_experts)
        counts = counts_all[:n_dispatched]
        slot = order[: int(counts.sum())] if n_dispatched < self.router.num_experts else order
        token = slot // k
        y = self.experts(x[token], counts)  # [M, H]; always called (EP: every rank enters the collectives)
        y = y * flat_gates[slot].unsqueeze(-1).to(y.dtype)
        return out.index_add(0, token, y.to(out.dtype)).view(shape)
