"""The commands under torchrun with `--tp 2 --ep 2` equal one process: `generate` (rank 0 drives the lockstep
engine and prints, with and without speculative decoding) and `eval ppl|longctx` (every rank runs the same
evaluation on its shard, rank 0 reports; loss to fp32 rounding). `eval longctx` takes the same path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longcat2.data import prepare
from longcat2.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _run(nproc: int, *args: str, raw: bool = False) -> dict | str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if nproc == 1:
        cmd = [sys.executable, "-m", "longcat2", *args]
    else:
        cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "--monitor-interval=0.2",
               "-m", "longcat2", *args, "--tp", "2", "--ep", "2"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    if raw:
        return p.stdout
    return json.loads(p.stdout[p.stdout.index("{") :])  # rank 0 alone prints


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to the interpreter")
def test_eval_ppl_two_ranks_equals_one(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"f{i}.py").write_text(
            "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(60))
        )
    tok = train_tokenizer(sorted(corpus.glob("*.py")), 300, tmp_path / "tok")
    prepare(corpus, tok, tmp_path / "shards", val_fraction=0.5, seed=0)
    ppl = ["eval", "ppl", "--preset", "tiny", "--data", str(tmp_path / "shards"), "--seq-len", "96", "--json"]
    one, two = _run(1, *ppl), _run(2, *ppl)
    assert one["windows"] == two["windows"] > 0
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-5, (one, two)
    longctx = [
        "eval",
        "longctx",
        "--preset",
        "tiny",
        "--lengths",
        "96",
        "--depths",
        "2",
        "--per-cell",
        "1",
        "--json",
    ]
    assert _run(1, *longctx) == _run(2, *longctx)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to the interpreter")
def test_generate_two_ranks_prints_what_one_prints() -> None:
    prompt = ",".join(str(i % 500 + 3) for i in range(90))  # past tiny's top-64: the sparse path runs
    args = ["generate", "--preset", "tiny", "--prompt-ids", prompt, "--max-new-tokens", "12", "--ignore-eos"]
    args += ["--speculative"]  # (plain decoding through the same lockstep engine: test_inference.py)
    one, two = _run(1, *args, raw=True), _run(2, *args, raw=True)
    assert one.strip() and one == two  # the ids, printed once (rank 0)
