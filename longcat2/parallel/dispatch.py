"""Expert parallelism: token dispatch and combine with all-to-all, zero experts kept local.

Design choices:
- `MoE.forward` is the one MoE forward, for one process and many: it sorts its (token, slot) pairs by
  expert id and calls `experts(x_sorted, counts)`, always (also with no routed row: every rank must enter
  the same collectives, FSDP all-gather and both all-to-alls). Expert parallelism only swaps `mlp.experts`
  for `ExpertParallelExperts`, whose forward has the same signature: it sends each expert's rows to the
  rank owning the expert, runs the local experts, and sends the results back in the original order.
  Routed expert e lives on ep-rank e // (E / ep) (contiguous blocks), so rows sorted by expert id are
  already grouped by destination. Zero-computation (identity) experts are evaluated locally by the MoE as
  Σ gate · x: their slots never cross the network.
- `ZeroExpertsOverNetwork` (the measurement baseline that shows what keeping zero experts local saves) is a
  subclass that also takes the zero-expert slots and ships them to identity slots spread over the ranks;
  `parallelize` never installs it.
- Two all-to-alls per MoE call (dispatch, combine) plus one tiny all-to-all of per-expert counts; uneven
  splits and zero-row splits are normal. The token all-to-all is an autograd Function (`all_to_all`):
  backward is the reverse all-to-all of the gradients, so expert weight gradients collect every rank's
  contribution on the owner.
- Expert weights are DTensors sharded `Shard(0)` over the `ep` mesh axis: the state dict shows global
  [E, out, in] tensors (DCP reshards them to any world size) while forward uses `to_local()` slices.
- Gradient scale. Each rank's loss is its local-batch mean and FSDP averages over its reduce group. A dense
  weight's gradient is averaged over all `world` ranks; an expert weight receives the *sum* of `ep` ranks'
  contributions through the all-to-all and is then averaged over `dp` only. `_ScaleGrad` multiplies the
  expert weight gradient by 1/ep, so both end up as the mean over the global batch (what a single process
  computes on the whole batch).
- Every rank must run the same collectives in backward too. A rank whose experts get no rows still makes
  its (empty) output depend on the dispatched rows and on the weights (`_zero_dependency`): otherwise
  autograd would prune the dispatch all-to-all's backward on that rank only (a silent mismatch with the
  other ranks' collectives) and FSDP would reduce-scatter different gradient sets.
- Traffic accounting: each call adds the rows and bytes it sent to *other* ranks (dispatch + combine,
  forward only) to `ExpertParallelExperts.traffic`, which the benchmark reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from longcat2.model.moe import Experts, MoE, linear_by_expert


# ---------------------------------------------------------------------- collectives
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # type: ignore[override]
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        g = g.contiguous()
        out = g.new_empty((sum(ctx.in_splits), *g.shape[1:]))
        dist.all_to_all_single(out, g, ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all_to_all_single: row block i of `x` (in_splits[i] rows) goes to group rank i."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g * ctx.scale, None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _zero_dependency(y: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """y + 0·Σw: no change in value, but every w gets a (zero) gradient and its producer's backward runs."""
    dep = sum(w.reshape(-1)[:1].sum() for w in weights) * 0.0
    return y + dep.to(y.dtype)


# ---------------------------------------------------------------------- traffic
@dataclass
class Traffic:
    calls: int = 0
    rows_sent: int = 0  # rows sent to other ranks (dispatch + combine)
    bytes_sent: int = 0  # payload bytes sent to other ranks (dispatch + combine)
    count_bytes: int = 0  # bytes of the per-expert count exchange sent to other ranks
    local_rows: int = 0  # rows that stayed on this rank (routed to a local expert)

    def reset(self) -> None:
        self.calls = self.rows_sent = self.bytes_sent = self.count_bytes = self.local_rows = 0


