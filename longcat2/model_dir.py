"""What a `--model` / `--init` argument names, resolved to one folder before anything is loaded.

Design choices:
- One resolver for every command that takes a model (`generate`, `serve`, `eval`, `train`/`sft --init`,
  `info`/`plan --config`), so the same argument means the same model everywhere. Accepted:
  nothing or the embedded model's name (`longcat-2.0-tiny`) → the model shipped in the package;
  a folder with `config.json` (a model folder, a released checkpoint, one training checkpoint) → itself;
  a training run folder (`train --out`) or its `checkpoints/` → its latest complete checkpoint, as a
  user of `transformers`' `Trainer` output expects.
- A run on several processes writes sharded (DCP) checkpoints, which only the trainer reads
  (`sharded_ok=True`, `--init`); for the other commands such a run means its HF export `OUT/hf`, written
  when the run finishes, as long as it is not older than the latest sharded checkpoint.
- Pure paths, no torch: the CLI says what is wrong before it imports anything heavy. Errors are
  `ModelDirError` (a ValueError) naming the flag, the argument and what was looked for.
- The step-directory listing lives here (the trainer's and `longcat2.parallel.dcp`'s listings use it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL_NAME = "longcat-2.0-tiny"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default-model"
CONFIG_FILE = "config.json"
SHARDED_META = "meta.json"  # written last into a sharded checkpoint (longcat2.parallel.dcp)
HF_EXPORT = "hf"  # OUT/hf: the HF-layout export of a run with sharded checkpoints
STEP_PREFIX = "step_"
MODEL_HELP = (
    "a model folder (config.json, *.safetensors [, tokenizer.json]), a training run folder (its latest "
    f"checkpoint) or {DEFAULT_MODEL_NAME} (the model embedded in the package; the default)"
)


class ModelDirError(ValueError):
    """A `--model` / `--init` argument that names no loadable model; the message says what was looked for."""


def is_model_dir(path: str | Path) -> bool:
    """An HF-layout model folder (`from_pretrained` reads it)."""
    return (Path(path) / CONFIG_FILE).is_file()


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A complete checkpoint in the sharded (torchrun, DCP) layout."""
    p = Path(path)
    return (p / SHARDED_META).is_file() and (p / ".metadata").is_file()


def list_step_dirs(
    root: str | Path, complete: Callable[[Path], bool], prefix: str = STEP_PREFIX
) -> list[tuple[int, Path]]:
    """(step, dir) of the `<prefix><step>` directories under `root` that `complete` accepts, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(prefix) and complete(p):
            try:
                out.append((int(p.name[len(prefix) :]), p))
            except ValueError:
                continue
    return sorted(out)


def default_model_dir(flag: str = "--model") -> Path:
    if not is_model_dir(DEFAULT_MODEL_DIR):
        raise ModelDirError(
            f"no {flag} given and this installation has no embedded default model ({DEFAULT_MODEL_DIR} is "
            f"missing or empty). Pass {flag} DIR (a directory with config.json, *.safetensors and "
            "tokenizer.json), or build the default model with scripts/build_default_model.sh."
        )
    return DEFAULT_MODEL_DIR


def resolve_model_dir(arg: str | Path | None, *, flag: str = "--model", sharded_ok: bool = False) -> Path:
    """The model folder `arg` names (see the module docstring); `sharded_ok` also returns a sharded
    training checkpoint (for the trainer's `--init`)."""
    if arg is None or str(arg) == DEFAULT_MODEL_NAME:
        return default_model_dir(flag)
    p = Path(arg)
    what = f"{flag} {arg}"
    if not p.exists():
        raise ModelDirError(
            f"{what}: no such file or directory (expected a model folder with config.json, a training run "
            f"folder, or {DEFAULT_MODEL_NAME!r} for the embedded model)"
        )
    if is_model_dir(p) or (sharded_ok and is_sharded_checkpoint(p)):
        return p
    if is_sharded_checkpoint(p):
        raise ModelDirError(
            f"{what}: a sharded (torchrun) training checkpoint, which only `longcat2 train/sft --init` reads; "
            f"use the run's {HF_EXPORT}/ folder (written when the run finishes)"
        )
    for root in (p / "checkpoints", p):
        ckpts = list_step_dirs(root, lambda d: is_model_dir(d) or is_sharded_checkpoint(d))
        if not ckpts:
            continue
        latest = ckpts[-1][1]
        if is_model_dir(latest) or sharded_ok:
            return latest
        export = (p if root == p / "checkpoints" else p.parent) / HF_EXPORT
        if is_model_dir(export) and (
            (export / CONFIG_FILE).stat().st_mtime >= (latest / SHARDED_META).stat().st_mtime
        ):
            return export
        raise ModelDirError(
            f"{what}: the run's latest checkpoint {latest} is sharded (torchrun) and its HF export {export} is "
            "missing or older; finish the run (train --resume) to export it, or pass the checkpoint to "
            "`longcat2 train/sft --init`"
        )
    raise ModelDirError(
        f"{what}: not a model folder (no {CONFIG_FILE}) and no checkpoints/{STEP_PREFIX}* in it (expected a "
        f"model folder, a training run folder, or {DEFAULT_MODEL_NAME!r} for the embedded model)"
    )


def resolve_config(arg: str | Path, *, flag: str = "--config") -> Path:
    """A `config.json` file as given, else the folder `resolve_model_dir` finds (`ModelConfig.from_hf`
    reads either)."""
    p = Path(arg)
    return p if p.is_file() else resolve_model_dir(arg, flag=flag)
