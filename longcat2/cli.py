"""The `longcat2` command (also `python -m longcat2`, which torchrun launches).

Design: each package owns its subcommands in its `cli` module (`longcat2.commands` holds the general
ones: info, presets, demo). A module listed in `_COMMAND_MODULES` exposes `add_cli(subparsers)`, which
registers its parser(s) and sets `func` to a callable taking the parsed namespace and returning an exit
code; this is the only place commands are registered. Modules are imported lazily so `longcat2 --help`
stays fast and a broken optional dependency only breaks its own subcommand.

Errors: a command that fails prints one line, `longcat2 COMMAND: error: ...`, and exits non-zero, never a
traceback (as pip, git or `vllm serve` argument errors do). Bad input (a `ValueError` such as `ConfigError`,
`ModelDirError`, `CheckpointError`, `DataError`, or an `OSError` such as a missing file) exits 2 like an
argparse error; anything else is a bug: exit 1 and the exception's type in the line. `LONGCAT2_TRACEBACK=1`
shows the traceback. Ctrl-C exits 130 without one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

_COMMAND_MODULES = [
    "longcat2.commands",  # info, presets, demo
    "longcat2.data.cli",  # tokenizer train, prepare
    "longcat2.train.cli",  # train, sft
    "longcat2.plan.cli",  # plan
    "longcat2.engine.cli",  # generate
    "longcat2.evals.cli",  # eval longctx, eval ppl
    "longcat2.serve.cli",  # serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longcat2", description="LongCat-2.0 in pure PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def run_command(args: argparse.Namespace, prog: str = "longcat2") -> int:
    """Run a parsed command; an exception becomes one line on stderr and an exit status (module docstring)."""
    name = " ".join(
        x for x in (prog, getattr(args, "command", None), getattr(args, "eval_command", None)) if x
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("LONGCAT2_TRACEBACK"):
            raise
        user_error = isinstance(e, (ValueError, OSError))
        detail = str(e) if user_error and str(e) else f"{type(e).__name__}: {e}"
        hint = "" if user_error else " (LONGCAT2_TRACEBACK=1 shows the traceback)"
        print(f"{name}: error: {detail}{hint}", file=sys.stderr)
        return 2 if user_error else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
