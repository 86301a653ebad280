"""`parallelize(model, mesh, ...)`: expert parallelism, FSDP2, activation checkpointing, mixed precision.

Design choices (torchtitan's recipe, applied from outside to the unchanged single-device model):
- Order: expert parallelism first (swap each `mlp.experts` for its `ExpertParallelExperts` slice, a DTensor
  `Shard(0)` over `ep`), then activation checkpointing (the model's own per-layer `gradient_checkpointing`
  flag: `torch.utils.checkpoint`, non-reentrant, so FSDP's hooks run again on recompute), then FSDP2
  bottom-up: each MoE's experts over `dp` (the mesh axis left over by ep), each decoder layer, the MTP
  head, then the root (embeddings, final norm, lm_head) over all ranks.
- Nothing else of the model changes: `MoE.forward` always calls its experts module, so a rank that routes
  no token to routed experts still enters its collectives (with or without EP). Experts already swapped
  for an `ExpertParallelExperts` (e.g. the `ZeroExpertsOverNetwork` measurement baseline) are kept.
- Gradients: FSDP averages dense gradients over all ranks; expert gradients are summed over `ep` by the
  all-to-all backward and scaled by 1/ep (dispatch.py), then averaged over `dp` by FSDP. The result equals
  a single process on the global batch (tested to 1e-5).
- `fsdp=False` in a multi-rank job keeps weights replicated (plain data parallelism): a post-accumulate-grad
  hook on each parameter all-reduces its gradient (mean over all ranks for dense weights, over `dp` for the
  local expert slices) as soon as backward produces it. Simple and correct, unbucketed: meant for small
  models and debugging; FSDP is the default.
- Mixed precision: `mixed_precision="bf16"` means `MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)` (fp32 master weights and optimizer state, bf16 compute and all-gathers, fp32
  gradient reduction); a `MixedPrecisionPolicy` is passed through. The router keeps computing in fp32
  (it casts its inputs), so routing decisions are as stable as the fp32 weights allow.
- `reshard_after_forward=True` for every group, the root included (FSDP's default keeps the root
  unsharded after forward): after any forward — an evaluation, a probe — the registered parameters are
  the sharded DTensors again, the ones the optimizer holds. With the root left unsharded, a parameter list
  taken after a no-grad forward holds the unsharded tensors, whose `.grad` stays None: such a list
  silently drops those gradients from norms and clipping (found by the parity tests). Pass False to
  save the root's all-gather in backward when nothing of the kind happens.
- Gradient clipping across meshes: dense and expert parameters are DTensors on different meshes, which
  `torch.nn.utils.clip_grad_norm_` cannot stack; `clip_grad_norm_` here reduces per mesh and combines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from longcat2.model.moe import MoE
from longcat2.parallel.dispatch import ExpertParallelExperts, expert_parallel
from longcat2.parallel.mesh import DP, EP, ParallelConfigError, dense_mesh, validate_degrees


def _mp_policy(mixed_precision: str | MixedPrecisionPolicy | None) -> MixedPrecisionPolicy:
    if mixed_precision is None or mixed_precision in ("fp32", "none"):
        return MixedPrecisionPolicy()
    if isinstance(mixed_precision, MixedPrecisionPolicy):
        return mixed_precision
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise ParallelConfigError(
        f"mixed_precision: expected None, 'fp32', 'bf16' or a MixedPrecisionPolicy, got {mixed_precision!r}"
    )


def _replicate_grads(params: list[nn.Parameter], mesh: DeviceMesh) -> None:
    """Average each parameter's gradient over `mesh` right after backward accumulates it (plain DP)."""
    n = mesh.size()
    if n == 1:
        return
    group = mesh.get_group()

    def hook(p: torch.Tensor) -> None:
        g = p.grad
        local = g.to_local() if isinstance(g, DTensor) else g
        dist.all_reduce(local, group=group)
        local.div_(n)

    for p in params:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)


