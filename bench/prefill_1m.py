"""A full 1,048,576-token prefill of the `tiny` preset through the engine's ModelRunner, then decode at 1M.

The model is the random `tiny` preset (2 layers = 4 MLA sublayers, 2 LSA indexers 4x16, top-k 64 with 4 sink +
16 local, MoE, N-gram) with hierarchical indexing (HI) on; tokens are random ids. Prefill runs in chunks of
`--chunk` tokens through `ModelRunner.forward` (the engine's code: paged cache, HI page summaries updated
as chunks arrive, the model's own modules), then `--decode-steps` greedy decode steps at 1M context.

HI settings default to the LSA report's rule scaled to tiny's top-k: LongCat-2.0 keeps 1024 pages x 128 =
131,072 tokens = 64 x its top-k of 2048 and turns HI on from 256K = 128 x top-k; tiny (top-k 64) keeps
32 pages of 128 (4,096 tokens) from 8,192 tokens on. `--hi-block` is the sub-block whose mean key
summarises part of a page (the report: 8; a page's coarse score is the max over its sub-blocks): the coarse
stage costs L / block key reads per query, so it sets the prefill's O(T^2) term.

The time split is measured by wrapping the engine's functions (wall time inside each): HI coarse scoring
(`engine.hi.page_scores`), HI fine scoring (the rest of `engine.hi.hi_rows`), top-k (`select_topk`,
`select_dynamic`, `lsa_rows`), exact scoring of the rows below the HI length (`scan_keys`), attention
(`StepContext.attend`), MoE (`model.moe.MoE.forward`), and everything else. Peak RSS is printed (the
cache is pre-sized, so the pool never doubles).

Wall time and process CPU time are both printed: on a machine shared with other jobs the CPU time (one
thread) is what the prefill costs a core of its own.

`--probe L1,L2,...`: instead of the full run, time one chunk at each context (synthetic cache fill) and
extrapolate the full prefill time by integrating the per-chunk time over the context (trapezoid); printed
as an extrapolation.

    .venv/bin/python bench/prefill_1m.py                               # the full run (minutes)
    .venv/bin/python bench/prefill_1m.py --probe 8192,262144,524288,1048576   # per-chunk times + estimate
    .venv/bin/python bench/prefill_1m.py --length 65536 --decode-steps 2   # smoke
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import load_average  # noqa: E402

import longcat2.engine.context as ctx_mod  # noqa: E402
import longcat2.engine.hi as hi_mod  # noqa: E402
from longcat2.config import ModelConfig  # noqa: E402
from longcat2.engine.runner import ModelRunner, Segment  # noqa: E402
from longcat2.model import moe as moe_mod  # noqa: E402
from longcat2.model.longcat import LongCatForCausalLM  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)
_STACK: list[str] = []


def timed(name: str, fn):
    """fn, with its wall time added to TIMES[name] (and to TIMES['in_hi:' + name] inside an HI call)."""

    def wrapper(*a, **kw):
        t = time.perf_counter()
        _STACK.append(name)
        try:
            return fn(*a, **kw)
        finally:
            _STACK.pop()
            dt = time.perf_counter() - t
            TIMES[name] += dt
            if "hi_total" in _STACK:
                TIMES["in_hi:" + name] += dt

    return wrapper


def instrument() -> None:
    hi_mod.page_scores = timed("hi_coarse", hi_mod.page_scores)
    hi_mod.select_dynamic = timed("topk", hi_mod.select_dynamic)
    hi_mod.lsa_rows = timed("topk", hi_mod.lsa_rows)
    ctx_mod.lsa_rows = timed("topk", ctx_mod.lsa_rows)
    hi_mod.scan_keys = timed("exact_scan", hi_mod.scan_keys)
    ctx_mod.scan_keys = hi_mod.scan_keys
    ctx_mod.hi_rows = timed("hi_total", hi_mod.hi_rows)
    ctx_mod.StepContext.attend = timed("attention", ctx_mod.StepContext.attend)
    moe_mod.MoE.forward = timed("moe", moe_mod.MoE.forward)


def split(total: float) -> str:
    """The wall time `total` split into the instrumented parts (TIMES since the last clear)."""
    t = TIMES
    parts = {
        "HI coarse": t["hi_coarse"],
        "HI fine scoring": t["hi_total"] - t["in_hi:hi_coarse"] - t["in_hi:topk"] - t["in_hi:exact_scan"],
        "top-k": t["topk"],
        "exact scoring (rows below the HI length, or fully covered)": t["exact_scan"],
        "attention": t["attention"],
        "MoE": t["moe"],
    }
    parts["other (projections, FFN, N-gram, norms, head, cache writes)"] = total - sum(parts.values())
    return " | ".join(f"{k} {v:.2f} s ({100 * v / total:.0f} %)" for k, v in parts.items())


def build(args) -> tuple[LongCatForCausalLM, ModelConfig]:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", max_position_embeddings=args.length + 4096)
    cfg = cfg.replace(lsa_hi=True, lsa_hi_page_size=args.hi_page, lsa_hi_block_size=args.hi_block,
                      lsa_hi_top_pages=args.hi_top_pages, lsa_hi_min_len=args.hi_min_len)  # fmt: skip
    return LongCatForCausalLM(cfg).eval(), cfg


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def full_run(args) -> None:
    model, cfg = build(args)
    n = args.length
    runner = ModelRunner(
        model,
        block_size=4096,
        num_blocks=-(-(n + args.decode_steps + 8) // 4096),
        index_dtype=args.index_dtype,
    )
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, cfg.vocab_size, (n,), generator=g)
    seq = runner.new_sequence(tokens.tolist())
    print(
        f"# cache {runner.cache.bytes_per_token()} B/token, {runner.cache.capacity * runner.cache.bytes_per_token() / 1e6:.0f} MB pre-sized"
    )
    t0, c0 = time.perf_counter(), time.process_time()
    last = t0
    out = None
    with torch.inference_mode():
        for start in range(0, n, args.chunk):
            end = min(n, start + args.chunk)
            out = runner.forward([Segment(seq, tokens[start:end], start, "last" if end == n else "none")])
            now = time.perf_counter()
            if end % args.report_every == 0 or end == n:
                print(f"  {end:>8} tokens  {now - t0:7.1f} s wall, {time.process_time() - c0:7.1f} s CPU  "
                      f"(last chunk {1e3 * (now - last):.0f} ms, "
                      f"{peak_rss_mb():.0f} MB peak RSS, {load_average()})", flush=True)  # fmt: skip
            last = now
        prefill, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
        prefill_split = split(prefill)
        TIMES.clear()
        nxt = int(out.logits[0][0].argmax())
        t1 = time.perf_counter()
        for i in range(args.decode_steps):
            seq.tokens.append(nxt)
            out = runner.forward([Segment(seq, torch.tensor([nxt]), n + i, "last")])
            nxt = int(out.logits[0][0].argmax())
        decode = time.perf_counter() - t1
    print(
        f"\nprefill of {n:,} tokens: {prefill:.1f} s wall ({n / prefill:,.0f} tok/s), {prefill_cpu:.1f} s process "
        f"CPU time, peak RSS {peak_rss_mb():.0f} MB"
    )
    print(f"  split: {prefill_split}")
    print(f"decode at {n:,}: {1e3 * decode / args.decode_steps:.1f} ms/token over {args.decode_steps} steps")
    print(f"  split: {split(decode)}")


def probe(args) -> None:
    """One chunk at each context after a synthetic fill (random latents/keys, summaries via the cache)."""
    model, cfg = build(args)
    lengths = [int(x) for x in args.probe.split(",")]
    rows = []
    for ctx_len in lengths:
        runner = ModelRunner(
            model,
            block_size=4096,
            num_blocks=-(-(ctx_len + args.chunk) // 4096),
            index_dtype=args.index_dtype,
        )
        seq = runner.new_sequence(torch.randint(4, cfg.vocab_size, (ctx_len + args.chunk,)).tolist())
        cache = runner.cache
        cache.reserve(seq.blocks, ctx_len + args.chunk)
        g = torch.Generator().manual_seed(0)
        for t in [*cache.latent, *cache.rope]:
            t[:ctx_len] = torch.randn(t[:ctx_len].shape, generator=g)
        for lid in cache.index_keys:
            for r0 in range(0, ctx_len, 1 << 16):
                r = torch.arange(r0, min(ctx_len, r0 + (1 << 16)))
                cache.write_index(lid, r, torch.randn(len(r), cache.index_head_dim, generator=g))
                if cache.hi_block:
                    cache.update_summaries(lid, r[r % cache.hi_block == cache.hi_block - 1])
        seq.blocks.num_tokens = ctx_len
        chunk = torch.tensor(seq.tokens[ctx_len : ctx_len + args.chunk])
        times = []
        with torch.inference_mode():
            for _ in range(args.repeats + 1):
                TIMES.clear()
                t = time.perf_counter()
                runner.forward([Segment(seq, chunk, ctx_len, "none")])
                times.append(time.perf_counter() - t)
                seq.blocks.num_tokens = ctx_len
        times = sorted(times[1:])
        med = times[len(times) // 2]
        rows.append((ctx_len, med))
        print(
            f"| {ctx_len:,} | {1e3 * med:.0f} [{1e3 * times[0]:.0f}–{1e3 * times[-1]:.0f}] | {split(sum(TIMES.values()) and med)} |",
            flush=True,
        )
        del runner, cache
    # trapezoid over chunk start positions 0 .. length (per-chunk time linear between probes)
    pts = [(0, rows[0][1])] + rows if rows[0][0] > 0 else rows
    est = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        est += (x1 - x0) / args.chunk * (y0 + y1) / 2
    print(f"\nEXTRAPOLATION (not a measured run): full prefill of {pts[-1][0]:,} tokens ≈ {est:.0f} s "
          f"({est / 60:.1f} min) from the per-chunk times above; peak RSS of this probe {peak_rss_mb():.0f} MB")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1 << 20)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill tokens per engine step")
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--hi-page", type=int, default=128)
    ap.add_argument("--hi-block", type=int, default=8)
    ap.add_argument("--hi-top-pages", type=int, default=32)
    ap.add_argument("--hi-min-len", type=int, default=8192)
    ap.add_argument("--index-dtype", choices=["bf16", "fp8"], default=None)
    ap.add_argument("--report-every", type=int, default=1 << 16)
    ap.add_argument("--probe", default="", help="contexts to time one chunk at (no full run)")
    ap.add_argument("--repeats", type=int, default=3, help="--probe: timed repeats per context")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {args.threads} thread(s); {load_average()} at start")
    print(f"# HI: pages of {args.hi_page}, sub-block means of {args.hi_block}, {args.hi_top_pages} pages kept, "
          f"from {args.hi_min_len:,} keys; chunk {args.chunk}; index keys {args.index_dtype or 'fp32 (cache dtype)'}")  # fmt: skip
    instrument()
    if args.probe:
        print("| context | chunk ms [min–max] | split |\n|---|---|---|")
        probe(args)
    else:
        full_run(args)
    print(f"# {load_average()} at the end")


if __name__ == "__main__":
    main()
