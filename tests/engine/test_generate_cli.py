"""`longcat2 generate` (the engine's CLI module, independent of the top-level command registry)."""

from __future__ import annotations

import argparse

import pytest
import torch

from longcat2.config import ModelConfig
from longcat2.engine.cli import add_cli
from longcat2.model.longcat import LongCatForCausalLM


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
    torch.manual_seed(0)  # the preset's weights: seeded by --seed, 0 by default
    model = LongCatForCausalLM(ModelConfig.from_preset("tiny")).eval()
    seq = [5, 6, 7, 8]
    with torch.no_grad():  # greedy by full forward passes, no engine
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert ids == seq[4:]
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
