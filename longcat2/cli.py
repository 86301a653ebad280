"""The `longcat2` command (also `python -m longcat2`, which torchrun launches).

Design: each concern owns its subcommand. A module listed in `_COMMAND_MODULES` exposes
`add_cli(subparsers)`, which registers its parser(s) and sets `func` to a callable taking the parsed
namespace and returning an exit code. Modules are imported lazily so `longcat2 --help` stays fast and a
broken optional dependency only breaks its own subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = [
    "longcat2.commands",  # info, presets, demo
    "longcat2.tokenizer",  # tokenizer train
    "longcat2.data",  # prepare
    "longcat2.train",  # train, sft
    "longcat2.plan",  # plan
    "longcat2.engine.cli",  # generate
    "longcat2.evals.cli",  # eval longctx, eval ppl
    "longcat2.serve.cli",  # serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longcat2", description="LongCat-2.0 in pure PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # the module itself is not written yet
                continue
            raise
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
