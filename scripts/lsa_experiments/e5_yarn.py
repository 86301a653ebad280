"""E5: YaRN length extension: train at L, evaluate passkey at 4L with DeepSeek-YaRN scaling (goal >= 90 %).

On E1's models (trained at L = 256, or 512 with --full, with rope_scaling null): the dense
control C (LSA off) and the sparse model S (LSA on), each evaluated at L, 2L, 4L with (a) no scaling and
(b) `rope_scaling = {"rope_type": "deepseek_yarn", "factor": 4, "original_max_position_embeddings": L,
"beta_fast": 32, "beta_slow": 1, "mscale": 1, "mscale_all_dim": 1}` set at load time (no fine-tuning), and
(c) the same YaRN scaling after a short fine-tune at 4L with it (default 60 steps, full 100; 0 = skip).

    .venv/bin/python scripts/lsa_experiments/e5_yarn.py                      # scaled (~4 min with the fine-tunes)
    .venv/bin/python scripts/lsa_experiments/e5_yarn.py --finetune-steps 0   # evaluation only (~1 min)
    .venv/bin/python scripts/lsa_experiments/e5_yarn.py --full               # on e1 --full's runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def yarn(factor: float, orig: int) -> dict:
    return {"rope_type": "deepseek_yarn", "factor": factor, "original_max_position_embeddings": orig,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument(
        "--finetune-steps", type=int, default=None, help="YaRN fine-tune steps at 4L (default 60, full 100)"
    )
    args = ap.parse_args()
    e1 = "e1_full" if args.full else "e1"
    L = 512 if args.full else 256  # e1's training length
    ft = args.finetune_steps if args.finetune_steps is not None else (100 if args.full else 60)
    depths, per_cell = (5, 10)
    lengths = [L, 2 * L, 4 * L]
    tag = "e5_full" if args.full else "e5"
    root = C.RUNS / tag
    t0 = time.time()
    arms = {"C dense": (C.RUNS / e1 / "C", "dense"), "S sparse": (C.RUNS / e1 / "S", "sparse")}
    for run, _ in arms.values():
        if C.latest(run) is None:
            raise SystemExit(f"run {e1} first: no checkpoint in {run}")
    if ft:
        task = "passkey"
        for name, (run, att) in list(arms.items()):
            key = name.split()[0]
            src = C.derive(run, root / f"{key}_yarn_init", rope_scaling=yarn(4.0, L))
            flags = [
                "--data",
                f"task:{task}",
                "--seq-len",
                str(4 * L),
                "--batch-size",
                "4",
                "--init",
                str(src),
                "--lr",
                "5e-4",
                "--warmup",
                "5",
                "--save-every",
                "0",
                "--eval-every",
                "0",
                "--attention",
                att,
            ]
            if att == "sparse":
                flags += ["--indexer-loss", "1"]
            C.train(root / f"{key}_yarn_ft", ft, flags)
            arms[f"{name} +YaRN ft"] = (root / f"{key}_yarn_ft", att)
    res: dict = {"L": L, "lengths": lengths, "finetune_steps": ft, "results": {}}
    for name, (run, att) in arms.items():
        variants = (
            {"YaRN x4 (fine-tuned)": {}}
            if "ft" in name
            else {"no scaling": {"rope_scaling": None}, "YaRN x4": {"rope_scaling": yarn(4.0, L)}}
        )
        for vname, fields in variants.items():
            m = C.load(run, att, **fields)
            r = C.longctx(m, "passkey", lengths, depths, per_cell)
            per_len = {n: sum(r["accuracy"][str(n)].values()) / len(r["depths"]) for n in lengths}
            res["results"][f"{name} / {vname}"] = per_len
            C.log(f"{name} / {vname}: " + " ".join(f"{n}:{v:.2f}" for n, v in per_len.items()))
    res["pass"] = {k: v[4 * L] >= 0.9 for k, v in res["results"].items()}
    res["total_wall_s"] = time.time() - t0
    C.save_json(tag, res)

    path = C.figure(tag)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for k, v in res["results"].items():
        ax.plot(lengths, [v[n] for n in lengths], "o-", label=k)
    ax.axhline(0.9, color="k", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel(f"context length (trained at {L})")
    ax.set_ylabel("passkey exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    C.save_figure(fig, path)
    print("E5 passkey at 4L: " + ", ".join(f"{k} {v[4 * L]:.2f}" for k, v in res["results"].items()))


if __name__ == "__main__":
    main()