# ---------------------------------------------------------------------- EP experts
class ExpertParallelExperts(nn.Module):
    """This rank's slice of a MoE's routed experts; forward dispatches rows to their owners and back.

    `forward(x_sorted, counts)`: rows grouped by destination rank then by expert (what `MoE` produces when
    experts are contiguous per rank), `counts` [ep · V] rows per (rank, local slot), V = `slots_per_rank`
    (the `n_local` routed experts).
    """

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh) -> None:
        super().__init__()
        ep = ep_mesh.size()
        e = experts.num_experts
        if e % ep:
            raise ValueError(f"n_routed_experts: {e} experts cannot be split evenly over ep={ep} ranks")
        self.num_experts = e
        self.ep_mesh = ep_mesh
        self.ep = ep
        self.ep_rank = ep_mesh.get_local_rank()
        self.n_local = e // ep
        self.group = ep_mesh.get_group()
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(experts, name)
            if isinstance(w, DTensor):
                raise ValueError(f"{name}: experts are already distributed")
            dt = distribute_tensor(w.detach(), ep_mesh, [Shard(0)])
            self.register_parameter(name, nn.Parameter(dt, requires_grad=w.requires_grad))
        self.traffic = Traffic()

    @property
    def slots_per_rank(self) -> int:
        return self.n_local

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, ep={self.ep}, local={self.n_local}"

    def local_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local routed experts on rows grouped by local expert (counts [n_local])."""
        scale = 1.0 / self.ep
        g_w, u_w, d_w = (
            _ScaleGrad.apply(_local(w), scale) for w in (self.gate_proj, self.up_proj, self.down_proj)
        )
        if x.shape[0] == 0:  # keep x (the dispatch all-to-all) and the weights in the graph
            return _zero_dependency(x.new_zeros(0, d_w.shape[1]), [x, g_w, u_w, d_w])
        offs = counts.cumsum(0).to(torch.int32)
        g = linear_by_expert(x, g_w, counts, offs)
        u = linear_by_expert(x, u_w, counts, offs)
        return linear_by_expert(F.silu(g) * u, d_w, counts, offs)

    def run_local(self, x: torch.Tensor, per_slot: torch.Tensor) -> torch.Tensor:
        """Rows received for this rank, grouped by local slot (per_slot [V] rows each) → outputs."""
        return self.local_experts(x, per_slot)

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep, v = self.ep, self.slots_per_rank
        counts = counts.to(torch.int64).reshape(ep, v)
        # 1. how many rows each rank sends me for each of my slots
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.group)
        send_splits = counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        # 2. dispatch
        xr = all_to_all(x_sorted, recv_splits, send_splits, self.group)  # [R, H] by source rank, then slot
        # 3. regroup by local slot, run the experts, undo the regrouping
        slot_of_row = torch.repeat_interleave(
            torch.arange(v, device=xr.device).repeat(ep), recv_counts.reshape(-1)
        )
        perm = torch.sort(slot_of_row, stable=True).indices
        per_slot = recv_counts.sum(0)  # [V]
        yg = self.run_local(xr[perm], per_slot)
        yr = torch.empty_like(yg).index_copy(0, perm, yg) if yg.shape[0] else yg
        # 4. combine
        y = all_to_all(yr, send_splits, recv_splits, self.group)
        self._account(x_sorted, send_splits, recv_splits)
        return y

    def _account(self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> None:
        t = self.traffic
        me = self.ep_rank
        remote_out = sum(s for i, s in enumerate(send_splits) if i != me)  # dispatch: my rows to others
        remote_back = sum(s for i, s in enumerate(recv_splits) if i != me)  # combine: results to others
        row_bytes = x.shape[-1] * x.element_size()
        t.calls += 1
        t.rows_sent += remote_out + remote_back
        t.bytes_sent += (remote_out + remote_back) * row_bytes
        t.count_bytes += (self.ep - 1) * self.slots_per_rank * 8
        t.local_rows += send_splits[me]


# ---------------------------------------------------------------------- installing
def expert_parallel(moe: MoE, ep_mesh: DeviceMesh) -> ExpertParallelExperts:
    """Swap `moe.experts` for its EP slice on `ep_mesh` (the MoE's forward stays `MoE.forward`)."""
    moe.experts = ExpertParallelExperts(moe.experts, ep_mesh)
    return moe.experts


class ZeroExpertsOverNetwork(ExpertParallelExperts):
    """Measurement baseline: the MoE hands this module the zero-expert slots too (its `num_experts` counts
    them), and they travel like routed ones to `n_identity` identity slots per rank (zero expert j lives on
    rank j // n_identity). Compare its `traffic` with `ExpertParallelExperts` to see what keeping zero
    experts local saves. Install with `dispatch_zero_experts` before `parallelize`."""

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh, n_zero: int) -> None:
        super().__init__(experts, ep_mesh)
        if n_zero % self.ep:
            raise ValueError(
                f"zero_expert_num: {n_zero} zero experts cannot be spread evenly over ep={self.ep}"
            )
        self.n_routed = self.num_experts
        self.num_experts = self.n_routed + n_zero  # what the MoE dispatches to this module
        self.n_identity = n_zero // self.ep

    @property
    def slots_per_rank(self) -> int:
        return self.n_local + self.n_identity

    def run_local(self, x: torch.Tensor, per_slot: torch.Tensor) -> torch.Tensor:
        n_routed_rows = int(per_slot[: self.n_local].sum())
        y = self.local_experts(x[:n_routed_rows], per_slot[: self.n_local])
        return torch.cat([y, x[n_routed_rows:].to(y.dtype)])  # identity slots: y = x

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted by expert id (routed, then zero experts), counts [E + Z] → outputs in the same order."""
        e, nl, ni = self.n_routed, self.n_local, self.n_identity
        gid = torch.repeat_interleave(torch.arange(self.num_experts, device=counts.device), counts)
        zero_j = (gid - e).clamp_min(0)
        owner = torch.where(gid < e, gid // nl, zero_j // ni)
        local = torch.where(gid < e, gid % nl, nl + zero_j % ni)
        key = owner * (nl + ni) + local
        perm = torch.sort(key, stable=True).indices
        y = super().forward(x_sorted[perm], torch.bincount(key, minlength=self.ep * (nl + ni)))
        return torch.empty_like(y).index_copy(0, perm, y)


def dispatch_zero_experts(moe: MoE, ep_mesh: DeviceMesh) -> ZeroExpertsOverNetwork:
    """Swap `moe.experts` for the `ZeroExpertsOverNetwork` baseline (measurements only)."""
    moe.experts = ZeroExpertsOverNetwork(moe.experts, ep_mesh, moe.router.num_experts - moe.n_routed)
    return moe.experts