def _activation_checkpointing(model: nn.Module, on: bool) -> None:
    if not on:
        return
    inner = getattr(model, "model", model)
    if not hasattr(inner, "gradient_checkpointing"):
        raise ParallelConfigError("activation_checkpointing: the model has no `gradient_checkpointing` flag")
    inner.gradient_checkpointing = True


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh | None,
    *,
    ep: int | None = None,
    fsdp: bool = True,
    mixed_precision: str | MixedPrecisionPolicy | None = None,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply EP / FSDP2 / activation checkpointing / mixed precision in place and return the model.

    `mesh`: the ("dp", "ep") mesh from `init_distributed` / `build_mesh` (None in a single process: only
    activation checkpointing applies). `ep` defaults to the mesh's ep size; if given it must match.
    """
    cfg = getattr(model, "config", None)
    n_routed = getattr(cfg, "n_routed_experts", None)
    if mesh is None:
        if ep not in (None, 1):
            raise ParallelConfigError(f"ep: expert parallelism over {ep} ranks needs a device mesh")
        if mixed_precision not in (None, "fp32", "none"):
            raise ParallelConfigError(
                "mixed_precision: a policy needs FSDP, i.e. a device mesh (use autocast)"
            )
        _activation_checkpointing(model, activation_checkpointing)
        return model
    if mesh.mesh_dim_names != (DP, EP):
        raise ParallelConfigError(f"mesh: expected dims ('dp', 'ep'), got {mesh.mesh_dim_names}")
    world = mesh.size()
    mesh_ep = mesh[EP].size()
    if ep is not None and ep != mesh_ep:
        raise ParallelConfigError(f"ep: asked for ep={ep} but the mesh's ep axis has size {mesh_ep}")
    ep = mesh_ep
    if dist.is_initialized() and dist.get_world_size() != world:
        raise ParallelConfigError(
            f"world_size: the mesh spans {world} ranks but the process group has {dist.get_world_size()}"
        )
    validate_degrees(world, ep, n_routed if ep > 1 else None)
    mp = _mp_policy(mixed_precision)
    if not fsdp and mixed_precision not in (None, "fp32", "none"):
        raise ParallelConfigError("mixed_precision: a policy needs fsdp=True (use autocast without FSDP)")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    _activation_checkpointing(model, activation_checkpointing)

    # 1. expert parallelism: swap each MoE's experts for this rank's slice
    if ep > 1:
        for moe in moes:
            if not isinstance(moe.experts, ExpertParallelExperts):
                expert_parallel(moe, mesh[EP])

    if world == 1:
        return model

    # 2. FSDP2 bottom-up
    all_ranks = dense_mesh(mesh)
    if not fsdp:
        expert_params = {
            id(p)
            for m in moes
            if isinstance(m.experts, ExpertParallelExperts)
            for p in m.experts.parameters()
        }
        seen: set[int] = set()
        dense_params, ep_params = [], []
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            (ep_params if id(p) in expert_params else dense_params).append(p)
        _replicate_grads(dense_params, all_ranks)
        _replicate_grads(ep_params, mesh[DP])
        return model
    dense, expert_dp = all_ranks, mesh[DP]
    kw = dict(mp_policy=mp, reshard_after_forward=reshard_after_forward)
    inner = getattr(model, "model", model)
    for layer in getattr(inner, "layers", []):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, MoE) and isinstance(mlp.experts, ExpertParallelExperts):
            fully_shard(mlp.experts, mesh=expert_dp, **kw)
        fully_shard(layer, mesh=dense, **kw)
    mtp = getattr(inner, "mtp", None)
    if mtp is not None:
        fully_shard(mtp, mesh=dense, **kw)
    fully_shard(model, mesh=dense, **kw)
    return model


# ---------------------------------------------------------------------- gradient norm / clipping
def _covers_world_sharded(t: DTensor) -> bool:
    """Sharded on every mesh dim (no replication) over a mesh that spans all ranks: local pieces partition t."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if not dist.is_initialized() or t.device_mesh.size() != dist.get_world_size():
        return False
    return all(isinstance(pl, (Shard, _StridedShard)) for pl in t.placements)


@torch.no_grad()
def grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Global gradient norm of (possibly DTensor, possibly differently meshed) parameters, fp32 scalar.

    Gradients sharded over all ranks (FSDP, FSDP × EP) contribute their local Σ|g|^p to one all-reduce;
    anything else (replicated or partially replicated DTensors) is reduced by DTensor itself.
    """
    if norm_type != 2.0:
        raise ValueError(f"norm_type: only the 2-norm is implemented, got {norm_type}")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if not any(isinstance(g, DTensor) for g in grads):  # one process: torch's fused norm, on the device
        return torch.nn.utils.get_total_norm(grads, norm_type, foreach=True)
    sharded, local_sq, other = [], torch.zeros((), dtype=torch.float32), []
    for g in grads:
        if isinstance(g, DTensor) and _covers_world_sharded(g):
            sharded.append(g.to_local())
        elif isinstance(g, DTensor):
            other.append(g)
        else:
            local_sq = local_sq + torch.linalg.vector_norm(g, dtype=torch.float32).cpu() ** 2
    if sharded:
        sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in sharded]).pow(2).sum()
        dist.all_reduce(sq)  # on the gradients' device: gloo on CPU, the accelerator backend elsewhere
        local_sq = local_sq + sq.cpu()
    for g in other:
        local_sq = local_sq + torch.linalg.vector_norm(g, dtype=torch.float32).full_tensor().cpu() ** 2
    return local_sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip gradients in place to a global `max_norm` (<= 0: only measure); returns the norm before clipping.

    Without DTensor gradients (one process) this is `torch.nn.utils.clip_grad_norm_(foreach=True)`: the
    same numbers, no host sync."""
    params = [p for p in params if p.grad is not None]
    if max_norm <= 0:
        return grad_norm(params, norm_type)
    if not any(isinstance(p.grad, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=True)
    total = grad_norm(params, norm_type)
    if math.isfinite(float(total)):
        c = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        if c < 1.0:
            for p in params:
                p.grad.mul_(c)
    return total
