"""Scale-out training on torch.distributed: DeviceMesh, FSDP2, expert parallelism, DCP checkpoints.

The model stays single-device code; everything here is applied from outside (torchtitan style). What the
trainer calls, in order (see docs/distributed.md):

    info = init_distributed(ep=cfg.ep)              # DistInfo(rank, world_size, local_rank, device, mesh, ep)
    model = build_model().to(info.device)            # same seed on every rank
    parallelize(model, info.mesh, ep=cfg.ep, activation_checkpointing=..., mixed_precision=...)
    optimizer = ...                                   # built *after* parallelize (DTensor parameters)
    ... loss.backward(); clip_grad_norm_(params, max_norm); optimizer.step()
    stats.all_reduce(all_reduce_sum)                  # global expert counts for the bias update
    save_sharded(dir, model, optimizer, extra={...}) / load_sharded(dir, model, optimizer)
    export_hf(model, dir)                             # full HF checkpoint from a sharded run

Everything degrades to a no-op (or plain torch) in a single process without a process group.

Multi-process inference lives in its own modules, imported by name (not re-exported here):
`inference` (parallelize_for_inference: tensor + expert parallel shards of the model's own modules),
`lockstep` (one engine stepped on every rank), `loading` (each rank reads its slices of a HF checkpoint),
`serving` (the `--tp` / `--ep` of generate, serve and eval). See docs/distributed.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from longcat2.parallel.dcp import (
    LoadedState,
    export_hf,
    full_state_dict,
    is_complete,
    latest_sharded,
    list_sharded,
    load_extra,
    load_sharded,
    prune_checkpoints,
    remove_partial,
    rng_state,
    save_sharded,
    set_rng_state,
)
from longcat2.parallel.dispatch import (
    ExpertParallelExperts,
    Traffic,
    ZeroExpertsOverNetwork,
    all_to_all,
    dispatch_zero_experts,
    expert_parallel,
)
from longcat2.parallel.mesh import (
    DistInfo,
    ParallelConfigError,
    backend_for,
    barrier,
    build_mesh,
    default_device,
    env_rank_world,
    init_distributed,
    is_main,
    shutdown,
    validate_degrees,
)
from longcat2.parallel.parallelize import clip_grad_norm_, grad_norm, parallelize

__all__ = [
    "DistInfo",
    "ExpertParallelExperts",
    "LoadedState",
    "ParallelConfigError",
    "Traffic",
    "ZeroExpertsOverNetwork",
    "all_reduce_sum",
    "all_to_all",
    "backend_for",
    "barrier",
    "build_mesh",
    "clip_grad_norm_",
    "default_device",
    "dispatch_zero_experts",
    "env_rank_world",
    "expert_parallel",
    "expert_traffic",
    "export_hf",
    "full_state_dict",
    "grad_norm",
    "init_distributed",
    "is_complete",
    "is_main",
    "latest_sharded",
    "list_sharded",
    "load_extra",
    "load_sharded",
    "parallelize",
    "prune_checkpoints",
    "remove_partial",
    "rng_state",
    "save_sharded",
    "set_rng_state",
    "shutdown",
    "validate_degrees",
]


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum `t` in place over `group` (default: all ranks = the data-parallel group); returns `t`.

    Works for any dtype gloo/NCCL reduce (the trainer's fp64 routing counts included). No-op without a group.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def expert_traffic(model: nn.Module) -> Traffic:
    """Sum of every EP layer's all-to-all traffic counters on this rank (see dispatch.Traffic)."""
    total = Traffic()
    for m in model.modules():
        if isinstance(m, ExpertParallelExperts):
            t = m.traffic
            total.calls += t.calls
            total.rows_sent += t.rows_sent
            total.bytes_sent += t.bytes_sent
            total.count_bytes += t.count_bytes
            total.local_rows += t.local_rows
    return total
