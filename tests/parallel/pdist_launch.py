"""Run a function in N local processes as a torchrun-style job: spawn, a free port per run, a timeout.

Used by the multi-process tests and `bench/ep_alltoall.py` (test and benchmark harness, so it lives with the
tests, not in the package); `torchrun` is the launcher for real jobs.

`run_distributed(fn, world_size, *args)` starts `world_size` processes with the spawn start method (fork +
gloo can deadlock inside big pytest sessions), sets the torchrun environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) on a fresh port, calls `fn(rank, world_size, *args)` in each and
returns the per-rank results in rank order. A rank that raises, dies, or a run that exceeds `timeout`
kills the remaining processes and fails with the rank's traceback or exit status. `fn` must be importable
by name (module-level function of a module on sys.path), as spawn pickles it by reference.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _map(x: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_map(v, fn) for v in x)
    return fn(x)


def _to_numpy(x: Any) -> Any:
    import torch

    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _to_torch(x: Any) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, q: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    import torch

    torch.set_num_threads(1)
    try:
        out = fn(rank, world, *args)
        q.put((rank, True, _map(out, _to_numpy)))  # by value: torch's shared-memory tensors die with the rank
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 150.0) -> list[Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, args, q), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{fn.__name__} on {world_size} processes did not finish within {timeout:.0f}s "
                    f"(finished ranks: {sorted(results)})"
                )
            try:
                rank, ok, payload = q.get(timeout=min(left, 0.5))
            except queue.Empty:
                for r, p in enumerate(procs):
                    if r not in results and p.exitcode not in (None, 0):
                        raise RuntimeError(
                            f"rank {r} of {fn.__name__} died with exit code {p.exitcode}"
                        ) from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{payload}")
            results[rank] = _map(payload, _to_torch)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world_size)]
