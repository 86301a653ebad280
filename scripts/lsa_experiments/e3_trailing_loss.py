"""E3: trailing-token LM loss on Python stdlib code, dense vs LSA (sparse_attention.md §4.5 E3).

Protocol D -> W -> S with the dense control C (continued from D, same steps / LR / data), on the `stdlib`
corpus (BPE 4096, `longcat2 prepare`d on first use). Metric: mean next-token loss over the validation windows
and over their last `trailing` positions (MoBA's trailing-token loss), plus a position-binned loss curve.
Pass: trailing_loss(S) - trailing_loss(C) <= 0.02 nats.

    .venv/bin/python scripts/lsa_experiments/e3_trailing_loss.py          # scaled (~15 min, 1 core)
    .venv/bin/python scripts/lsa_experiments/e3_trailing_loss.py --full   # T=2048, ~2-3M tokens per arm
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

SCALED = dict(w_lr=1e-2, seq=512, batch=8, d_steps=300, w_steps=60, s_steps=150, topk=64, sink=4, local=16,
              trailing=128, windows=48, bins=16, model=[])  # fmt: skip
FULL = dict(w_lr=3e-3,
    seq=2048, batch=4, d_steps=1500, w_steps=200, s_steps=600, topk=256, sink=4, local=64, trailing=256,
    windows=200, bins=32,
    model=["hidden_size=128", "ffn_hidden_size=256", "q_lora_rank=64", "kv_lora_rank=64",
           "qk_nope_head_dim=32", "qk_rope_head_dim=16", "v_head_dim=32", "index_head_dim=32"],
)  # fmt: skip


def position_loss(model, shard_dir, seq: int, windows: int, bins: int, trailing: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from longcat2.data import load_split

    tokens = load_split(shard_dir, "val")
    n = min(windows, (len(tokens) - 1) // seq)
    sums = torch.zeros(seq, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n, 4):
            rows = range(start, min(start + 4, n))
            ids = torch.from_numpy(
                np.stack([np.asarray(tokens[r * seq : (r + 1) * seq + 1], dtype=np.int64) for r in rows])
            )
            logits = model(ids[:, :-1]).float()
            nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
                len(rows), -1
            )
            sums += nll.sum(0).double()
    per_pos = sums / n
    w = seq // bins
    return {
        "windows": n,
        "val_loss": float(per_pos.mean()),
        "trailing_loss": float(per_pos[-trailing:].mean()),
        "bin_centers": [i * w + w // 2 for i in range(bins)],
        "bin_loss": [float(per_pos[i * w : (i + 1) * w].mean()) for i in range(bins)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    P = FULL if args.full else SCALED
    tag = "e3_full" if args.full else "e3"
    root = C.RUNS / tag
    t0 = time.time()
    model_flags = [f for m in P["model"] for f in ("--model", m)]
    budget = [f"index_topk={P['topk']}", f"index_init_tokens={P['sink']}", f"index_local_tokens={P['local']}"]
    data = ["--data", "stdlib", "--seq-len", str(P["seq"]), "--batch-size", str(P["batch"])]
    every = ["--save-every", "0", "--eval-every", "0", "--eval-batches", "4"]
    stage = ["--lr", "1e-3", "--warmup", "10"]
    w_lr = ["--lr", str(P["w_lr"]), "--warmup", "10"]  # indexer-only: a tiny indexer needs a larger LR
    walls = {}
    walls["D"] = C.train(
        root / "D", P["d_steps"],
        [*data, *every, "--attention", "dense", "--model", "rope_scaling=null", *model_flags,
         *[f for b in budget for f in ("--model", b)]],
    )["wall_s"]  # fmt: skip
    w = C.warmup_stage(root / "W", P["w_steps"], [*data, *every, *w_lr], root / "D")
    walls["W"] = w["wall_s"]
    s, c = C.sparse_and_control(root, P["s_steps"], [*data, *every, *stage])
    walls["S"], walls["C"] = s["wall_s"], c["wall_s"]

    from longcat2.data import ensure_prepared

    te = time.time()
    m0 = C.load(root / "D", "dense")
    shard_dir = ensure_prepared("stdlib", None, m0.config.vocab_size)
    arms = {"C dense": (root / "C", "dense"), "S sparse": (root / "S", "sparse"), "W sparse": (root / "W", "sparse"),
            "D dense": (root / "D", "dense")}  # fmt: skip
    res: dict = {"params": P, "arms": {}, "wall_s": walls}
    for name, (run, att) in arms.items():
        r = position_loss(C.load(run, att), shard_dir, P["seq"], P["windows"], P["bins"], P["trailing"])
        res["arms"][name] = r
        C.log(f"{name}: val {r['val_loss']:.4f} trailing {r['trailing_loss']:.4f}")
    res["train_recall_last"] = {
        "W": sum(r["indexer_recall"] for r in w["metrics"][-10:]) / 10,
        "S": sum(r["indexer_recall"] for r in s["metrics"][-10:]) / 10,
    }
    res["delta_trailing"] = res["arms"]["S sparse"]["trailing_loss"] - res["arms"]["C dense"]["trailing_loss"]
    res["delta_val"] = res["arms"]["S sparse"]["val_loss"] - res["arms"]["C dense"]["val_loss"]
    res["pass"] = res["delta_trailing"] <= 0.02
    res["eval_wall_s"] = time.time() - te
    res["total_wall_s"] = time.time() - t0
    C.save_json(tag, res)

    path = C.figure(tag)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, r in res["arms"].items():
        ax.plot(
            r["bin_centers"], r["bin_loss"], "o-", ms=3, label=f"{name} (trailing {r['trailing_loss']:.3f})"
        )
    ax.axvline(P["topk"], color="k", ls=":", lw=0.8)
    ax.text(P["topk"], ax.get_ylim()[1], " top-k", va="top", fontsize=8)
    ax.set_xlabel("position in window")
    ax.set_ylabel("val loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    C.save_figure(fig, path)
    print(
        f"E3 delta trailing (S - C) {res['delta_trailing']:+.4f} nats, delta val {res['delta_val']:+.4f}; "
        f"recall S {res['train_recall_last']['S']:.3f}; pass {res['pass']}"
    )


if __name__ == "__main__":
    main()
