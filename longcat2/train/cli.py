"""`longcat2 train` (pre-training) and `longcat2 sft` (chat fine-tuning): argparse wiring.

The flags are generated from `TrainConfig`'s fields (`--batch-size` ↔ `batch_size`), each with the
field's help text; flags not given on the command line are left out of the namespace, so a resumed run
can tell "changed on purpose" from "default". `sft` has its own defaults (`SFT_DEFAULTS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from longcat2.config import parse_override

SFT_DEFAULTS = {"out": "runs/sft", "steps": 200, "lr": 1e-3, "warmup": 10, "save_every": 50, "eval_every": 50}


def _add_config_args(p: argparse.ArgumentParser, mode: str) -> None:
    from longcat2.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = (
            SFT_DEFAULTS.get(f.name, getattr(defaults, f.name))
            if mode == "sft"
            else getattr(defaults, f.name)
        )
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_text, dest=f.name)
        hint = hints[f.name]
        if hint is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            p.add_argument(flag, action=action, **kw)
            continue
        base = (
            next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            if typing.get_args(hint)
            else hint
        )
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.name == "data" and mode == "sft":
            kw["required"] = True
        p.add_argument(flag, type=base, **kw)
    p.add_argument(
        "--model",
        dest="model_overrides",
        action="append",
        type=parse_override,
        default=argparse.SUPPRESS,
        metavar="KEY=VALUE",
        help="override a model config field of the preset (repeatable), e.g. --model hidden_size=128",
    )


def config_from_args(args: argparse.Namespace, mode: str) -> tuple[Any, set[str]]:
    """(TrainConfig, names of the fields given explicitly on the command line)."""
    from longcat2.train.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    values: dict[str, Any] = dict(SFT_DEFAULTS) if mode == "sft" else {}
    values.update(given)
    if "model_overrides" in values:
        values["model_overrides"] = dict(values["model_overrides"])
    values["mode"] = mode
    return TrainConfig(**values), set(given)


def _cmd(mode: str):
    def run_cmd(args: argparse.Namespace) -> int:
        from longcat2.train.trainer import run

        cfg, explicit = config_from_args(args, mode)
        return run(cfg, explicit)

    return run_cmd


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser(
        "train",
        help="pre-train a LongCat-architecture model (Muon, zero-expert budget control, resumable)",
        description=(
            "Pre-train from a preset on token shards, a text corpus, or 'stdlib' (tokenized on first use). "
            "Writes OUT/metrics.jsonl, OUT/loss.png and OUT/checkpoints/step_*/ (HF layout + trainer state)."
        ),
    )
    _add_config_args(t, "pretrain")
    t.set_defaults(func=_cmd("pretrain"))
    s = subparsers.add_parser(
        "sft",
        help="fine-tune on chat .jsonl (loss on assistant tokens only)",
        description=(
            "Supervised fine-tuning on OpenAI-style chats ({'messages': [...], 'tools': [...]} per line), "
            "rendered with the LongCat chat template; loss only on assistant tokens. Start from --init "
            "(a checkpoint, HF-layout dir or a train run's OUT) or a --preset with --tokenizer."
        ),
    )
    _add_config_args(s, "sft")
    s.set_defaults(func=_cmd("sft"))
