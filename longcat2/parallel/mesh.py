"""Process group, device and DeviceMesh set-up for torchrun (or any launcher that sets the torch env vars).

Design choices:
- The launcher is torchrun (or anything that sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
  `MASTER_PORT`); nothing here starts processes. Without `WORLD_SIZE` (or with 1) everything is a no-op and
  no process group is created, so single-process code pays nothing.
- Backend from the device type, never hard-coded: `dist.get_default_backend_for_device` (gloo on CPU, the
  accelerator's own backend — NCCL, XCCL, HCCL, ... — elsewhere). The device is the current accelerator
  (`torch.accelerator`) indexed by `LOCAL_RANK`, else CPU. On an accelerator the default group is
  created as `"<acc>:<backend>,cpu:gloo"` so CPU tensors (object collectives, counts) also work.
- One 2-D mesh for the whole job: `("dp", "ep")`, shape `(world // ep, ep)`. Every rank is a data-parallel
  rank (it reads its own slice of the global batch); `ep` groups `ep` neighbouring ranks that exchange
  tokens for the routed experts (neighbours: on a multi-GPU node they share the fastest links). Dense
  parameters are FSDP-sharded over all ranks (the flattened mesh, `DistInfo.dense_mesh`); expert
  parameters are split over `ep` and FSDP-sharded over `dp` (`DistInfo.expert_dp_mesh`).
- Degrees are validated up front with `ParallelConfigError` (a ValueError) naming the offending field
  (`ep`, `world_size`, `n_routed_experts`), not as a shape error deep in a collective.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DP, EP = "dp", "ep"
DENSE = "dp_ep"  # flattened (dp, ep): every rank; dense parameters are sharded over it


class ParallelConfigError(ValueError):
    """A parallel degree does not fit the world size or the model; the message names the field."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None  # ("dp", "ep"); None in a single process
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the initialised default group, else from torchrun's env vars."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def default_device(local_rank: int = 0, device: str | torch.device | None = None) -> torch.device:
    """`device` if given ('auto' = None), else the current accelerator indexed by local rank, else CPU."""
    if device is not None and str(device) != "auto":
        dev = torch.device(device)
        if dev.type != "cpu" and dev.index is None:
            dev = torch.device(dev.type, local_rank)
        return dev
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if acc is None:
        return torch.device("cpu")
    return torch.device(acc.type, local_rank)


def backend_for(device: torch.device | str) -> str:
    """Process-group backend string for a device: 'gloo' on CPU, '<acc>:<backend>,cpu:gloo' elsewhere."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return "gloo"
    return f"{dev.type}:{dist.get_default_backend_for_device(dev)},cpu:gloo"


def validate_degrees(world_size: int, ep: int, n_routed_experts: int | None = None) -> None:
    """Raise ParallelConfigError naming the field when `ep` does not fit the world or the model."""
    if world_size < 1:
        raise ParallelConfigError(f"world_size: must be >= 1, got {world_size}")
    if not isinstance(ep, int) or ep < 1:
        raise ParallelConfigError(f"ep: the expert-parallel degree must be an integer >= 1, got {ep!r}")
    if world_size % ep:
        raise ParallelConfigError(
            f"ep: the expert-parallel degree ({ep}) must divide the world size ({world_size}); "
            f"launch a multiple of {ep} processes or choose --ep among the divisors of {world_size}"
        )
    if n_routed_experts is not None:
        if n_routed_experts < 1 and ep > 1:
            raise ParallelConfigError(
                f"ep: expert parallelism needs routed experts, the model has {n_routed_experts}"
            )
        if n_routed_experts % ep:
            raise ParallelConfigError(
                f"n_routed_experts: {n_routed_experts} routed experts cannot be split evenly over ep={ep} ranks "
                f"(n_routed_experts must be divisible by ep)"
            )


def build_mesh(device_type: str, world_size: int, ep: int = 1) -> DeviceMesh:
    """The job's ("dp", "ep") mesh of shape (world // ep, ep); needs an initialised default group."""
    validate_degrees(world_size, ep)
    if dist.is_initialized() and dist.get_world_size() != world_size:
        raise ParallelConfigError(
            f"world_size: the mesh asks for {world_size} ranks but the process group has {dist.get_world_size()}"
        )
    return init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=(DP, EP))


def dense_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The flattened (dp, ep) mesh: all ranks, in mesh order (dense parameters are sharded over it)."""
    if mesh.ndim == 1:
        return mesh
    if mesh[EP].size() == 1:
        return mesh[DP]
    if mesh[DP].size() == 1:
        return mesh[EP]
    return mesh[(DP, EP)]._flatten(DENSE)


def init_distributed(
    ep: int = 1,
    device: str | torch.device | None = None,
    timeout_s: float | None = None,
) -> DistInfo:
    """Create the default process group (if launched with WORLD_SIZE > 1) and the ("dp", "ep") mesh.

    Idempotent: a second call reuses the existing group. `timeout_s` bounds every collective (a dead peer
    otherwise blocks the survivors until the backend's default timeout).
    """
    rank, world, local = env_rank_world()
    validate_degrees(world, ep)
    dev = default_device(local, device)
    if dev.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.set_device_index(dev.index or 0)
    if world == 1:
        if ep != 1:
            raise ParallelConfigError(f"ep: expert parallelism over {ep} ranks needs {ep} processes, got 1")
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev, mesh=None, ep=1)
    if not dist.is_initialized():
        kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend=backend_for(dev), **kw)
        rank, world, local = env_rank_world()
    mesh = build_mesh(dev.type, world, ep)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, mesh=mesh, ep=ep)


def is_main() -> bool:
    return env_rank_world()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
