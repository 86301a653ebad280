"""A training run's checkpoints (`OUT/checkpoints/step_*`): HF-layout model + tokenizer + trainer state.

Named for what it holds: the state a run resumes from, written atomically. The model files inside are
`longcat2.hf_checkpoint`'s format (one process) or `longcat2.parallel.dcp`'s sharded layout (torchrun).

Layout of `OUT/checkpoints/step_00000200/` (one process):
    config.json, model.safetensors        the model (`LongCatForCausalLM.from_pretrained(dir)` loads it)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   (when the run has a tokenizer)
    trainer_state.pt                       optimizer, step, data position, every RNG, counters, run config
    train_config.json                      the run config, for people

A run on several processes (torchrun) writes the sharded layout of `longcat2.parallel.dcp` into the
same `step_*` names instead (DCP shards, `extra.pt`, per-rank RNG, `meta.json`, tokenizer files); the
listings and `load_model` here read both.

Design choices:
- Atomicity by rename: everything is written into `checkpoints/.tmp-step_XXXXXXXX-PID/`, files and the
  directory are fsync'ed, then the directory is renamed to `step_XXXXXXXX` (one `rename(2)`). A checkpoint
  directory therefore exists complete or not at all; a kill during the write leaves only a `.tmp-*`
  directory, which the next run deletes. Pruning old checkpoints renames them to `.del-*` before deleting,
  so a half-deleted directory never looks like a checkpoint, and it happens only after the new one is in
  place: the last good checkpoint is never replaced by a partial one. (The fsync, prune, leftover and RNG
  helpers are `longcat2.parallel.dcp`'s: one implementation for both layouts.)
- `latest_checkpoint` picks the highest step directory that is complete in either layout; no "latest"
  pointer file to get out of sync. Resuming trusts nothing unread: `latest_good_checkpoint` verifies the
  candidates newest first (`verify_checkpoint`: the trainer state loads, every safetensors file's header
  and size agree, config.json parses; a sharded checkpoint's extra state loads) and falls back past the
  broken ones, returning what it skipped and why, for the caller's warning.
- A step directory that already exists when that step is saved again is replaced unless it verifies (it
  may be one resume skipped, or one whose trainer_state.pt was deleted): it is moved aside to `.del-*`,
  the new one renamed into place, and the old one deleted, so a rerun never fails on `Directory not empty`
  and leaves no `.tmp-*` behind.
- The trainer state is saved with `torch.save` and loaded with `weights_only=True` (no pickled code):
  RNG states of numpy/python are stored as plain lists.
- Model files go through `longcat2.hf_checkpoint` (released key names, per-expert tensors), so a checkpoint
  directory is also a model directory for `from_pretrained`, `longcat2 sft --init`, evals and serving.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from longcat2.config import ModelConfig
from longcat2.model import LongCatForCausalLM
from longcat2.model_dir import resolve_model_dir
from longcat2.parallel import dcp
from longcat2.parallel.dcp import fsync_dir, fsync_tree, list_step_dirs, prune_checkpoints
from longcat2.tokenizer import TOKENIZER_FILES

PREFIX = "step_"
STATE_FILE = "trainer_state.pt"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# ---------------------------------------------------------------------- model files
def save_model(model: LongCatForCausalLM, path: str | Path) -> None:
    """Write the model in HF layout (config.json + safetensors, released key names) to the new dir `path`."""
    from longcat2.hf_checkpoint import save_pretrained

    save_pretrained(model, path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LongCatForCausalLM:
    """Load an HF-layout LongCat directory (ours or released) or a sharded training checkpoint (any world
    size; collective when a process group is up) with fp32 weights, in train mode."""
    if is_sharded(path):
        model = model_from_sharded(path)
        dcp.load_sharded(path, model, restore_rng=False)
        return model.to(device).train()
    model = LongCatForCausalLM.from_pretrained(path, dtype=torch.float32, device=device)
    return model.train()


def model_from_sharded(path: str | Path) -> LongCatForCausalLM:
    """A model of a sharded checkpoint's architecture (`extra["model_config"]`), initialised without
    touching the global RNG; its weights are to be loaded from the checkpoint."""
    cfg = dcp.load_extra(path).get("model_config")
    if not isinstance(cfg, dict):
        raise FileNotFoundError(f"{path}: the sharded checkpoint has no model_config in {dcp.EXTRA}")
    with torch.random.fork_rng(devices=[]):
        return LongCatForCausalLM(ModelConfig(**cfg)).train()


def copy_tokenizer(src: str | Path | None, dst: str | Path) -> None:
    if src is None:
        return
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, Path(dst) / name)


# ---------------------------------------------------------------------- checkpoints
def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete one-process (HF-layout) checkpoints under `root`, oldest first."""
    return list_step_dirs(root, lambda p: (p / STATE_FILE).is_file(), PREFIX)


