"""Replicated vs head-split LSA indexer under tensor parallelism (the choice in longcat2/parallel/inference.py).

    torchrun --standalone --nproc_per_node 2 bench/tp_indexer.py [--context 32768] [--rows 1]

One owner sublayer's decode-time scoring with LongCat-2.0's indexer shape (32 heads × 128 dims, one 128-dim
key per cached token): "replicated" scores all heads on every rank (no communication); "split" scores
heads/TP heads per rank and all-reduces the [rows, S] fp32 partial scores before top-k (what a head-split
indexer must do). Both read every cached key: keys are shared by the heads, so splitting heads does not
split the key reads. Prints per-arm medians (bench/timing.py rules) with the load average, on rank 0.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from timing import interleaved, load_average, median, ratio_spread, spread

from longcat2.model.lsa import index_scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    tp, rank = dist.get_world_size(), dist.get_rank()
    heads, dim = 32, 128
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.rows, heads, dim, generator=g)
    w = torch.randn(1, args.rows, heads, generator=g)
    k = torch.randn(1, args.context, dim, generator=g)
    lo, hi = rank * heads // tp, (rank + 1) * heads // tp

    def replicated() -> torch.Tensor:
        return index_scores(q, w, k)

    def split() -> torch.Tensor:
        part = index_scores(q[:, :, lo:hi], w[:, :, lo:hi], k)
        dist.all_reduce(part)
        return part

    full, summed = replicated(), split()
    times = interleaved({"replicated": replicated, "split + all-reduce": split}, args.repeats)
    if rank == 0:
        print(f"TP{tp}, context {args.context}, {args.rows} decode row(s), {load_average()}")
        print(
            f"  split scores differ from replicated by up to {(full - summed).abs().max():.2e} (top-k ties move)"
        )
        for arm, ts in times.items():
            print(f"  {arm:<20} {median(ts) * 1e3:.3f} ms ({spread(ts, 1e3)})")
        ratio = ratio_spread(times["split + all-reduce"], times["replicated"])
        print(f"  split / replicated: {ratio}")
        mb = args.rows * args.context * 4 / 2**20
        print(f"  all-reduce payload per owner sublayer: {mb:.2f} MiB (x38 owner sublayers in longcat-2.0)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
