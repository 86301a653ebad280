"""Prefill cost vs context length: dense attention vs LSA, through the engine's chunked prefill.

Both arms are the same random `tiny` model (4 MLA sublayers, N-gram, MoE), prefilled by `ModelRunner` in
chunks of `--chunk` tokens; the dense arm is that model with the indexers removed (`index_n_heads=0`, all
other weights identical), so the only difference is the attention:

- dense: causal attention of each chunk over every cached token in the expanded MLA form (K/V expanded
  through kv_b_proj per key block, online softmax; `--kernel` picks the engine's dense prefill kernel,
  context.py) — cost O(T²·h·(qk+v)).
- LSA: the owner's indexer scores each query against the dynamic region of the cached keys (`index_scan`,
  O(T²·h_I·d_I)), top-k with forced sink/local tokens (`lsa_rows`), then absorbed attention over the
  index_topk selected latents for both sublayers (`window_attention`: the sink + local window shared per
  block of rows, the dynamic picks gathered) — O(T·k); rows that see <= index_topk keys attend densely.

Memory stays bounded by the chunk: the largest temporaries are the [rows, S] indexer score block (rows
chosen so rows·S <= 16M) and the dense arm's [h, rows, S] score tile and expanded K/V; peak RSS of each
run (measured in a fresh subprocess) is printed next to the cache size. `--tail` times one chunk at a
long context (1M) after a synthetic cache fill, to show per-chunk time/memory where a full run is too
long for a benchmark (the LSA indexer is O(T²)).

Timing (bench/timing.py rules): every run first prefills one untimed warm-up chunk on a separate sequence;
`--repeats` rounds run the arms in turn (dense, LSA, dense, LSA, …), each run in a fresh process (so peak
RSS is per run); tables show the median with [min–max], and dense/LSA is the median of the per-round
ratios. The tail chunk is timed `--repeats` times in one process (the chunk is rolled back between runs),
after one warm-up run. Attention efficiency (issue 21): the prefill's attention FLOPs (`attention_flops`)
per CPU second of the run, against the best fp32/bf16 GEMM rate measured in CPU time in the same process
(CPU time: on a shared machine wall time mostly measures the other processes); and the same FLOPs per CPU
second inside the engine's attention ops (`AttentionClock`: selection and attend, K/V expansion included,
the layer's projections not), which is what the attention kernels achieve.

    .venv/bin/python bench/prefill_lsa.py --preset attn-2.0 --lengths 4096,16384   # LongCat-2.0 attention dims

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
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import load_average, median, ratio_spread, spread  # noqa: E402

# A one-layer model at LongCat-2.0's attention and indexer dims (64 heads, latent 512 + rope 64, q_lora 1536,
# indexer 32 x 128, top-k 2048 with 16 sink + 1024 local), small everything else (hidden 512, tiny MoE):
# prefill time is then the attention's (issue 21).
ATTN_2_0 = dict(
    num_layers=1, hidden_size=512, num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, index_n_heads=32, index_head_dim=128,
    index_topk=2048, index_init_tokens=16, index_local_tokens=1024, max_position_embeddings=262144,
)  # fmt: skip


def make_config(preset: str, dtype: str = "float32"):
    """`preset` is a ModelConfig preset or "attn-2.0" (ATTN_2_0 over the tiny preset)."""
    from longcat2 import ModelConfig

    if preset == "attn-2.0":
        return ModelConfig.from_preset("tiny", **ATTN_2_0, torch_dtype=dtype)
    return ModelConfig.from_preset(preset, torch_dtype=dtype)


def attention_flops(cfg, length: int, lsa: bool) -> float:
    """FLOPs of a length-token prefill's attention, both sublayers of every layer (+ the indexer for LSA).
    Dense rows: expanded form 2·h·(qk+v) per visible key; LSA rows (query sees > top-k keys): absorbed
    form over top-k keys 2·h·(2c+r)·k, plus the indexer 2·h_I·d_I per key of the dynamic region."""
    h, c, r = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    qk, v = cfg.qk_nope_head_dim + r, cfg.v_head_dim
    k = cfg.index_topk if lsa and cfg.index_n_heads else length
    n_dense = min(length, k)  # queries 0 .. n_dense-1 see <= k keys: dense
    dense = 2 * h * (qk + v) * n_dense * (n_dense + 1) / 2
    sparse_rows = length - n_dense
    sparse = 2 * h * (2 * c + r) * k * sparse_rows
    attn = 2 * cfg.num_layers * (dense + sparse)
    if sparse_rows:
        init, local = cfg.index_init_tokens, cfg.index_local_tokens
        dyn = sum(max(0, q - local - init + 1) for q in range(n_dense, length))  # keys scored per query
        attn += cfg.num_layers * 2 * cfg.index_n_heads * cfg.index_head_dim * dyn
    return attn


def matmul_product(dtype: torch.dtype, n: int = 1024) -> Callable[[], object]:
    """One n³ GEMM in `dtype` by the faster of the BLAS (`a @ b`) and oneDNN (`engine.cpu.onednn_linear`),
    each timed once here: on AMD CPUs MKL's fp32 GEMM runs at less than half of oneDNN's (engine/cpu.py),
    and the reference is what the machine can do. → the product as a call (2·n³ FLOPs)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    products = [lambda: a @ b]
    if torch.backends.mkldnn.is_available():
        from longcat2.engine.cpu import onednn_linear

        products.append(lambda: onednn_linear(a, b))
    best, fastest = float("inf"), products[0]
    for product in products:
        try:
            product()
        except RuntimeError:  # no oneDNN kernel for this dtype here
            continue
        t0 = time.process_time()
        product()
        if (t := time.process_time() - t0) < best:
            best, fastest = t, product
    return fastest


