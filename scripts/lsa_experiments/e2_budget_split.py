"""E2: LSA budget split on MQAR: accuracy vs top-k and the forced sink/local share (sparse_attention.md §4.5 E2).

Protocol: D = dense pre-training on MQAR; W = indexer-only dense warm-up (dense-row KL: independent of the
top-k, so one warm-up serves every budget). Then an evaluation-only sweep: the W model run sparse with
index_topk = k and a forced share f of the budget given to sink (1/4 of the forced part) and local (3/4)
tokens, for several numbers of key-value pairs. The dense model (LSA off) is the reference. `--full` adds
a sparse stage S per top-k (the documented version).

    .venv/bin/python scripts/lsa_experiments/e2_budget_split.py          # scaled MQAR (~10 min, 1 core)
    .venv/bin/python scripts/lsa_experiments/e2_budget_split.py --task passkey   # E1's models (~3 min)
    .venv/bin/python scripts/lsa_experiments/e2_budget_split.py --full

`--task passkey` runs the same sweep on E1's checkpoints (D dense reference, W = warmed-up indexer) with the
7-token passkey needle (KEY d1..d5 SEP) as the "many needle tokens": it breaks when the dynamic slots
(top-k minus forced) are fewer than the needle tokens. Used for the scaled report because the scaled MQAR
stage D (350 steps) did not learn MQAR (val loss 4.00 vs chance 4.16).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

SCALED = dict(w_lr=1e-2, seq=256, batch=16, n_pairs_train=24, d_steps=800, w_steps=80, s_steps=0, log_k=16,
              topks=[4, 8, 16, 32, 64], shares=[0.0, 0.25, 0.5, 0.75], pairs=[8, 16, 24],
              depths=3, per_cell=8, model=[])  # fmt: skip
FULL = dict(w_lr=3e-3, seq=512, batch=16, n_pairs_train=32, d_steps=1200, w_steps=200, s_steps=600, log_k=64,
            topks=[8, 16, 32, 64, 128], shares=[0.0, 0.25, 0.5, 0.75], pairs=[16, 24, 32, 48],
            depths=5, per_cell=8,
            model=["hidden_size=128", "ffn_hidden_size=256", "q_lora_rank=64", "kv_lora_rank=64",
                   "qk_nope_head_dim=32", "qk_rope_head_dim=16", "v_head_dim=32", "index_head_dim=32"])  # fmt: skip


P_PASSKEY = dict(topks=[8, 12, 16, 32, 64], shares=[0.0, 0.25, 0.5, 0.75], lengths=[256, 512], depths=5,
                 per_cell=8, seq=256)  # fmt: skip
P_PASSKEY_FULL = dict(topks=[16, 32, 64, 128, 256], shares=[0.0, 0.25, 0.5, 0.75], lengths=[1024, 4096],
                      depths=10, per_cell=8, seq=1024)  # fmt: skip


def split(k: int, share: float) -> tuple[int, int]:
    forced = int(round(k * share))
    sink = forced // 4
    return sink, forced - sink


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--task", choices=["mqar", "passkey"], default="mqar")
    args = ap.parse_args()
    P = dict(FULL if args.full else SCALED)
    tag = ("e2_full" if args.full else "e2") + ("_passkey" if args.task == "passkey" else "")
    root = C.RUNS / tag
    if args.task == "passkey":
        P.update(P_PASSKEY_FULL if args.full else P_PASSKEY)
        return sweep(P, C.RUNS / ("e1_full" if args.full else "e1"), tag, "passkey", {}, time.time())
    t0 = time.time()
    model_flags = [f for m in P["model"] for f in ("--model", m)]
    data = ["--data", f"task:mqar:n_pairs={P['n_pairs_train']}", "--seq-len", str(P["seq"]),
            "--batch-size", str(P["batch"])]  # fmt: skip
    every = ["--save-every", "0", "--eval-every", "50", "--eval-batches", "4"]
    stage = ["--lr", "1e-3", "--warmup", "10"]
    w_lr = ["--lr", str(P["w_lr"]), "--warmup", "10"]  # indexer-only: a tiny indexer needs a larger LR
    walls = {}
    walls["D"] = C.train(
        root / "D",
        P["d_steps"],
        [*data, *every, "--attention", "dense", "--model", "rope_scaling=null", *model_flags],
    )["wall_s"]
    sink, local = split(P["log_k"], 0.25)
    d_lsa = C.derive(
        root / "D", root / "D_lsa", index_topk=P["log_k"], index_init_tokens=sink, index_local_tokens=local
    )
    w = C.warmup_stage(root / "W", P["w_steps"], [*data, *every, *w_lr], d_lsa)
    walls["W"] = w["wall_s"]
    s_runs = {}
    if P["s_steps"]:
        for k in P["topks"]:
            sk, lc = split(k, 0.25)
            src = C.derive(
                root / "W", root / f"W_k{k}", index_topk=k, index_init_tokens=sk, index_local_tokens=lc
            )
            walls[f"S_k{k}"] = C.train(
                root / f"S_k{k}", P["s_steps"],
                [*data, *every, *stage, "--init", str(src), "--attention", "sparse", "--indexer-loss", "1"],
            )["wall_s"]  # fmt: skip
            s_runs[k] = root / f"S_k{k}"

    sweep(P, root, tag, "mqar", s_runs, t0, walls)


def sweep(
    P: dict, root: Path, tag: str, task: str, s_runs: dict, t0: float, walls: dict | None = None
) -> None:
    te = time.time()
    res: dict = {
        "params": P,
        "wall_s": walls or {},
        "task": task,
        "dense": {},
        "sweep": [],
        "sparse_trained": [],
    }
    if task == "mqar":
        cells = {f"{n} pairs": (P["seq"], {"n_pairs": n}) for n in P["pairs"]}
        rec_batch = C.task_batch("mqar", 4, P["seq"], n_pairs=P["n_pairs_train"])
    else:
        cells = {f"T={L}": (L, {}) for L in P["lengths"]}
        rec_batch = C.task_batch("passkey", 4, P["lengths"][0])
    P["pairs"] = list(cells)

    def evaluate(m) -> dict:
        return {
            c: C.longctx(m, task, [L], P["depths"], P["per_cell"], **kw)["mean"]
            for c, (L, kw) in cells.items()
        }

    res["dense"] = evaluate(C.load(root / "D", "dense"))
    C.log(f"dense: {res['dense']}")
    for k in P["topks"]:
        for share in P["shares"]:
            sk, lc = split(k, share)
            m = C.load(root / "W", "sparse", index_topk=k, index_init_tokens=sk, index_local_tokens=lc)
            row = {
                "topk": k,
                "share": share,
                "sink": sk,
                "local": lc,
                "dynamic": k - sk - lc,
                "acc": evaluate(m),
            }
            rec = C.sublayer_recall(m, rec_batch)
            row["recall"] = rec
            res["sweep"].append(row)
            C.log(
                f"k={k} share={share}: dyn {row['dynamic']} acc {row['acc']} "
                f"recall all rows {[round(r['sub0'], 3) for r in rec]}, query rows {[round(r['sub0_ans'], 3) for r in rec]}"
            )
        if k in s_runs:
            m = C.load(s_runs[k], "sparse")
            acc = evaluate(m)
            res["sparse_trained"].append({"topk": k, "share": 0.25, "acc": acc})
    res["eval_wall_s"] = time.time() - te
    res["total_wall_s"] = time.time() - t0
    C.save_json(tag, res)

    path = C.figure(tag)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(P["pairs"]), figsize=(3.4 * len(P["pairs"]), 3.3), sharey=True)
    for ax, n in zip(axes, P["pairs"]):
        for share in P["shares"]:
            rows = [r for r in res["sweep"] if r["share"] == share]
            ax.plot([r["topk"] for r in rows], [r["acc"][n] for r in rows], "o-", label=f"forced {share:.0%}")
        ax.axhline(res["dense"][n], color="k", ls="--", lw=1, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_title(
            f"MQAR, {n}, T={P['seq']}" if task == "mqar" else f"passkey (7-token needle), {n}", fontsize=9
        )
        ax.set_xlabel("index_topk")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("query accuracy" if task == "mqar" else "exact match")
    axes[0].legend(fontsize=7)
    C.save_figure(fig, path)


if __name__ == "__main__":
    main()
