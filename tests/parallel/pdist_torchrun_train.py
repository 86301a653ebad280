"""A small training job for `torchrun` (used by test_torchrun.py; also a template for scripts of your own).

    torchrun --standalone --nproc_per_node=2 tests/parallel/pdist_torchrun_train.py --ep 2 --steps 4 --out OUT

Each step trains the tiny recipe model on its slice of the global batch, then writes a sharded checkpoint
OUT/checkpoints/step_XXXXXXXX and appends the step's loss to OUT/metrics.jsonl (rank 0). `--resume`
continues from the newest complete checkpoint at whatever world size this launch has. `--kill-rank R
--kill-step S` makes rank R SIGKILL itself in the middle of step S (after its forward), for the failure test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pdist_recipe as R  # noqa: E402

from longcat2 import parallel as P  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-step", type=int, default=-1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = P.init_distributed(ep=args.ep, timeout_s=120)
    out = Path(args.out)
    root = out / "checkpoints"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        removed = P.remove_partial(root)
        if removed:
            print(f"removed partial checkpoint writes: {removed}", flush=True)
    P.barrier()
    model = R.make_model()
    P.parallelize(model, info.mesh, ep=args.ep)
    opt = R.make_optimizer(model)
    bias = R.BiasUpdate(model)
    start = 0
    if args.resume:
        ckpt = P.latest_sharded(root)
        if ckpt is None:
            raise SystemExit(f"--resume: no complete checkpoint under {root}")
        st = P.load_sharded(ckpt, model, opt)
        start = int(st.extra["step"])
        if info.is_main:
            print(f"resumed {ckpt} (written by {st.saved_world_size} ranks) on {info.world_size}", flush=True)
    data = R.batches(args.steps)
    for step in range(start, args.steps):
        seq = R.local_slice(data[step], info.rank, info.world_size)
        if info.rank == args.kill_rank and step + 1 == args.kill_step:
            R.loss_fn(model, seq)  # mid-step: the other ranks are inside their collectives
            os.kill(os.getpid(), signal.SIGKILL)
        (loss,) = R.train(model, opt, [data[step]], info.rank, info.world_size, bias)
        P.save_sharded(root / f"step_{step + 1:08d}", model, opt, extra={"step": step + 1})
        if info.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": loss, "world_size": info.world_size}) + "\n")
    if info.is_main:
        print(f"done: step {args.steps} on {info.world_size} rank(s)", flush=True)
    P.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