def matmul_rate(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """Best of `repeats` n³ GEMMs (`matmul_product`) in this process, in CPU time → FLOP/s (the reference
    for attention efficiency; CPU time, like the prefill's, so other processes' load does not enter)."""
    product = matmul_product(dtype, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        product()
        best = min(best, time.process_time() - t0)
    return 2 * n**3 / best


def _warm_up(runner, cfg, chunk: int) -> None:
    """One untimed chunk on a throw-away sequence (first-call allocations, kernel dispatch caches)."""
    from longcat2.engine.runner import Segment

    ids = torch.randint(4, cfg.vocab_size, (chunk,), generator=torch.Generator().manual_seed(5))
    seq = runner.new_sequence(ids.tolist())
    runner.forward([Segment(seq, ids, 0, "last")])
    runner.free(seq)


def run_tail(length: int, chunk: int, preset: str, repeats: int, dtype: str, index_mode: str) -> dict:
    """The last prompt chunk of a `length`-token LSA prefill: the cache for positions < length - chunk is
    filled with synthetic latents/keys (prefilling them for real takes hours at 1M: the indexer is
    O(T^2)), then one real chunk runs. Shows per-chunk time and memory at that context."""
    from longcat2.engine.runner import ModelRunner, Segment
    from longcat2.model.longcat import LongCatForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = make_config(preset, dtype)
    model = LongCatForCausalLM(cfg).eval().to(getattr(torch, dtype))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, cfg.vocab_size, (length,), generator=g)
    runner = ModelRunner(model, block_size=4096, num_blocks=-(-length // 4096) + 1, index_mode=index_mode)
    _warm_up(runner, cfg, chunk)
    seq = runner.new_sequence(ids.tolist())
    start = length - chunk
    runner.cache.reserve(seq.blocks, length)
    pools = [*runner.cache.latent, *runner.cache.rope, *runner.cache.index_keys.values()]
    for t in pools:
        for i in range(0, start, 1 << 16):
            n = min(1 << 16, start - i)
            t[i : i + n] = torch.randn(n, t.shape[1], generator=g)
    for lid, keys in runner.cache.index_keys.items():  # (the two-pass scan's bound needs the true max norm)
        norm = float(keys.float().norm(dim=-1).max())
        runner.cache.index_key_max_norm[lid] = max(runner.cache.index_key_max_norm[lid], norm)
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


class AttentionClock:
    """CPU seconds spent in the engine's attention ops while active: `StepContext.select` and `.attend` (the
    indexer scan and top-k, gathers, K/V expansion and the attention kernels; not the layer's projections,
    which the whole-prefill rate also pays). The methods are wrapped for the duration and restored."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._saved: dict = {}

    def __enter__(self) -> AttentionClock:
        from longcat2.engine.context import StepContext

        for name in ("select", "attend"):
            orig = self._saved[name] = getattr(StepContext, name)

            def timed(*args, _orig=orig, **kwargs):
                t0 = time.process_time()
                try:
                    return _orig(*args, **kwargs)
                finally:
                    self.seconds += time.process_time() - t0

            setattr(StepContext, name, timed)
        return self

    def __exit__(self, *exc) -> None:
        from longcat2.engine.context import StepContext

        for name, orig in self._saved.items():
            setattr(StepContext, name, orig)


def run_single(
    arm: str, length: int, chunk: int, preset: str, dtype: str, kernel: str, index_mode: str
) -> dict:
    from longcat2.engine.runner import ModelRunner, Segment
    from longcat2.model.longcat import LongCatForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = make_config(preset, dtype)
    model = LongCatForCausalLM(cfg).eval().to(getattr(torch, dtype))
    if arm == "dense":
        dense = LongCatForCausalLM(cfg.replace(index_n_heads=0)).eval().to(getattr(torch, dtype))
        dense.load_state_dict(model.state_dict(), strict=False)  # same weights minus the indexers
        model = dense
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, cfg.vocab_size, (length,), generator=g)
    runner = ModelRunner(model, block_size=4096, num_blocks=-(-length // 4096) + 1, index_mode=index_mode)
    runner.attention.prefill_kernel = kernel
    _warm_up(runner, cfg, chunk)
    seq = runner.new_sequence(ids.tolist())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, cpu0 = time.perf_counter(), time.process_time()
    with AttentionClock() as clock:
        for c0 in range(0, length, chunk):
            c1 = min(length, c0 + chunk)
            out = runner.forward([Segment(seq, ids[c0:c1], c0, "last" if c1 == length else "none")])
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "arm": arm,
        "length": length,
        "seconds": dt,
        "cpu_seconds": cpu,
        "attention_cpu_seconds": clock.seconds,
        "peak_rss_mb": rss1 / 1024,
        "rss_growth_mb": (rss1 - rss0) / 1024,
        "cache_mb": runner.cache.capacity * runner.cache.bytes_per_token() / 2**20,
        "logit0": float(out.logits[0][0, 0]),
        "attn_flops": attention_flops(model.config, length, arm == "lsa"),
        "matmul_flops_per_s": matmul_rate(getattr(torch, dtype)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--arms", default="dense,lsa")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--preset", default="tiny", help='a ModelConfig preset or "attn-2.0" (see ATTN_2_0)')
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--kernel",
        default="auto",
        choices=["auto", "onednn", "flash", "tiled", "plain"],
        help="dense prefill kernel (context.py)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs per arm (interleaved) and tail chunk runs")
    ap.add_argument(
        "--tail",
        default="",
        help="also time the last chunk of an LSA prefill at these contexts (synthetic cache before it)",
    )
    ap.add_argument(
        "--index-mode",
        default="auto",
        choices=["auto", "exact", "bf16"],
        help="the engine's index_mode (LSA arm; exact vs auto compares the two-pass bf16 scan)",
    )
    ap.add_argument("--single", nargs=2, metavar=("ARM", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        arm, n = args.single[0], int(args.single[1])
        res = (
            run_tail(n, args.chunk, args.preset, args.repeats, args.dtype, args.index_mode)
            if arm == "tail"
            else run_single(arm, n, args.chunk, args.preset, args.dtype, args.kernel, args.index_mode)
        )
        print(json.dumps(res))
        return
    print(f"# {' '.join(sys.argv)}")
    print(
        f"# torch {torch.__version__}, 1 thread, preset {args.preset}, {args.dtype}, {args.kernel} dense "
        f"prefill kernel, index_mode {args.index_mode}, chunk {args.chunk}; each run in a fresh "
        f"process after a warm-up chunk; median [min–max] of {args.repeats} interleaved runs per arm; "
        f"{load_average()}"
    )
    print(
        "| context | dense s | LSA s | dense/LSA | dense tok/s | LSA tok/s | peak RSS dense / LSA (MB) | cache MB "
        "| CPU s dense / LSA | attention GFLOP/s dense / LSA | matmul GFLOP/s | attention / matmul dense / LSA "
        "| attention ops CPU s dense / LSA | in attention ops: GFLOP/s dense / LSA | ... / matmul dense / LSA |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    arms = args.arms.split(",")

    def single(arm: str, n: int, *extra: str) -> dict:
        cmd = [sys.executable, __file__, "--single", arm, str(n), "--chunk", str(args.chunk)]
        cmd += ["--preset", args.preset, "--dtype", args.dtype, "--kernel", args.kernel]
        cmd += ["--index-mode", args.index_mode, *extra]
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
        rate = {arm: median([r["attn_flops"] / r["cpu_seconds"] for r in rs]) for arm, rs in runs.items()}
        cpu = {arm: [r["cpu_seconds"] for r in rs] for arm, rs in runs.items()}
        mm = median([r["matmul_flops_per_s"] for rs in runs.values() for r in rs])
        eff = " / ".join(f"{rate[a] / mm:.0%}" if a in rate else "—" for a in ("dense", "lsa"))
        attn_cpu = {arm: [r["attention_cpu_seconds"] for r in rs] for arm, rs in runs.items()}
        a_rate = {
            arm: median([r["attn_flops"] / r["attention_cpu_seconds"] for r in rs])
            for arm, rs in runs.items()
        }
        print(
            f"| {n // 1024}K | {spread(d) if d else '—'} | {spread(s) if s else '—'} | "
            f"{ratio_spread(d, s, 1) if d and s else '—'} | {f'{n / median(d):.0f}' if d else '—'} | "
            f"{f'{n / median(s):.0f}' if s else '—'} | {rss.get('dense', '—')} / {rss.get('lsa', '—')} | "
            f"{cache:.0f} | "
            + " / ".join(spread(cpu[a], digits=1) if a in cpu else "—" for a in ("dense", "lsa"))
            + " | "
            + " / ".join(f"{rate[a] / 1e9:.1f}" if a in rate else "—" for a in ("dense", "lsa"))
            + f" | {mm / 1e9:.1f} | {eff} | "
            + " / ".join(spread(attn_cpu[a], digits=1) if a in attn_cpu else "—" for a in ("dense", "lsa"))
            + " | "
            + " / ".join(f"{a_rate[a] / 1e9:.1f}" if a in a_rate else "—" for a in ("dense", "lsa"))
            + " | "
            + " / ".join(f"{a_rate[a] / mm:.0%}" if a in a_rate else "—" for a in ("dense", "lsa"))
            + " |",
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
