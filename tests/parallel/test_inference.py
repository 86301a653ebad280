"""Tensor + expert parallel inference under real torchrun / gloo processes (pinfer_worker.py) vs one process.

Two launches cover tiny (LSA sparse path, N-gram, MTP), tiny-flash and tiny-flash-lite in the layouts
TP2, EP2, TP2+EP2 on the same 2 ranks, the 2 × 2 grid (TP2 × EP2 on 4 ranks) and TP4+EP4: greedy tokens of
a prompt batch (and a seeded sampled request) equal one process's, with and without speculative decoding;
an unseeded sampled request gets the same tokens on every rank (seed drawn on rank 0); full-forward logits
agree to fp32 rounding, and each rank holds its share of the sharded parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
PRESETS = ("tiny", "tiny-flash", "tiny-flash-lite")


def _launch(nproc: int, layouts: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parents[1]), env.get("PYTHONPATH")]))
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "--monitor-interval=0.2",
           str(HERE / "pinfer_worker.py"), "--layouts", layouts, "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=HERE.parents[1])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-8000:]
    return json.loads(out.read_text())


def _check(records: list[dict], layouts: set[tuple[int, int]]) -> None:
    assert {(r["preset"], r["tp"], r["ep"]) for r in records} == {
        (p, *lay) for p in PRESETS for lay in layouts
    }
    for r in records:
        where = f"{r['preset']} tp={r['tp']} ep={r['ep']}"
        assert r["tokens_spec0"] == r["ref_spec0"], where
        assert r["tokens_spec1"] == r["ref_spec1"], where + " (speculative)"
        assert r["max_logit_diff"] <= 1e-5 * max(1.0, r["logit_scale"]), where
        if r["preset"] == "tiny":
            assert r["sparse_calls"] > 0, where  # the LSA sparse path ran
        for b in r["bytes_per_rank"]:  # each rank holds 1/degree of every sharded family (± uneven rows)
            assert b["sharded"] == pytest.approx(r["expected_sharded"], rel=0.02), where
            assert b["total"] < r["full_bytes"], where


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to the interpreter")
def test_two_processes_tp2_ep2_and_both(tmp_path: Path) -> None:
    _check(_launch(2, "2x1,1x2,2x2", tmp_path / "r.json"), {(2, 1), (1, 2), (2, 2)})


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to the interpreter")
def test_four_processes_tp2_x_ep2_grid_and_tp4_ep4(tmp_path: Path) -> None:
    _check(_launch(4, "2x2,4x4", tmp_path / "r.json"), {(2, 2), (4, 4)})
