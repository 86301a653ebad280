"""`longcat2 generate` (the engine's CLI module, independent of the top-level command registry)."""

from __future__ import annotations

import argparse

import pytest

from longcat2.engine.cli import add_cli


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_generate_preset_prompt_ids(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "generate",
        "--preset",
        "tiny",
        "--prompt-ids",
        "5,6,7,8",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
    ]
    assert _run(argv) == 0
    out = capsys.readouterr()
    ids = [int(t) for t in out.out.strip().split(",")]
    assert len(ids) == 6 and all(0 <= t < 512 for t in ids)
    assert "6 generated tokens" in out.err
    assert _run([*argv, "--stream", "--speculative"]) == 0  # greedy: same ids, streamed
    streamed = capsys.readouterr().out.split()
    assert [int(t) for t in streamed] == ids


def test_generate_sampling_seed_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--preset", "tiny", "--prompt-ids", "9,10", "--max-new-tokens", "5", "--ignore-eos"]
    assert _run([*argv, "--temperature", "1.0", "--seed", "3"]) == 0
    a = capsys.readouterr().out
    assert _run([*argv, "--temperature", "1.0", "--seed", "3"]) == 0
    assert capsys.readouterr().out == a
    assert _run(["generate", "--preset", "tiny", "--prompt", "hello"]) == 2  # no tokenizer for a preset
    assert "prompt-ids" in capsys.readouterr().err
    assert _run(["generate", "--preset", "nope", "--prompt-ids", "1"]) == 2
