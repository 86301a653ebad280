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

Timing (bench/timing.py rules): every run first prefills one untimed warm-up chunk on a separate sequence;
`--repeats` rounds run the arms in turn (dense, LSA, dense, LSA, …), each run in a fresh process (so peak
RSS is per run); tables show the median with [min–max], and dense/LSA is the median of the per-round
ratios. The tail chunk is timed `--repeats` times in one process (the chunk is rolled back between runs),
after one warm-up run.

    .venv/bin/python bench/prefill_lsa.py                          # 4K … 32K, both arms
    .venv/bin/python bench/prefill_lsa.py --lengths 131072 --arms lsa   # longer contexts, LSA only
    .venv/bin/python bench/prefill_lsa.py --lengths 4096 --tail 262144,1048576   # a chunk at 1M context
    .venv/bin/python bench/prefill_lsa.py --lengths 1024 --repeats 2 --tail 4096   # smoke
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import load_average, median, ratio_spread, spread  # noqa: E402


def _warm_up(runner, cfg, chunk: int) -> None:
    """One untimed chunk on a throw-away sequence (first-call allocations, kernel dispatch caches)."""
    from longcat2.engine.runner import Segment

    ids = torch.randint(4, cfg.vocab_size, (chunk,), generator=torch.Generator().manual_seed(5))
    seq = runner.new_sequence(ids.tolist())
    runner.forward([Segment(seq, ids, 0, "last")])
    runner.free(seq)


def run_tail(length: int, chunk: int, preset: str, repeats: int) -> dict:
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
    runner = ModelRunner(model, block_size=4096, num_blocks=-(-length // 4096) + 1)
    _warm_up(runner, cfg, chunk)
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
    times = []
    for i in range(repeats + 1):  # the first run is the warm-up at this context
        runner.truncate(seq, start)
        t0 = time.perf_counter()
        runner.forward([Segment(seq, ids[start:], start, "last")])
        if i:
            times.append(time.perf_counter() - t0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "length": length,
        "chunk_seconds": times,
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
    runner = ModelRunner(model, block_size=4096, num_blocks=-(-length // 4096) + 1)
    _warm_up(runner, cfg, chunk)
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
    ap.add_argument("--repeats", type=int, default=3, help="runs per arm (interleaved) and tail chunk runs")
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
            run_tail(n, args.chunk, args.preset, args.repeats)
            if arm == "tail"
            else run_single(arm, n, args.chunk, args.preset)
        )
        print(json.dumps(res))
        return
    print(f"# {' '.join(sys.argv)}")
    print(
        f"# torch {torch.__version__}, 1 thread, preset {args.preset}, chunk {args.chunk}; each run in a fresh "
        f"process after a warm-up chunk; median [min–max] of {args.repeats} interleaved runs per arm; "
        f"{load_average()}"
    )
    print(
        "| context | dense s | LSA s | dense/LSA | dense tok/s | LSA tok/s | peak RSS dense / LSA (MB) | cache MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    arms = args.arms.split(",")

    def single(arm: str, n: int, *extra: str) -> dict:
        cmd = [sys.executable, __file__, "--single", arm, str(n), "--chunk", str(args.chunk)]
        cmd += ["--preset", args.preset, *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            raise SystemExit(f"{arm} at {n}: exit {out.returncode}\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    for n in [int(x) for x in args.lengths.split(",")]:
        runs: dict[str, list[dict]] = {arm: [] for arm in arms}
        for _ in range(args.repeats):
            for arm in arms:
                runs[arm].append(single(arm, n))
        secs = {arm: [r["seconds"] for r in rs] for arm, rs in runs.items()}
        rss = {arm: f"{median([r['peak_rss_mb'] for r in rs]):.0f}" for arm, rs in runs.items()}
        d, s = secs.get("dense"), secs.get("lsa")
        cache = runs[arms[0]][0]["cache_mb"]
        print(
            f"| {n // 1024}K | {spread(d) if d else '—'} | {spread(s) if s else '—'} | "
            f"{ratio_spread(d, s, 1) if d and s else '—'} | {f'{n / median(d):.0f}' if d else '—'} | "
            f"{f'{n / median(s):.0f}' if s else '—'} | {rss.get('dense', '—')} / {rss.get('lsa', '—')} | "
            f"{cache:.0f} |",
            flush=True,
        )
    if args.tail:
        print(
            f"\nLast {args.chunk}-token chunk of an LSA prefill at long context (cache before it synthetic), "
            f"median [min–max] of {args.repeats} runs after 1 warm-up run:"
        )
        print(
            "| context | chunk s | chunk tok/s | est. full prefill (x T/chunk/2) | peak RSS MB | cache MB |"
        )
        print("|---|---|---|---|---|---|")
        for n in [int(x) for x in args.tail.split(",")]:
            r = single("tail", n, "--repeats", str(args.repeats))
            t = median(r["chunk_seconds"])
            print(
                f"| {n // 1024}K | {spread(r['chunk_seconds'])} | {args.chunk / t:.0f} | "
                f"{t * n / args.chunk / 2 / 3600:.1f} h | {r['peak_rss_mb']:.0f} | {r['cache_mb']:.0f} |",
                flush=True,
            )
    print(f"# {load_average()} at the end")


if __name__ == "__main__":
    main()
