"""The real launcher: torchrun with 2 processes, a rank killed mid-run, resume at another world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pdist_recipe as R
import pytest

from longcat2 import parallel as P

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
SCRIPT = HERE / "pdist_torchrun_train.py"


def _torchrun(nproc: int, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        str(TORCHRUN),
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--monitor-interval=0.2",
        str(SCRIPT),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parents[1])


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to the interpreter")
def test_torchrun_kill_one_rank_then_resume_on_one_process(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # 2 ranks, EP=2; rank 1 dies (SIGKILL) in the middle of step 3
    p = _torchrun(2, "--ep", "2", "--steps", "4", "--out", str(out), "--kill-rank", "1", "--kill-step", "3")
    log = p.stdout + p.stderr
    assert p.returncode != 0, log
    assert "ChildFailedError" in log and "Signal 9 (SIGKILL)" in log, (
        log
    )  # torchrun names the rank and signal
    root = out / "checkpoints"
    assert [s for s, _ in P.list_sharded(root)] == [1, 2], sorted(os.listdir(root))
    assert not (root / "step_00000003").exists()
    # the last good checkpoint is intact: it loads and reproduces the uninterrupted run's step 3
    model = R.make_model(seed=5)
    opt = R.make_optimizer(model)
    st = P.load_sharded(P.latest_sharded(root), model, opt)
    assert st.extra["step"] == 2 and st.saved_world_size == 2

    # resume the same run on ONE process (2 -> 1) with torchrun and finish it
    p = _torchrun(1, "--ep", "1", "--steps", "4", "--out", str(out), "--resume")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "written by 2 ranks) on 1" in p.stdout, p.stdout
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert [r["world_size"] for r in losses] == [2, 2, 1, 1]
    ref = R.reference(4)["losses"]
    for r in losses:
        want = ref[r["step"] - 1]
        assert abs(r["loss"] - want) <= 1e-5 * want, (r, want)
