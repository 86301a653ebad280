"""E1: passkey parity, dense vs LSA with the same budget and the same data (sparse_attention.md §4.5 E1).

Protocol: D = dense pre-training on the task; W = indexer-only dense warm-up (dense-row KL) from D with the
LSA budget set; S = sparse training (LM loss + selected-set KL) from W; C = dense control, continued from D
for the same steps and LR as S. Evaluated: passkey exact match per length x depth (C dense, S sparse, and W
sparse = converted without sparse training), per-sublayer indexer recall.
Pass: |acc(S) - acc(C)| <= 2 points at every evaluated length; recall >= 0.95.

    .venv/bin/python scripts/lsa_experiments/e1_passkey_parity.py          # scaled (~20 min, 1 core)
    .venv/bin/python scripts/lsa_experiments/e1_passkey_parity.py --full   # §4.5 size at T=512 (~45 min)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

SCALED = dict(w_lr=1e-2,
    task="passkey", seq=256, batch=16, d_steps=400, w_steps=100, s_steps=200, topk=32, sink=4, local=8,
    lengths=[256, 512, 1024, 2048], depths=5, per_cell=10, model=[],
)  # fmt: skip
# sparse_attention.md §4.5's common model (d_model 128, MLA kv 64 + rope 16, indexer 4 x 32, top-k 64 with
# 4 sink + 32 local) and E1 schedule (D 1200, W 200, S 600, control 600) at T = 512
FULL = dict(w_lr=3e-3,
    task="passkey", seq=512, batch=8, d_steps=1200, w_steps=200, s_steps=600, topk=64, sink=4, local=32,
    lengths=[512, 1024, 2048, 4096], depths=5, per_cell=8,
    model=["hidden_size=128", "ffn_hidden_size=256", "q_lora_rank=64", "kv_lora_rank=64",
           "qk_nope_head_dim=32", "qk_rope_head_dim=16", "v_head_dim=32", "index_head_dim=32"],
)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    P = FULL if args.full else SCALED
    root = C.RUNS / ("e1_full" if args.full else "e1")
    t0 = time.time()
    model_flags = [f for m in P["model"] for f in ("--model", m)]
    # the training rows as files (`longcat2 prepare --task`): every stage reads the same prepared data
    rows = P["batch"] * max(P["d_steps"], P["s_steps"])
    data_dir = C.prepare_task(root / "data", P["task"], P["seq"], rows)
    data = ["--data", str(data_dir), "--seq-len", str(P["seq"]), "--batch-size", str(P["batch"])]
    every = ["--save-every", "0", "--eval-every", "50", "--eval-batches", "4"]
    walls = {}
    # stage D: dense pre-training (the indexer exists but is never used or trained)
    walls["D"] = C.train(
        root / "D", P["d_steps"],
        [*data, *every, "--attention", "dense", "--model", "rope_scaling=null", *model_flags],
    )["wall_s"]  # fmt: skip
    budget = dict(index_topk=P["topk"], index_init_tokens=P["sink"], index_local_tokens=P["local"])
    d_lsa = C.derive(root / "D", root / "D_lsa", **budget)
    stage = ["--lr", "1e-3", "--warmup", "10"]
    w_lr = ["--lr", str(P["w_lr"]), "--warmup", "10"]  # indexer-only: a tiny indexer needs a larger LR
    # stage W: indexer-only dense warm-up
    w = C.warmup_stage(root / "W", P["w_steps"], [*data, *every, *w_lr], d_lsa)
    walls["W"] = w["wall_s"]
    # stage S: sparse training; control C: dense, same steps / LR / data from D
    s, c = C.sparse_and_control(root, P["s_steps"], [*data, *every, *stage])
    walls["S"], walls["C"] = s["wall_s"], c["wall_s"]

    # evaluation
    import torch

    torch.manual_seed(0)
    te = time.time()
    arms = {"C dense": (root / "C", "dense"), "S sparse": (root / "S", "sparse"), "W sparse": (root / "W", "sparse"),
            "D dense": (root / "D", "dense")}  # fmt: skip
    res: dict = {"params": P, "arms": {}, "wall_s": walls}
    for name, (run, att) in arms.items():
        m = C.load(run, att)
        r = C.longctx(m, "passkey", P["lengths"], P["depths"], P["per_cell"])
        per_len = {L: sum(r["accuracy"][str(L)].values()) / len(r["depths"]) for L in P["lengths"]}
        entry = {"mean": r["mean"], "per_length": per_len, "grid": r["accuracy"], "depths": r["depths"]}
        if "niah" in P["task"]:  # the full run trains on passkey+niah: report multi-key NIAH as well
            rn = C.longctx(m, "niah", P["lengths"], P["depths"], P["per_cell"])
            entry["niah_per_length"] = {
                L: sum(rn["accuracy"][str(L)].values()) / len(rn["depths"]) for L in P["lengths"]
            }
        if att == "sparse":
            entry["recall"] = {
                L: C.sublayer_recall(m, C.task_batch("passkey", 4, L)) for L in P["lengths"] if L <= 1024
            }
        res["arms"][name] = entry
        C.log(f"{name}: mean {r['mean']:.3f} " + " ".join(f"{L}:{v:.2f}" for L, v in per_len.items()))
    res["train_recall_last"] = {
        k: C.mean_last(m["metrics"], "indexer_recall") for k, m in (("W", w), ("S", s))
    }
    # the most any top-k keys can capture of the same rows: recall / ceiling = how good the indexer is
    res["train_recall_ceiling_last"] = {
        k: C.mean_last(m["metrics"], "indexer_recall_ceiling") for k, m in (("W", w), ("S", s))
    }
    L0 = P["lengths"][0]
    res["answer_row_recall"] = {
        arm: {str(L0): [{k: round(v, 4) for k, v in r.items()} for r in e["recall"][L0]]}
        for arm, e in res["arms"].items() if "recall" in e
    }  # fmt: skip
    res["eval_wall_s"] = time.time() - te
    res["total_wall_s"] = time.time() - t0
    gaps = {L: 100 * (res["arms"]["S sparse"]["per_length"][L] - res["arms"]["C dense"]["per_length"][L])
            for L in P["lengths"]}  # fmt: skip
    res["gap_points"] = gaps
    res["pass_parity"] = all(abs(g) <= 2 for g in gaps.values())
    res["pass_recall"] = res["train_recall_last"]["S"] >= 0.95
    C.save_json("e1_full" if args.full else "e1", res)
    plot(res, s["metrics"], w["metrics"], "e1_full" if args.full else "e1")
    rc = res["train_recall_ceiling_last"]
    print(
        f"E1 gaps (S - C, points): {gaps}; recall W {res['train_recall_last']['W']:.3f} "
        f"S {res['train_recall_last']['S']:.3f} (ceiling W {rc['W'] or float('nan'):.3f} S {rc['S'] or float('nan'):.3f}); "
        f"parity pass {res['pass_parity']}, recall pass {res['pass_recall']}"
    )


def plot(res: dict, s_metrics: list, w_metrics: list, name: str) -> None:
    path = C.figure(name)
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, e in res["arms"].items():
        Ls = list(e["per_length"])
        a.plot(Ls, [e["per_length"][L] for L in Ls], "o-", label=arm)
    a.set_xscale("log", base=2)
    a.set_xlabel(f"context length (train length {res['params']['seq']})")
    a.set_ylabel("passkey exact match")
    a.set_ylim(-0.02, 1.02)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    n = len(w_metrics)
    xs, ys = C.metric_series(w_metrics, "indexer_recall")
    b.plot(xs, ys, label="W (dense warm-up)")
    xs, ys = C.metric_series(s_metrics, "indexer_recall")
    b.plot([x + n for x in xs], ys, label="S (sparse)")
    xs, ys = C.metric_series(w_metrics + s_metrics, "indexer_recall_ceiling")
    if ys:
        b.plot(range(1, len(ys) + 1), ys, color="grey", lw=0.8, label="ceiling (best top-k)")
    b.axhline(0.95, color="k", ls=":", lw=0.8)
    b.set_xlabel("step (W then S)")
    b.set_ylabel("indexer recall (train batches)")
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    C.save_figure(fig, path)


if __name__ == "__main__":
    main()
