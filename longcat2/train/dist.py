"""Small rank/world helpers so the trainer runs unchanged under `torchrun` later.

Design choices:
- Single process is the default and costs nothing: every helper is a no-op when `WORLD_SIZE` is unset/1.
- Under torchrun (`WORLD_SIZE` > 1) `init()` creates the default process group (NCCL on CUDA, gloo on CPU)
  and the trainer averages gradients with `all_reduce_grads` (plain data parallelism; FSDP/EP belong to
  the scale-out work). Data sharding is by rank inside the sampler; only rank 0 writes files
  (`is_main`), and checkpoints are followed by a `barrier`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torch.distributed if initialised, else from torchrun's env."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(device_type: str) -> tuple[int, int, int]:
    rank, world, local = env_rank_world()
    if world > 1 and torch_dist.is_available() and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return env_rank_world()


def is_main() -> bool:
    return env_rank_world()[0] == 0


def world_size() -> int:
    return env_rank_world()[1]


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t)
    return t


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Average gradients over ranks (one flat buffer per dtype)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    world = torch_dist.get_world_size()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        torch_dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
