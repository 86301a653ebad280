"""`python -m longcat2.serve ARGS` = `longcat2 serve ARGS`."""

from __future__ import annotations

import argparse
import sys

from longcat2.cli import run_command
from longcat2.serve.cli import add_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longcat2.serve")
    sub = parser.add_subparsers(dest="command")
    add_cli(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
