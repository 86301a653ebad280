"""Sharded, atomic, world-size-independent checkpoints with torch.distributed.checkpoint (DCP).

Layout of one checkpoint directory (e.g. `OUT/checkpoints/step_00000200/`):
    .metadata, __<rank>_0.distcp   DCP: {"model": ..., "optim": ...}, every rank writes its own shards
    extra.pt                       rank 0's caller state (step, scheduler, data position, config, ...)
    rng/rank_00000.pt ...          each rank's RNG state (torch, accelerator, numpy, python)
    meta.json                      world_size, ep, dp, format; written last

Design choices:
- State dicts come from `torch.distributed.checkpoint.state_dict` (`get_state_dict` / `set_state_dict`):
  FQN-keyed, DTensor-aware for FSDP2 and the EP expert shards, the same keys as the single-device model.
  DCP stores global shapes and each rank's shard offsets, so a checkpoint written by 2 ranks loads on 1
  (no process group at all) or 4 ranks with any ("dp", "ep") layout: resharding is DCP's job.
- The optimizer is any `torch.optim.Optimizer` (the trainer's `MuonAdamW`: Muon momentum and AdamW
  moments are per-parameter tensors, saved sharded like the parameters they belong to).
- Atomic by rename: all ranks write into `.tmp-<name>-<token>` next to the target (rank 0 picks the token
  and broadcasts it), then rank 0 fsyncs and renames it to `<name>` after a barrier. A job killed at any
  point leaves either the complete new checkpoint or only a `.tmp-*` directory, never a half-written
  `step_*`; `latest_sharded` only sees directories with `meta.json`. An existing target is moved aside to
  `.del-*` and removed after the swap. Assumes a file system all ranks see (one node, or NFS/Lustre/...).
- RNG states are per rank and restored only when the world size is unchanged; at another world size the
  caller keeps its fresh seeds (the data position is global, not per rank, so it always carries over).
- `export_hf` gathers the full state dict to rank 0 (CPU) and writes a `from_pretrained`-loadable HF
  checkpoint with `longcat2.hf_checkpoint.save_pretrained` (released per-expert key names).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from longcat2.model_dir import SHARDED_META, list_step_dirs
from longcat2.model_dir import is_sharded_checkpoint as is_complete

FORMAT = "longcat2-dcp-1"
META = SHARDED_META
EXTRA = "extra.pt"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _dist() else (0, 1)


def _barrier() -> None:
    if _dist():
        dist.barrier()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide two expected messages: DCP's "no process group, loading in a single process" warning and
    DTensor's "sequential all_gather" note when gathering 2-D (dp, ep) expert shards."""
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    finally:
        log.setLevel(level)


# ---------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """This process's torch / accelerator / numpy / python RNG states (plain lists: `weights_only` loads)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _lists(random.getstate()),
    }
    if torch.accelerator.is_available():
        acc = torch.accelerator.current_accelerator()
        mod = getattr(torch, acc.type, None) if acc is not None else None
        if mod is not None and hasattr(mod, "get_rng_state"):
            state["accelerator"] = mod.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s output (an accelerator state only where one is present and saved)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate(_tuples(state["python"]))
    if "accelerator" in state and torch.accelerator.is_available():
        acc = torch.accelerator.current_accelerator()
        mod = getattr(torch, acc.type, None) if acc is not None else None
        if mod is not None and hasattr(mod, "set_rng_state"):
            mod.set_rng_state(state["accelerator"])


