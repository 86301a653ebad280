"""`longcat2 train` on the scale-out stack with the real torchrun: 2 processes with EP=2 against one process on
the same global batch, that sharded run resumed on one process, and a one-process checkpoint resumed on 2
ranks. Plus the trainer's device/precision and `--ep` checks (no processes started)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longcat2.model import LongCatForCausalLM
from longcat2.train import run_checkpoint
from longcat2.train.config import TrainConfig, TrainingError
from longcat2.train.env import bf16_supported, resolve_precision
from longcat2.train.metrics import read_metrics
from longcat2.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
RTOL = 1e-5
# fp32 + AdamW: parity to 1e-5 is an fp32 property (Muon's bf16 Newton-Schulz rounds differently when
# sharded); a constant schedule, so a run extended with --steps on resume follows the same LR curve.
COMMON = dict(
    preset="tiny-flash", seq_len=32, optimizer="adamw", precision="fp32", save_every=2, eval_every=0,
    warmup=2, schedule="constant", device="cpu", progress=False, plot=False,
)  # fmt: skip


def _flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [flag, str(v)]
    return out


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p


def _train_recs(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]


def _close(got: list[dict], want: list[dict], what: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], what
    for g, w in zip(got, want):
        for key, rtol in (("loss", RTOL), ("total_loss", RTOL), ("grad_norm", 1e-4)):
            assert abs(g[key] - w[key]) <= rtol * abs(w[key]), (
                f"{what}: step {g['step']} {key}: {g[key]} vs {w[key]}"
            )
        assert g["ffn_experts_per_token"] == pytest.approx(w["ffn_experts_per_token"], abs=1e-6), what


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    sb = b.state_dict()
    for name, t in a.state_dict().items():
        torch.testing.assert_close(t, sb[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> Path:
    """One process, global batch 4, 7 steps (in this process), every checkpoint kept."""
    ref = tmp_path_factory.mktemp("ref")
    cfg = TrainConfig(data=str(prepared), out=str(ref), steps=7, batch_size=4, keep_checkpoints=0, **COMMON)
    assert Trainer(cfg).train() == 0
    return ref


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "--monitor-interval=0.2", *args]
    return _run(cmd, timeout=240)


needs_torchrun = pytest.mark.skipif(
    not TORCHRUN.exists(), reason="torchrun is not installed next to the interpreter"
)


@needs_torchrun
def test_torchrun_ep2_matches_one_process_then_resumes_on_one(prepared, reference, tmp_path):
    want = _train_recs(reference)
    ref_model = lambda step: run_checkpoint.load_model(reference / "checkpoints" / f"step_{step:08d}")  # noqa: E731
    # torchrun, 2 processes x batch 2, EP=2 (+ FSDP2 of the dense weights): the same first 4 steps
    out = tmp_path / "ep2"
    args = ["-m", "longcat2", "train", *_flags(data=prepared, out=out, threads=1, **COMMON)]
    _torchrun(2, *args, *_flags(steps=4, batch_size=2, ep=2))
    _close(_train_recs(out), want[:4], "torchrun 2 ranks, ep 2")
    root = out / "checkpoints"
    ckpts = run_checkpoint.list_all(root)
    assert [s for s, _ in ckpts] == [2, 4] and all(run_checkpoint.is_sharded(p) for _, p in ckpts)
    assert json.loads((ckpts[-1][1] / "meta.json").read_text())["world_size"] == 2
    assert (ckpts[-1][1] / "tokenizer.json").is_file()
    # the full HF export loads with from_pretrained and equals the one-process weights at step 4
    hf = LongCatForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    assert (out / "hf" / "tokenizer.json").is_file()
    _assert_same_weights(hf, ref_model(4), atol=1e-5)

    # resume the sharded run on ONE process; batch 2 x 2 accum keeps the global batch of 4
    p = _run([sys.executable, *args, *_flags(steps=6, batch_size=2, grad_accum=2, resume=True)], timeout=180)
    assert "resumed from" in p.stderr and "step_00000004" in p.stderr
    assert "global batch changes" not in p.stderr
    _close(_train_recs(out), want[:6], "2 ranks for steps 1-4, then 1 process from the sharded checkpoint")
    assert [s for s, _ in run_checkpoint.list_all(root)] == [4, 6]  # keep_checkpoints 2
    last = run_checkpoint.latest_checkpoint(root)
    assert run_checkpoint.is_sharded(last)  # the run stays sharded
    assert json.loads((last / "meta.json").read_text())["world_size"] == 1
    final = run_checkpoint.load_model(
        run_checkpoint.resolve_init(out)
    )  # a sharded checkpoint, as --init reads it
    _assert_same_weights(final, LongCatForCausalLM.from_pretrained(out / "hf", dtype=torch.float32), atol=0)
    _assert_same_weights(final, ref_model(6), atol=1e-5)


@needs_torchrun
def test_one_process_checkpoint_resumes_on_two_ranks(prepared, reference, tmp_path):
    # the one-process run's HF-layout step 6 continued by 2 ranks: weights, step, schedule and data position
    # carry over, the optimizer moments restart (step 7's loss is measured before its update: still equal)
    out = tmp_path / "hf2"
    shutil.copytree(reference / "checkpoints" / "step_00000006", out / "checkpoints" / "step_00000006")
    args = _flags(data=prepared, out=out, threads=1, **COMMON)
    p = _torchrun(2, "-m", "longcat2", "train", *args, *_flags(steps=7, batch_size=2, ep=2, resume=True))
    assert "optimizer moments restart on 2 ranks" in p.stderr, p.stderr[-3000:]
    assert "global batch changes" not in p.stderr
    _close(_train_recs(out), _train_recs(reference)[6:7], "2 ranks resumed from a one-process checkpoint")
    layouts = [(s, run_checkpoint.is_sharded(d)) for s, d in run_checkpoint.list_all(out / "checkpoints")]
    assert layouts == [(6, False), (7, True)]


def test_device_precision_and_ep_checks(prepared, tmp_path):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert bf16_supported(torch.device("meta")) is False  # no autocast for the device type
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if bf16_supported(cpu) else None)
    assert resolve_precision("bf16", cpu) == torch.bfloat16  # emulated where the CPU has no bf16 kernels
    with pytest.raises(TrainingError, match=r"^ep: .*\(2\) must divide the world size \(1\)"):
        Trainer(
            TrainConfig(
                data=str(prepared), out=str(tmp_path / "ep"), steps=1, batch_size=2, **{**COMMON, "ep": 2}
            )
        )