def list_all(root: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints under `root` in either layout (HF or sharded), oldest first."""
    return sorted(list_checkpoints(root) + dcp.list_sharded(root, PREFIX))


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_all(root)
    return ckpts[-1][1] if ckpts else None


def is_sharded(path: str | Path) -> bool:
    """A complete checkpoint in the sharded (torchrun) layout."""
    return dcp.is_complete(path)


def save_checkpoint(
    root: str | Path,
    step: int,
    model: LongCatForCausalLM,
    trainer_state: dict[str, Any],
    *,
    tokenizer_dir: str | Path | None = None,
    run_config: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Atomically write checkpoint `step` under `root` and prune to the newest `keep` (0 = keep all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    if final.is_dir() and (final / STATE_FILE).is_file() and verify_checkpoint(final) is None:
        return final  # already written (e.g. a save step coinciding with the final step after resume)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)  # creates `tmp` (itself via a temporary sibling + rename)
    copy_tokenizer(tokenizer_dir, tmp)
    if run_config is not None:
        (tmp / "train_config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")
    torch.save(trainer_state, tmp / STATE_FILE)
    fsync_tree(tmp)
    old = root / f".del-{final.name}-{os.getpid()}"
    if final.exists():  # an incomplete or broken checkpoint of this step: replaced
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    prune_checkpoints(list_all(root), keep)
    return final


class CheckpointCorrupt(RuntimeError):
    """A checkpoint file cannot be read back; the message names the file."""


def load_trainer_state(ckpt: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The trainer state of a checkpoint. `mmap`: map the tensors instead of reading them (a check that the
    file parses costs its pickle and zip directory, not the optimizer moments)."""
    f = Path(ckpt) / STATE_FILE
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, bad pickle, missing file: name the file
        raise CheckpointCorrupt(f"{f}: cannot be read ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointCorrupt(f"{f}: not a trainer state (no step)")
    return state


def verify_checkpoint(ckpt: str | Path) -> str | None:
    """None when the checkpoint reads back (see the module docstring for what is checked), else what is
    wrong, naming the file. Cheap: tensors are not read (the trainer state is mapped, safetensors files
    only have their headers and sizes checked)."""
    from safetensors import safe_open

    ckpt = Path(ckpt)
    try:
        if is_sharded(ckpt):
            dcp.load_extra(ckpt)
            return None
        load_trainer_state(ckpt, mmap=True)
        json.loads((ckpt / "config.json").read_text())
        files = sorted(ckpt.glob("*.safetensors"))
        if not files:
            return f"{ckpt}: no *.safetensors model file"
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:  # checks the header against the file size
                    h.keys()
            except Exception as e:
                return f"{f}: cannot be read ({e})"
    except CheckpointCorrupt as e:
        return str(e)
    except Exception as e:
        return f"{ckpt}: cannot be read ({type(e).__name__}: {e})"
    return None


def latest_good_checkpoint(root: str | Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint under `root` that verifies, or None; why each newer one was skipped)."""
    skipped = []
    for _, ckpt in reversed(list_all(root)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt, skipped
        skipped.append(f"{ckpt.name}: {problem}")
    return None, skipped


def resolve_init(path: str | Path) -> Path:
    """A model directory to start from (`load_model` reads it): an HF-layout dir, a checkpoint dir of either
    layout, a run's OUT dir (its latest checkpoint) or the embedded model's name (`longcat2.model_dir`)."""
    return resolve_model_dir(path, flag="--init", sharded_ok=True)
