"""Training checkpoints: HF-layout model + tokenizer + trainer state, written atomically.

Layout of `OUT/checkpoints/step_00000200/`:
    config.json, model.safetensors        the model (`LongCatForCausalLM.from_pretrained(dir)` loads it)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   (when the run has a tokenizer)
    trainer_state.pt                       optimizer, step, data position, every RNG, counters, run config
    train_config.json                      the run config, for people

Design choices:
- Atomicity by rename: everything is written into `checkpoints/.tmp-step_XXXXXXXX-PID/`, files and the
  directory are fsync'ed, then the directory is renamed to `step_XXXXXXXX` (one `rename(2)`). A checkpoint
  directory therefore exists complete or not at all; a kill during the write leaves only a `.tmp-*`
  directory, which the next run deletes. Pruning old checkpoints renames them to `.del-*` before deleting,
  so a half-deleted directory never looks like a checkpoint, and it happens only after the new one is in
  place: the last good checkpoint is never replaced by a partial one.
- `latest_checkpoint` picks the highest step directory that has its trainer state; no "latest" pointer
  file to get out of sync.
- The trainer state is saved with `torch.save` and loaded with `weights_only=True` (no pickled code):
  RNG states of numpy/python are stored as plain lists.
- Model files go through `longcat2.checkpoint` (released key names, per-expert tensors), so a checkpoint
  directory is also a model directory for `from_pretrained`, `longcat2 sft --init`, evals and serving.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from longcat2.model import LongCatForCausalLM

PREFIX = "step_"
STATE_FILE = "trainer_state.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- model files
def save_model(model: LongCatForCausalLM, path: str | Path) -> None:
    """Write the model in HF layout (config.json + safetensors, released key names) to the new dir `path`."""
    from longcat2.checkpoint import save_pretrained

    save_pretrained(model, path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LongCatForCausalLM:
    """Load an HF-layout LongCat directory (ours or released) with fp32 weights, in train mode."""
    model = LongCatForCausalLM.from_pretrained(path, dtype=torch.float32, device=device)
    return model.train()


def copy_tokenizer(src: str | Path | None, dst: str | Path) -> None:
    if src is None:
        return
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, Path(dst) / name)


# ---------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# ---------------------------------------------------------------------- checkpoints
def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file():
            try:
                out.append((int(p.name[len(PREFIX) :]), p))
            except ValueError:
                continue
    return sorted(out)


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def remove_partial(root: str | Path) -> list[str]:
    """Delete the hidden leftovers (`.tmp-*`, `.del-*`, the model writer's temporaries) of an interrupted
    write or prune in the checkpoints folder; returns their names."""
    root = Path(root)
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


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
    if final.is_dir() and (final / STATE_FILE).is_file():
        return final  # already written (e.g. a save step coinciding with the final step after resume)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)  # creates `tmp` (itself via a temporary sibling + rename)
    copy_tokenizer(tokenizer_dir, tmp)
    if run_config is not None:
        (tmp / "train_config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")
    torch.save(trainer_state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    os.rename(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        for _, old in list_checkpoints(root)[:-keep]:
            doomed = root / f".del-{old.name}"
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return final


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=True)


def resolve_init(path: str | Path) -> Path:
    """A model directory to start from: an HF-layout dir, a checkpoint dir, or a run's OUT dir (its latest)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        ck = latest_checkpoint(root)
        if ck is not None:
            return ck
    raise FileNotFoundError(f"{p}: no config.json and no checkpoints/step_* directory to start from")


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)
