"""Prefill cost vs context length: dense attention vs LSA, through the engine's chunked prefill.

Both arms are the same random `tiny` model (4 MLA sublayers, N-gram, MoE), prefilled by `ModelRunner` in
chunks of `--chunk` tokens; the dense arm is that model with the indexers removed (`index_n_heads=0`, all
other weights identical), so the only difference is the attention:

- dense: causal attention of each chunk over every cached token in the expanded MLA form
  (`kernels.dense_prefill`: K/V expanded through kv_b_proj, block-causal matmul/softmax/matmul) — cost
  O(T²·h·(qk+v)).
- LSA: the owner's indexer scores each query against the dynamic region of the cached keys (`index_scan`,
  O(T²·h_I·d_I)), top-k with forced sink/local tokens (`lsa_rows`), then absorbed attention over the
  index_topk selected latents (`gather_attention`) for both sublayers — O(T·k).

Memory stays bounded by the chunk: the largest temporaries are the [rows, S] indexer score block (rows
chosen so rows·S <= 16M) and the dense arm's [h, rows, S] score tile and expanded K/V; peak RSS of each
run (measured in a fresh subprocess) is printed next to the cache size. `--tail` times one chunk at a
long context (1M) after a synthetic cache fill, to show per-chunk time/memory where a full run is too
long for a benchmark (the LSA indexer is O(T²)).

    .venv/bin/python bench/prefill_lsa.py                          # 4K … 32K, both arms
    .venv/bin/python bench/prefill_lsa.py --lengths 131072 --arms lsa   # longer contexts, LSA only
    .venv/bin/python bench/prefill_lsa.py --lengths 4096 --tail 262144,1048576   # a chunk at 1M context
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_tail(length: int, chunk: int, preset: str) -> dict:
    """The last prompt chunk of a `length`-token LSA prefill: the cache for positions < length - chunk is
    filled with synthetic latents/keys (prefilling them for real takes hours at 1M: the indexer is
    O(T^2)), then one real chunk runs. Shows per-chunk time and memory at that context."""
    from longcat2 import ModelConfig
    from longcat2.engine.runner import ModelRunner, Segment
    from longcat2.model.longcat import LongCatForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    model = LongCatForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, cfg.vocab_size, (length,), generator=g)
    runner = ModelRunner(model, block_size=4096, num_blocks=-(-length // 4096))
    seq = runner.new_sequence(ids.tolist())
    start = length - chunk
    runner.cache.reserve(seq.blocks, length)
    pools = [*runner.cache.latent, *runner.cache.rope, *runner.cache.index_keys.values()]
    for t in pools:
        for i in range(0, start, 1 << 16):
            n = min(1 << 16, start - i)
            t[i : i + n] = torch.randn(n, t.shape[1], generator=g)
    seq.blocks.num_tokens = start
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    runner.forward([Segment(seq, ids[start:], start, "last")])
    dt = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "length": length,
        "chunk_seconds": dt,
        "peak_rss_mb": rss1 / 1024,
        "chunk_rss_growth_mb": (rss1 - rss0) / 1024,
        "cache_mb": runner.cache.capacity * runner.cache.bytes_per_token() / 2**20,
    }


def run_single(arm: str, length: int, chunk: int, preset: str) -> dict:
    from longcat2 import ModelConfig
    from longcat2.engine.runner import ModelRunner, Segment
    from longcat2.model.longcat import LongCatForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    model = LongCatForCausalLM(cfg).eval()
    if arm == "dense":
        dense = LongCatForCausalLM(cfg.replace(index_n_heads=0)).eval()
        dense.load_state_dict(model.state_dict(), strict=False)  # same weights minus the indexers
        model = dense
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, cfg.vocab_size, (length,), generator=g)
    runner = ModelRunner(model, block_size=4096, num_blocks=-(-length // 4096))
    seq = runner.new_sequence(ids.tolist())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for c0 in range(0, length, chunk):
        c1 = min(length, c0 + chunk)
        out = runner.forward([Segment(seq, ids[c0:c1], c0, "last" if c1 == length else "none")])
    dt = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "arm": arm,
        "length": length,
        "seconds": dt,
        "peak_rss_mb": rss1 / 1024,
        "rss_growth_mb": (rss1 - rss0) / 1024,
        "cache_mb": runner.cache.capacity * runner.cache.bytes_per_token() / 2**20,
        "logit0": float(out.logits[0][0, 0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--arms", default="dense,lsa")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument(
        "--tail",
        default="",
        help="also time the last chunk of an LSA prefill at these contexts (synthetic cache before it)",
    )
    ap.add_argument("--single", nargs=2, metavar=("ARM", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        arm, n = args.single[0], int(args.single[1])
        res = (
            run_tail(n, args.chunk, args.preset)
            if arm == "tail"
            else run_single(arm, n, args.chunk, args.preset)
        )
        print(json.dumps(res))
        return
    print(f"# {' '.join(sys.argv)}")
    print(
        f"# torch {torch.__version__}, 1 thread, preset {args.preset}, chunk {args.chunk}; each run in a fresh process"
    )
    print(
        "| context | dense s | LSA s | dense/LSA | dense tok/s | LSA tok/s | peak RSS dense / LSA (MB) | cache MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.lengths.split(",")]:
        res = {}
        for arm in args.arms.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--single",
                arm,
                str(n),
                "--chunk",
                str(args.chunk),
                "--preset",
                args.preset,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
            res[arm] = json.loads(out.stdout.strip().splitlines()[-1])
        d, s = res.get("dense"), res.get("lsa")

        def f(r: dict | None, key: str, fmt: str) -> str:
            return "—" if r is None else format(r[key], fmt)

        ratio = f"{d['seconds'] / s['seconds']:.1f}x" if d and s else "—"
        tok_d = "—" if d is None else f"{n / d['seconds']:.0f}"
        tok_s = "—" if s is None else f"{n / s['seconds']:.0f}"
        cache = (d or s)["cache_mb"]  # type: ignore[index]
        print(
            f"| {n // 1024}K | {f(d, 'seconds', '.2f')} | {f(s, 'seconds', '.2f')} | {ratio} | "
            f"{tok_d} | {tok_s} | "
            f"{f(d, 'peak_rss_mb', '.0f')} / {f(s, 'peak_rss_mb', '.0f')} | {cache:.0f} |",
            flush=True,
        )
    if args.tail:
        print(
            f"\nLast {args.chunk}-token chunk of an LSA prefill at long context (cache before it synthetic):"
        )
        print(
            "| context | chunk s | chunk tok/s | est. full prefill (x T/chunk/2) | peak RSS MB | cache MB |"
        )
        print("|---|---|---|---|---|---|")
        for n in [int(x) for x in args.tail.split(",")]:
            cmd = [sys.executable, __file__, "--single", "tail", str(n), "--chunk", str(args.chunk)]
            out = subprocess.run(
                cmd + ["--preset", args.preset], capture_output=True, text=True, cwd=ROOT, check=True
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            est = r["chunk_seconds"] * n / args.chunk / 2 / 3600
            print(
                f"| {n // 1024}K | {r['chunk_seconds']:.2f} | {args.chunk / r['chunk_seconds']:.0f} | {est:.1f} h | "
                f"{r['peak_rss_mb']:.0f} | {r['cache_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
