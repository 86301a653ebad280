"""Bit-exact resume: a run SIGKILLed twice (at arbitrary points) and resumed writes the same per-step
losses as an uninterrupted run. Real subprocesses, real SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longcat2.train import run_checkpoint
from longcat2.train.metrics import read_metrics


def _args(prepared: Path, out: Path, precision: str) -> list[str]:
    return [
        sys.executable, "-m", "longcat2", "train", "--data", str(prepared), "--out", str(out),
        "--steps", "14", "--batch-size", "4", "--seq-len", "64", "--save-every", "3", "--eval-every", "5",
        "--eval-batches", "2", "--deterministic", "--precision", precision, "--threads", "1", "--no-progress",
        "--no-plot", "--warmup", "2",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_lines(out: Path) -> int:
    return sum(1 for r in read_metrics(out / "metrics.jsonl") if r.get("type") == "train")


def _run_and_kill(args: list[str], out: Path, after_lines: int) -> None:
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while _train_lines(out) < after_lines:
            if proc.poll() is not None:
                raise AssertionError(
                    f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError("run made no progress")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def _signature(out: Path) -> list[tuple]:
    sig = []
    for r in read_metrics(out / "metrics.jsonl"):
        if r["type"] == "train":
            sig.append(
                ("train", r["step"], r["loss"], r["total_loss"], r["grad_norm"], r["ffn_experts_per_token"])
            )
        else:
            sig.append(("eval", r["step"], r["val_loss"]))
    return sig


_REFS: dict[str, Path] = {}


def _reference(prepared: Path, root: Path, precision: str) -> Path:
    """One uninterrupted run per precision, shared by the tests of this module."""
    if precision not in _REFS:
        ref = root / f"ref-{precision}"
        done = subprocess.run(
            _args(prepared, ref, precision), env=_env(), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        _REFS[precision] = ref
    return _REFS[precision]


@pytest.fixture(scope="module")
def ref_root(tmp_path_factory) -> Path:
    _REFS.clear()
    return tmp_path_factory.mktemp("refs")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_and_resume_is_bit_exact(prepared, tmp_path, ref_root, precision):
    ref, cut = _reference(prepared, ref_root, precision), tmp_path / "cut"
    # kill 1: around the first checkpoint; kill 2: mid-run
    _run_and_kill(_args(prepared, cut, precision), cut, after_lines=3)
    _run_and_kill(_args(prepared, cut, precision) + ["--resume"], cut, after_lines=9)
    done = subprocess.run(
        _args(prepared, cut, precision) + ["--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    a, b = _signature(ref), _signature(cut)
    assert [s[:2] for s in a] == [s[:2] for s in b]
    assert a == b  # bitwise: floats are compared exactly


def test_sigterm_stops_after_the_step_with_a_checkpoint(prepared, tmp_path, ref_root):
    ref, cut = _reference(prepared, ref_root, "fp32"), tmp_path / "term"
    proc = subprocess.Popen(
        _args(prepared, cut, "fp32"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    while _train_lines(cut) < 4 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"stopped by SIGTERM" in err
    steps = [r["step"] for r in read_metrics(cut / "metrics.jsonl") if r["type"] == "train"]
    ckpts = sorted((cut / "checkpoints").glob("step_*"))
    assert ckpts and int(ckpts[-1].name.split("_")[1]) == steps[-1]  # the last completed step is saved
    done = subprocess.run(
        _args(prepared, cut, "fp32") + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _signature(ref) == _signature(cut)


# ------------------------------------------------------------------ broken checkpoints (issue 20)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("."))


def _resume_to_the_end(prepared: Path, out: Path) -> str:
    done = subprocess.run(
        _args(prepared, out, "fp32") + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_sigkill_during_a_save_then_resume_is_bit_exact(prepared, tmp_path, ref_root):
    """SIGKILL while a checkpoint is being written (a `.tmp-step_*` directory exists): the resumed run
    starts from the previous complete checkpoint, removes the partial one and reproduces the curve."""
    ref, cut = _reference(prepared, ref_root, "fp32"), tmp_path / "cut"
    ckpts = cut / "checkpoints"
    proc = subprocess.Popen(_args(prepared, cut, "fp32"), env=_env(), stdout=subprocess.DEVNULL)
    caught: list[str] = []
    try:
        while proc.poll() is None and not caught:
            if ckpts.is_dir() and any(run_checkpoint.list_all(ckpts)):  # past the first save: catch the next
                caught = [n for n in os.listdir(ckpts) if n.startswith(".tmp-step_")]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert caught, "the run finished without being caught inside a save"
    assert _leftovers(cut), "the kill left no partial checkpoint"
    err = _resume_to_the_end(prepared, cut)
    assert "resumed from" in err
    assert _signature(ref) == _signature(cut)
    assert _leftovers(cut) == []


@pytest.mark.parametrize(
    "damage", ["truncate model.safetensors", "truncate trainer_state.pt", "delete trainer_state.pt"]
)
def test_resume_falls_back_past_a_broken_newest_checkpoint(prepared, tmp_path, ref_root, damage):  # fmt: skip
    """The newest checkpoint is unreadable: resume warns, naming it and the file, continues from the newest
    good one and reproduces the uninterrupted curve bit for bit; the broken step is rewritten when the run
    reaches it again (a directory without trainer_state.pt used to crash that save with `Directory not
    empty`, on every rerun) and nothing temporary is left behind."""
    ref, cut = _reference(prepared, ref_root, "fp32"), tmp_path / "cut"
    _run_and_kill(_args(prepared, cut, "fp32"), cut, after_lines=10)
    good, newest = [p for _, p in run_checkpoint.list_all(cut / "checkpoints")][-2:]
    action, name = damage.split()
    f = newest / name
    if action == "delete":
        f.unlink()
    else:
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    assert run_checkpoint.verify_checkpoint(newest) is not None
    err = _resume_to_the_end(prepared, cut)
    assert f"resumed from {good} " in err
    if action == "truncate":
        assert f"skips a checkpoint that cannot be read back: {newest.name}: {f}" in err
    assert _signature(ref) == _signature(cut)
    assert _leftovers(cut) == []
    remaining = sorted((cut / "checkpoints").iterdir())  # the rewritten step was pruned like any other
    assert remaining and all(run_checkpoint.verify_checkpoint(p) is None for p in remaining)
