"""The `longcat2` command as a user runs it (subprocesses): a training run folder is a model for every
command that takes one, errors are one line without a traceback, `info`'s wording."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from longcat2.evals.ppl import evaluate_ppl
from longcat2.model.longcat import LongCatForCausalLM
from longcat2.serve import app as serve_app
from longcat2.serve.core import ServerConfig
from longcat2.train import run_checkpoint


def _cli(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longcat2", *argv], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(prepared, tmp_path_factory) -> tuple[Path, Path]:
    """(a `longcat2 train --out` folder after 4 steps with a checkpoint at 2 and 4, its prepared shards)."""
    out = tmp_path_factory.mktemp("run") / "out"
    r = _cli("train", "--preset", "tiny", "--data", str(prepared), "--out", str(out), "--steps", "4", "--save-every",
             "2", "--batch-size", "2", "--seq-len", "32", "--threads", "1", "--no-progress", "--no-plot")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out, prepared


def test_run_folder_means_its_latest_checkpoint_everywhere(run_dir):
    out, shards = run_dir
    latest = out / "checkpoints" / "step_00000004"
    assert run_checkpoint.latest_checkpoint(out / "checkpoints") == latest
    # eval ppl --model RUN_DIR: the numbers of the latest checkpoint
    r = _cli("eval", "ppl", "--model", str(out), "--data", str(shards), "--seq-len", "32", "--max-windows", "3",
             "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    want = evaluate_ppl(LongCatForCausalLM.from_pretrained(latest).eval(), shards, 32, 4, 3, 0)
    assert json.loads(r.stdout) == pytest.approx(want, rel=1e-5)
    # generate --model RUN_DIR: its tokenizer and weights
    r = _cli("generate", "--model", str(out), "--prompt", "def f", "--max-new-tokens", "4", "--ignore-eos")
    assert r.returncode == 0 and "4 generated tokens" in r.stderr, r.stderr
    # info --config RUN_DIR, serve --model RUN_DIR (resolved before anything loads)
    r = _cli("info", "--config", str(out))
    assert r.returncode == 0 and f"model: {out}" in r.stdout, r.stderr
    assert serve_app.resolve_model_dir(ServerConfig(model_dir=out)) == latest


def test_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    cases = [
        (["eval", "ppl", "--model", str(tmp_path), "--data", "stdlib"], "longcat2 eval ppl: error: --model "),
        (["info", "--config", str(tmp_path / "missing")], "longcat2 info: error: --config "),
        (
            ["generate", "--model", str(bad / "config.json"), "--prompt", "x"],
            "longcat2 generate: error: --model",
        ),
        (["info", "--config", str(bad)], "longcat2 info: error: config.json: not valid JSON"),
        (
            ["eval", "longctx", "--model", str(bad)],
            "longcat2 eval longctx: error: config.json: not valid JSON",
        ),
    ]
    for argv, start in cases:
        r = _cli(*argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(start), (argv, r.stderr)


def test_info_says_what_the_mtp_figure_is():
    r = _cli("info", "--preset", "longcat-2.0")
    assert r.returncode == 0, r.stderr
    assert "total parameters     1,638.62B (without the MTP head)" in r.stdout
    assert "MTP head             1.90B (not in the totals above)" in r.stdout
