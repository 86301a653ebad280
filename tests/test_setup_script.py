"""scripts/setup.sh (what `make serve` / `make test` run first) says what it does before each slow step.

The script runs for real in a scratch copy; the interpreter it drives is a stand-in that records its
arguments (installing torch for real is what the README's commands and CI already do)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _scratch(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    return tmp_path


def test_setup_announces_each_step_before_running_it(tmp_path):
    repo = _scratch(tmp_path)
    log = tmp_path / "calls.log"
    venv_python = repo / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    # a venv whose python has no torch yet: every call is logged (interleaved with the script's messages)
    venv_python.write_text(
        f'#!/bin/sh\necho "python $*" >> {log}\ncase "$*" in *"import torch"*) exit 1 ;; esac\nexit 0\n'
    )
    venv_python.chmod(venv_python.stat().st_mode | stat.S_IXUSR)
    with open(log, "a") as err:  # the script's messages and the stand-in's calls, in order (O_APPEND)
        done = subprocess.run(
            ["bash", "scripts/setup.sh", "--dev"],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHON": "python3"},
        )
    lines = log.read_text().splitlines()
    assert done.returncode == 0, lines
    installs = [i for i, ln in enumerate(lines) if ln.startswith("python -m pip install")]
    assert len(installs) == 2  # torch, then longcat2 with the dev extra
    assert "torch==2.13.0" in lines[installs[0]] and ".[dev]" in lines[installs[1]]
    for i in installs:  # the line before each install says what it is about to do
        assert lines[i - 1].startswith("setup: installing"), lines[: i + 1]


def test_setup_says_it_creates_the_venv_and_rejects_unknown_options(tmp_path):
    repo = _scratch(tmp_path)
    fresh = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=repo, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHON": "false"},
    )  # fmt: skip
    assert fresh.returncode != 0  # `false -m venv` cannot create it; the message came first
    assert fresh.stderr.startswith("setup: creating the virtual environment .venv")
    bad = subprocess.run(["bash", "scripts/setup.sh", "--gpu"], cwd=repo, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --gpu" in bad.stderr