def _lists(x: Any) -> Any:
    return [_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


# ---------------------------------------------------------------------- files
def fsync_tree(path: Path) -> None:
    """fsync every file below `path`, then `path` itself (before the rename that publishes it)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def list_sharded(root: str | Path, prefix: str = "step_") -> list[tuple[int, Path]]:
    return list_step_dirs(root, is_complete, prefix)


def latest_sharded(root: str | Path, prefix: str = "step_") -> Path | None:
    ckpts = list_sharded(root, prefix)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(ckpts: list[tuple[int, Path]], keep: int) -> None:
    """Delete all but the newest `keep` (0 = keep all) of `ckpts` (oldest first, as the listings return
    them). Each is renamed to `.del-<name>` first, so a half-deleted directory never looks like a checkpoint."""
    if keep > 0:
        for _, old in ckpts[:-keep]:
            doomed = old.parent / f".del-{old.name}"
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def remove_partial(root: str | Path) -> list[str]:
    """Delete the hidden leftovers (`.tmp-*`, `.del-*`, any `.`-name: a writer's temporaries) of interrupted
    writes or prunes in a checkpoints folder (call on rank 0 before the run writes anything); returns them."""
    root = Path(root)
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


# ---------------------------------------------------------------------- save / load
def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
    mesh_info: dict[str, Any] | None = None,
    files: list[str | Path] | None = None,
) -> Path:
    """Collective: every rank calls it. Atomically writes the checkpoint directory `path`.

    `extra` (rank 0's copy is saved; tensors, numbers, strings, lists and dicts only — it is read back with
    `weights_only=True`): step, scheduler, data position, run config, ... `files` (rank 0; missing ones are
    skipped) are copied in before the rename, e.g. the tokenizer files.
    """
    final = Path(path)
    rank, world = _rank_world()
    token = [uuid.uuid4().hex[:8] if rank == 0 else None]
    if _dist():
        dist.broadcast_object_list(token, src=0)
    tmp = final.parent / f".tmp-{final.name}-{token[0]}"
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _barrier()
    with _quiet():
        dcp.save(_state(model, optimizer), checkpoint_id=str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        torch.save(extra or {}, tmp / EXTRA)
        for f in files or []:
            if Path(f).is_file():
                shutil.copyfile(f, tmp / Path(f).name)
        meta = {"format": FORMAT, "world_size": world, **(mesh_info or {})}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f".del-{final.name}-{token[0]}"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_extra(path: str | Path) -> dict[str, Any]:
    """The caller state (`extra`) of a sharded checkpoint, without touching the model (e.g. a run config)."""
    p = Path(path) / EXTRA
    return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else {}


@dataclass
class LoadedState:
    path: Path
    extra: dict[str, Any]
    saved_world_size: int
    rng_restored: bool


def load_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
    strict: bool = True,
) -> LoadedState:
    """Collective: load model (and optimizer) state saved by `save_sharded` at any world size, in place."""
    p = Path(path)
    if not is_complete(p):
        raise FileNotFoundError(f"{p}: not a complete sharded checkpoint (no {META} / .metadata)")
    meta = json.loads((p / META).read_text())
    state = _state(model, optimizer)
    with _quiet():
        dcp.load(state, checkpoint_id=str(p))
    opts = StateDictOptions(strict=strict)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"], options=opts)
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=opts
        )
    rank, world = _rank_world()
    restored = False
    rng_file = p / "rng" / f"rank_{rank:05d}.pt"
    if restore_rng and meta.get("world_size") == world and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
        restored = True
    extra = load_extra(p)
    return LoadedState(
        path=p, extra=extra, saved_world_size=int(meta.get("world_size", 1)), rng_restored=restored
    )


# ---------------------------------------------------------------------- HF export
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded model state dict on rank 0 (CPU); other ranks get {}."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    with _quiet():
        return get_model_state_dict(model, options=opts)


def export_hf(
    model: nn.Module,
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    files: list[str | Path] | None = None,
) -> Path | None:
    """Collective: gather the weights to rank 0 and write an HF checkpoint (`from_pretrained`-loadable).

    `files` (rank 0; missing ones are skipped) are copied in afterwards, e.g. the tokenizer files; an
    existing `path` is replaced atomically, keeping files that are not the model's. Returns the directory
    on rank 0, None elsewhere.
    """
    sd = full_state_dict(model)
    out: Path | None = None
    if _rank_world()[0] == 0:
        from longcat2 import hf_checkpoint
        from longcat2.model import LongCatForCausalLM

        cfg = model.config  # type: ignore[attr-defined]
        plain = hf_checkpoint._build_on_meta(LongCatForCausalLM, cfg)
        plain.load_state_dict(sd, strict=True, assign=True)
        if getattr(cfg, "tie_word_embeddings", False):  # assign=True gave the two names separate tensors
            plain.lm_head.weight = plain.model.embed_tokens.weight
        out = hf_checkpoint.save_pretrained(plain, path, dtype=dtype)
        for f in files or []:
            if Path(f).is_file():
                shutil.copyfile(f, out / Path(f).name)
    _barrier()
    return out
