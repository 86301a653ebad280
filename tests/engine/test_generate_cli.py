"""`longcat2 generate`: the engine's CLI module on its own, and the real command in a subprocess (the
embedded default model, the EOS left out of the text, one-line errors)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from longcat2.config import ModelConfig
from longcat2.engine.cli import add_cli
from longcat2.model.longcat import LongCatForCausalLM
from longcat2.model_dir import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME


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
    with pytest.raises(SystemExit):  # argparse: invalid choice, exit status 2
        _run(["generate", "--preset", "nope", "--prompt-ids", "1"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def _generate(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longcat2", "generate", *argv], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


CHAT_PROMPT = "<longcat_user>What is your name?<longcat_assistant>"


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no embedded default model")
def test_embedded_model_is_the_default_and_eos_is_not_printed() -> None:
    plain = _generate("--prompt", CHAT_PROMPT, "--max-new-tokens", "40")
    assert plain.returncode == 0, plain.stderr
    assert "finish: stop" in plain.stderr  # the model ended its answer with EOS ...
    assert "LongCat" in plain.stdout and "</longcat_s>" not in plain.stdout  # ... which is not printed
    named = _generate(
        "--model", DEFAULT_MODEL_NAME, "--prompt", CHAT_PROMPT, "--max-new-tokens", "40", "--stream"
    )
    assert named.returncode == 0, named.stderr
    assert named.stdout == plain.stdout  # the same model by its name, streamed: the same text, no EOS
    assert "</longcat_s>" not in named.stdout and "finish: stop" in named.stderr


def test_bad_model_is_one_line_without_traceback(tmp_path) -> None:
    r = _generate("--model", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"longcat2 generate: error: --model {tmp_path}: not a model folder (no config.json) and no "
        "checkpoints/step_* in it (expected a model folder, a training run folder, or 'longcat-2.0-tiny' for "
        "the embedded model)"
    ]


def test_generate_with_fp8_index_keys_and_hierarchical_indexing(capsys: pytest.CaptureFixture[str]) -> None:
    """--index-dtype fp8 and --override lsa_hi=true... reach the engine (a 200-token prompt: HI selects pages
    from 96 keys on); a key that is not an inference setting is refused with its name."""
    prompt = ",".join(str(5 + i % 400) for i in range(200))
    hi = ["--override", "lsa_hi=true", "--override", "lsa_hi_page_size=16", "--override", "lsa_hi_block_size=4",
          "--override", "lsa_hi_top_pages=6", "--override", "lsa_hi_min_len=96"]  # fmt: skip
    base = ["generate", "--preset", "tiny", "--prompt-ids", prompt, "--max-new-tokens", "4", "--ignore-eos"]
    assert _run([*base, "--index-dtype", "fp8", *hi]) == 0
    assert len(capsys.readouterr().out.strip().split(",")) == 4
    with pytest.raises(Exception, match="index_topk: not an inference-time setting"):
        _run([*base, "--override", "index_topk=8"])
