"""Decode step vs context length: dense MLA vs LSA, per layer, with the engine's kernels.

One *layer* = what LongCat's decoder layer reads from its caches per decoded token: two MLA sublayers (the
index owner and the CLI consumer) and one indexer. Both arms run the engine's own kernels on a paged cache
holding one contiguous sequence (synthetic latents/keys; the selection is whatever random keys give):

- dense: absorbed MLA over every cached latent of both sublayers (`kernels.dense_decode`, online softmax
  over contiguous runs, no copy) — the best dense decode this engine has.
- LSA: indexer score over the dynamic region [init, q - local] (`index_scan`, fp32 scores; or the bf16
  two-pass `index_scan_select_bf16` that returns the same indices), top-k with forced sink/local tokens
  (`lsa_rows`), gather of the selected latents for both sublayers and absorbed attention over them
  (`gather_attention`).
- LSA+HI (`--hi`): the same step with hierarchical indexing (`engine.hi.hi_rows`, the engine's own code):
  coarse scores of the cached page summaries (bf16 means of 8-token sub-blocks, page score = max over its
  16 sub-blocks), the best 1024 pages of 128 tokens kept (sink and local pages forced), token top-k over
  the kept pages' keys. Bytes model: L/8·d_I·2 (summaries) + 1024·128·d_I·e_I (kept keys) instead of L·d_I·e_I.
  With `--index-dtype fp8` every indexer read is e4m3 + one fp32 scale per token (132 B at d_I = 128),
  dequantised on the fly (the fp32 scan replaces the bf16 two-pass scan).

The MLA weight projections (q/kv/o of both sublayers) are the same in both arms and are left out. The
indexer's own projections of the new token (`wq_b` on the query latent, `wk` + key norm and
`weights_proj` on the attention input: h_I·d_I·q_lora + d_I·H + h_I·H weights) exist only in the LSA arm,
so the LSA arm includes them (batch 1: one matrix-vector product each, weight-bound). Bytes model
(sparse_attention.md §5, plus those weights): dense = 2·L·(c+r)·e, LSA = 2·k·(c+r)·e + L·d_I·e_I + the
indexer weights (L = context, k = index_topk, e = bytes per element). FLOPs: dense 2·L·2h(2c+r), LSA
2·k·2h(2c+r) + L·2·h_I·d_I (+ 2× the indexer weights). "%BW" is achieved bytes/s over a measured 1-thread
stream-read bandwidth.

Timing (bench/timing.py): every arm (and every LSA component) gets one warm-up call and the same
`--repeats` timed calls, the arms taking turns; tables show medians, the dense/LSA ratio is the median of
the per-repeat ratios with its [min–max] spread. In the engine table a 1024³ GEMM (the bound's matmul
rate) takes its turn with the arms, and LSA / bound is the median of the per-turn ratios.

    .venv/bin/python bench/decode_lsa.py                      # both configs, 4K … 1M
    .venv/bin/python bench/decode_lsa.py --config longcat-2.0 --lengths 4096,131072 --repeats 5 --engine-lengths ""
    .venv/bin/python bench/decode_lsa.py --config tiny --lengths 4096 --repeats 3 --engine-lengths 4096   # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved, load_average, median, ratio_spread, spread  # noqa: E402

from longcat2.config import ModelConfig  # noqa: E402
from longcat2.engine.cache import LayerSpec, PagedKVCache, index_dtype_of  # noqa: E402
from longcat2.engine.cpu import Bf16MatmulViaFp32, bf16_matmul_via_fp32  # noqa: E402
from longcat2.engine.hi import hi_rows, page_scores, scan_keys  # noqa: E402
from longcat2.engine.kernels import (  # noqa: E402
    attend_gathered,
    dense_decode,
    gather_attention,
    gather_rows,
    index_scan,
    index_scan_select_bf16,
    lsa_rows,
)


@dataclass
class Dims:
    name: str
    heads: int
    latent: int
    rope: int
    index_heads: int
    index_dim: int
    topk: int
    init: int
    local: int
    dtype: torch.dtype
    hidden: int
    q_lora: int


CONFIGS = {
    "longcat-2.0": Dims("longcat-2.0", 64, 512, 64, 32, 128, 2048, 16, 1024, torch.bfloat16, 8192, 1536),
    "tiny": Dims("tiny", 4, 32, 8, 4, 16, 64, 4, 16, torch.float32, 64, 32),
}


def stream_bandwidth(clock=time.perf_counter) -> float:
    x = torch.ones(1 << 27)  # 512 MB fp32
    best = float("inf")
    for _ in range(5):
        t = clock()
        x.sum()
        best = min(best, clock() - t)
    return x.numel() * 4 / best


def fill(t: torch.Tensor, block: int = 1 << 16) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(0, t.shape[0], block):
        t[i : i + block] = torch.randn(t[i : i + block].shape, generator=g).to(t.dtype)


def bench_length(
    d: Dims,
    length: int,
    repeats: int,
    bw: float,
    exact_scan: bool,
    hi: bool = False,
    index_dtype: str | None = None,
) -> dict[str, float]:
    hi_cfg = ModelConfig.from_preset(d.name).replace(lsa_hi=True, lsa_hi_min_len=d.topk)
    idt = index_dtype_of(index_dtype)
    cache = PagedKVCache(
        [LayerSpec(d.latent, d.rope, True), LayerSpec(d.latent, d.rope, False)],
        d.index_dim,
        block_size=4096,
        num_blocks=-(-length // 4096),
        dtype=d.dtype,
        index_dtype=idt,
        hi_block=hi_cfg.lsa_hi_block_size if hi else 0,
    )
    seq = cache.new_sequence()
    cache.reserve(seq, length)
    for t in [*cache.latent, *cache.rope]:
        fill(t)
    keys_src = torch.empty(cache.capacity, d.index_dim, dtype=d.dtype)
    fill(keys_src)
    for r0 in range(0, length, 1 << 16):  # through the cache's own writes (fp8 quantisation, summaries)
        rows = torch.arange(r0, min(length, r0 + (1 << 16)))
        cache.write_index(0, rows, keys_src[rows])
        if hi:
            b = cache.hi_block
            cache.update_summaries(0, rows[rows % b == b - 1])
    del keys_src
    e = torch.finfo(d.dtype).bits // 8
    e_i = 1 if cache.index_fp8 else torch.finfo(cache.index_dtype).bits // 8
    key_bytes = d.index_dim * e_i + (4 if cache.index_fp8 else 0)  # per token
    if not cache.index_fp8:
        cache.index_key_max_norm[0] = float(cache.index_keys[0][:length].float().norm(dim=-1).max())
    g = torch.Generator().manual_seed(1)
    ql = [torch.randn(d.heads, d.latent, generator=g).to(d.dtype) for _ in range(2)]
    qr = [torch.randn(d.heads, d.rope, generator=g).to(d.dtype) for _ in range(2)]
    q_cat = [
        torch.cat([a, b], dim=-1)[None] for a, b in zip(ql, qr)
    ]  # [1, h, c + r] (attend_gathered's query)
    qi = torch.randn(d.index_heads, d.index_dim, generator=g).to(d.dtype)
    wi = torch.randn(d.index_heads, generator=g) * d.index_heads**-0.5 * d.index_dim**-0.5
    # the indexer's projections of the new token (LSA arm only): wq_b, wk (+ RMS key norm), weights_proj
    x_new = torch.randn(1, d.hidden, generator=g).to(d.dtype)
    q_latent_new = torch.randn(1, d.q_lora, generator=g).to(d.dtype)
    w_qb = (torch.randn(d.index_heads * d.index_dim, d.q_lora, generator=g) * d.q_lora**-0.5).to(d.dtype)
    w_k = (torch.randn(d.index_dim, d.hidden, generator=g) * d.hidden**-0.5).to(d.dtype)
    w_p = (torch.randn(d.index_heads, d.hidden, generator=g) * d.hidden**-0.5).to(d.dtype)
    k_norm = torch.ones(d.index_dim, dtype=d.dtype)
    index_weight_bytes = (w_qb.numel() + w_k.numel() + w_p.numel()) * e
    qpos = length - 1
    lo, hi_end = d.init, qpos - d.local + 1
    kd = d.topk - d.init - d.local
    scale = (d.latent // 4) ** -0.5
    keys = cache.index_keys[0]
    lat_runs = [
        [(cache.latent[i][r : r + m], cache.rope[i][r : r + m]) for _, r, m in cache.runs(seq, 0, length)]
        for i in range(2)
    ]
    key_runs = [(a, keys[r : r + m]) for a, r, m in cache.runs(seq, lo, hi_end)]
    q_pos = torch.tensor([qpos])

    def dense() -> None:
        for i in range(2):
            dense_decode(ql[i], qr[i], lat_runs[i], scale)

    def scan() -> torch.Tensor:
        if cache.index_fp8:
            return scan_keys(cache, 0, seq, qi[None], wi[None], lo, hi_end)
        return index_scan(qi[None], wi[None], key_runs, lo, hi_end)

    scores = scan()

    def topk() -> torch.Tensor:
        return lsa_rows(scores, q_pos, d.topk, d.init, d.local)

    def two_pass() -> torch.Tensor:
        return index_scan_select_bf16(qi, wi, key_runs, lo, hi_end, kd, cache.index_key_max_norm[0])

    sel = topk()
    slots = cache.slots(seq, sel)  # [1, k]

    def gather() -> list:
        return [gather_rows(cache.kv[i], slots) for i in range(2)]

    gathered = gather()

    def attention() -> None:
        for i in range(2):
            kv, invalid = gathered[i]
            attend_gathered(q_cat[i], kv, ql[i].shape[-1], invalid, scale)

    def index_proj() -> None:
        F.linear(q_latent_new, w_qb)
        F.rms_norm(F.linear(x_new, w_k), (d.index_dim,), k_norm, 1e-6)
        F.linear(x_new, w_p)

    use_two_pass = d.dtype == torch.bfloat16 and not exact_scan and not cache.index_fp8  # else the fp32 scan
    if use_two_pass:
        assert torch.equal(two_pass(), sel[0, d.init : d.init + kd]), "bf16 two-pass selection differs"

    def lsa() -> None:
        index_proj()
        if use_two_pass:
            dyn = two_pass()
            s = torch.cat([torch.arange(d.init), dyn, torch.arange(qpos - d.local + 1, qpos + 1)])[None]
        else:
            s = lsa_rows(scan(), q_pos, d.topk, d.init, d.local)
        sl = cache.slots(seq, s)
        for i in range(2):
            gather_attention(ql[i][None], qr[i][None], cache.kv[i], sl, scale)

    def hi_select() -> torch.Tensor:
        return hi_rows(cache, 0, seq, hi_cfg, qi[None], wi[None], q_pos, 1 << 24, bf16_decode=not exact_scan)

    page = hi_cfg.lsa_hi_page_size
    p0 = -(-d.init // page)
    n_cand = max(0, (qpos - d.local + 1) // page - p0)

    def hi_coarse() -> torch.Tensor:
        return page_scores(cache, 0, seq, qi[None], wi[None], p0, n_cand, page)

    def lsa_hi() -> None:
        index_proj()
        sl = cache.slots(seq, hi_select())
        for i in range(2):
            gather_attention(ql[i][None], qr[i][None], cache.kv[i], sl, scale)

    fns = {
        "dense": dense,
        "lsa": lsa,
        "index_proj": index_proj,
        "scan": scan,
        "topk": topk,
        "gather": gather,
        "attention": attention,
    }
    if use_two_pass:
        fns["scan2"] = two_pass
    if hi:
        fns.update(hi=lsa_hi, hi_select=hi_select, hi_coarse=hi_coarse)
    res: dict = interleaved(fns, repeats, warmup=1)
    kv = (d.latent + d.rope) * e
    res["bytes_dense"] = 2 * length * kv
    res["bytes_lsa"] = 2 * d.topk * kv + (hi_end - lo) * key_bytes + index_weight_bytes
    kept = min(length, hi_cfg.lsa_hi_top_pages * page)
    res["bytes_hi"] = (
        2 * d.topk * kv
        + length // hi_cfg.lsa_hi_block_size * d.index_dim * cache.summary_dtype.itemsize
        + kept * key_bytes
        + index_weight_bytes
    )
    res["flops_dense"] = 2 * length * 2 * d.heads * (2 * d.latent + d.rope)
    res["flops_lsa"] = (
        2 * d.topk * 2 * d.heads * (2 * d.latent + d.rope)
        + (hi_end - lo) * 2 * d.index_heads * d.index_dim
        + 2 * index_weight_bytes // e
    )
    res["bw"] = bw
    return res


def engine_stepper(
    length: int, lsa: bool, steps: int, preset: str = "tiny", dtype: str = "float32", batch: int = 1
):
    """→ a function that runs the next decode step of the whole `preset` model (a ModelConfig preset or
    prefill_lsa.py's "attn-2.0") in `dtype` (weights and cache) through `ModelRunner`, for `batch`
    sequences at a synthetic context of `length` tokens each (good for `steps` calls)."""
    from prefill_lsa import make_config

    from longcat2.engine.runner import ModelRunner, Segment
    from longcat2.model.longcat import LongCatForCausalLM

    torch.manual_seed(0)
    cfg = make_config(preset)
    if not lsa:
        cfg = cfg.replace(index_n_heads=0)
    model = LongCatForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    per_seq = -(-(length + steps + 64) // 4096)
    runner = ModelRunner(model, block_size=4096, num_blocks=batch * per_seq)
    g = torch.Generator().manual_seed(1)
    seqs = []
    for _ in range(batch):
        seq = runner.new_sequence(torch.randint(4, cfg.vocab_size, (length,), generator=g).tolist())
        runner.cache.reserve(seq.blocks, length + steps + 2)
        seq.blocks.num_tokens = length
        seqs.append(seq)
    for t in [*runner.cache.latent, *runner.cache.rope, *runner.cache.index_keys.values()]:
        fill(t)
    pos = [length]

    def step() -> None:
        for seq in seqs:
            seq.tokens.append(7)
        runner.forward([Segment(seq, torch.tensor([7]), pos[0], "last") for seq in seqs])
        pos[0] += 1

    step.runner = runner  # type: ignore[attr-defined]
    step.weight_bytes = sum(  # type: ignore[attr-defined]
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if "embed" not in n and ".mtp." not in f".{n}"
    )  # what a batch-1 step reads besides the cache (non-embedding main-model weights; an upper bound for MoE)
    return step


GEMM_N = 1024  # the engine table's matmul reference: one GEMM_N³ product per turn


def fmt_len(n: int) -> str:
    return f"{n // (1 << 20)}M" if n % (1 << 20) == 0 else f"{n // 1024}K"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    ap.add_argument("--lengths", default="4096,16384,65536,131072,262144,1048576")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--exact-scan", action="store_true", help="bf16 configs: fp32 scan instead of two-pass")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hi", action="store_true", help="add the LSA + hierarchical indexing arm")
    ap.add_argument(
        "--index-dtype", choices=["bf16", "fp8"], default=None, help="index-key cache (default: cache dtype)"
    )
    ap.add_argument(
        "--engine-lengths",
        default="4096,32768,131072,1048576",
        help="whole-model decode step of --engine-preset through the engine (empty: skip)",
    )
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="engine table in CPU time of this process (1 thread on a shared machine: the load stays out)",
    )
    ap.add_argument(
        "--matmul",
        choices=["native", "engine"],
        default="native",
        help="engine: every arm runs bf16 matmuls and the indexer scan as the engine does on this CPU (where "
        "oneDNN has no bf16 GEMM: fp32 BLAS calls, engine.cpu.Bf16MatmulViaFp32, and the fp32 indexer scan); "
        "native: PyTorch's bf16 kernels and the bf16 two-pass scan",
    )
    ap.add_argument(
        "--engine-preset",
        default="tiny",
        help='model of the engine table: a ModelConfig preset or "attn-2.0" (one layer at 2.0 attention dims)',
    )
    ap.add_argument(
        "--engine-batch",
        type=int,
        default=1,
        help="engine table: sequences decoded together per step, each at the full context (the step's "
        "weights are read once for all of them; times and the bound are per step)",
    )
    ap.add_argument(
        "--engine-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="engine table: weights and cache dtype; the bound uses this dtype's matmul rate",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.matmul == "engine" and bf16_matmul_via_fp32():
        Bf16MatmulViaFp32().__enter__()  # for the whole run, every arm alike
        args.exact_scan = True  # the engine's index_mode "auto" on such a CPU (ModelRunner)
        print(
            "# bf16 matmuls as fp32 BLAS calls (engine.cpu.Bf16MatmulViaFp32), as the engine runs them here;"
            " fp32 indexer scan (the engine's choice where a bf16 pass saves nothing)"
        )
    lengths = [int(x) for x in args.lengths.split(",")]
    bw = stream_bandwidth()
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {args.threads} thread(s); stream read bandwidth {bw / 1e9:.1f} GB/s")
    print(f"# {load_average()} at start; {args.repeats} interleaved repeats per arm after 1 warm-up call")
    for name in CONFIGS if args.config == "all" else [args.config]:
        d = CONFIGS[name]
        scan_kind = "bf16 two-pass" if d.dtype == torch.bfloat16 and not args.exact_scan else "fp32"
        print(
            f"\n## {name}: {d.heads} heads, latent {d.latent}+{d.rope}, indexer {d.index_heads}x{d.index_dim}, "
            f"top-k {d.topk} (forced {d.init}+{d.local}), {str(d.dtype).replace('torch.', '')} cache, "
            f"{scan_kind} indexer scan; times per layer (2 sublayers + 1 indexer), ms"
        )
        print(
            "| context | dense | LSA | dense/LSA [min–max] | bytes model | % of model | index proj | index score | "
            "top-k | gather | attention | dense GB/s (%BW) | LSA GB/s (%BW) | dense GFLOP/s | LSA GFLOP/s |"
        )
        print("|" + "---|" * 15)
        hi_rows_txt = []
        for n in lengths:
            r = bench_length(d, n, args.repeats, bw, args.exact_scan, args.hi, args.index_dtype)
            if args.hi:
                mh = {k: median(r[k]) for k in ("hi", "hi_select", "hi_coarse")}
                hi_rows_txt.append(
                    f"| {fmt_len(n)} | {spread(r['dense'], 1e3)} | {spread(r['lsa'], 1e3, 3)} | {spread(r['hi'], 1e3, 3)} | "
                    f"{ratio_spread(r['dense'], r['hi'], 1)} | {r['bytes_dense'] / r['bytes_hi']:.1f}x | "
                    f"{ratio_spread(r['lsa'], r['hi'], 2)} | {mh['hi_coarse'] * 1e3:.2f} | "
                    f"{(mh['hi_select'] - mh['hi_coarse']) * 1e3:.2f} | {r['bytes_hi'] / 1e6:.1f} / {r['bytes_lsa'] / 1e6:.1f} |"
                )
            m = {k: median(v) for k, v in r.items() if isinstance(v, list)}
            model_ratio = r["bytes_dense"] / r["bytes_lsa"]
            ratio = median([a / b for a, b in zip(r["dense"], r["lsa"])])
            score = m.get("scan2", m["scan"])
            topk_txt = "(in score)" if "scan2" in m else f"{m['topk'] * 1e3:.2f}"
            score_txt = f"{score * 1e3:.2f}" + (" (incl. top-k)" if "scan2" in m else "")
            print(
                f"| {fmt_len(n)} | {spread(r['dense'], 1e3)} | {spread(r['lsa'], 1e3, 3)} | "
                f"{ratio_spread(r['dense'], r['lsa'], 1)} | {model_ratio:.1f}x | {100 * ratio / model_ratio:.0f}% | "
                f"{m['index_proj'] * 1e3:.3f} | {score_txt} | {topk_txt} | "
                f"{m['gather'] * 1e3:.3f} | {m['attention'] * 1e3:.3f} | "
                f"{r['bytes_dense'] / m['dense'] / 1e9:.1f} ({100 * r['bytes_dense'] / m['dense'] / bw:.0f}%) | "
                f"{r['bytes_lsa'] / m['lsa'] / 1e9:.1f} ({100 * r['bytes_lsa'] / m['lsa'] / bw:.0f}%) | "
                f"{r['flops_dense'] / m['dense'] / 1e9:.0f} | {r['flops_lsa'] / m['lsa'] / 1e9:.0f} |",
                flush=True,
            )
        if hi_rows_txt:
            print(
                f"\n### {name}: LSA + hierarchical indexing (pages of 128, 8-token sub-block means, 1024 pages kept), "
                f"index keys {args.index_dtype or 'as the cache'}; ms per layer"
            )
            print(
                "| context | dense | LSA | LSA+HI | dense/HI [min–max] | bytes model dense/HI | LSA/HI | HI coarse | "
                "HI fine + top-k | MB read HI / LSA |"
            )
            print("|" + "---|" * 10)
            print("\n".join(hi_rows_txt), flush=True)
    if args.engine_lengths:
        from prefill_lsa import make_config, matmul_product

        cfg = make_config(args.engine_preset)
        gemm = matmul_product(getattr(torch, args.engine_dtype), GEMM_N)
        print(
            f"\n## whole {args.engine_preset} model ({cfg.num_layers} layer(s), MoE, N-gram, LM head) decode step "
            f"of {args.engine_batch} sequence(s) through ModelRunner, synthetic cache; dense = the same weights without indexers. LSA bound = the "
            "step's attention + indexer FLOPs (absorbed attention over top-k keys in both sublayers, indexer "
            f"scores over the context) at the {args.engine_dtype} matmul rate, a {GEMM_N}³ GEMM timed in every "
            "turn of the arms (this box's speed drifts by 10-20 % over minutes: a rate measured once at the "
            "start moved the ratio as much as the step did); LSA / bound is the median [min–max] of the "
            "per-turn ratios; "
            "+ weights = the bound plus one read of the non-embedding weights at the stream bandwidth (batch-1 "
            f"projections are weight-bound); {'CPU' if args.cpu_time else 'wall'} time"
        )
        print(
            "| context | dense ms/step | LSA ms/step | dense/LSA [min–max] | dense tok/s | LSA tok/s "
            "| GEMM GFLOP/s | LSA bound ms | LSA / bound | weights MB | bound + weights ms | LSA / (bound + weights) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        h, c, r_ = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        with torch.inference_mode():
            for n in [int(x) for x in args.engine_lengths.split(",")]:
                arms = {
                    "dense": engine_stepper(
                        n, False, args.repeats + 1, args.engine_preset, args.engine_dtype, args.engine_batch
                    ),
                    "lsa": engine_stepper(
                        n, True, args.repeats + 1, args.engine_preset, args.engine_dtype, args.engine_batch
                    ),
                }
                clock = time.process_time if args.cpu_time else time.perf_counter
                r = interleaved({**arms, "gemm": gemm}, args.repeats, warmup=1, clock=clock)
                td, tl = median(r["dense"]), median(r["lsa"])
                rates = [2 * GEMM_N**3 / t for t in r["gemm"]]  # FLOP/s per turn
                mm = median(rates)
                k = min(n, cfg.index_topk)
                flops = (
                    args.engine_batch
                    * cfg.num_layers
                    * (2 * 2 * h * (2 * c + r_) * k + 2 * cfg.index_n_heads * cfg.index_head_dim * n)
                )
                bound = flops / mm
                bounds = [flops / x for x in rates]  # per turn
                wbytes = arms["lsa"].weight_bytes  # type: ignore[attr-defined]
                wtime = wbytes / (stream_bandwidth(clock) if args.cpu_time else bw)
                full = bound + wtime
                print(
                    f"| {fmt_len(n)} | {spread(r['dense'], 1e3)} | {spread(r['lsa'], 1e3)} | "
                    f"{ratio_spread(r['dense'], r['lsa'], 1)} | {args.engine_batch / td:.0f} | {args.engine_batch / tl:.0f} | "
                    f"{spread(rates, 1e-9, 0)} | {bound * 1e3:.2f} | {ratio_spread(r['lsa'], bounds)} | "
                    f"{wbytes / 2**20:.0f} | {full * 1e3:.2f} | {ratio_spread(r['lsa'], [b + wtime for b in bounds])} |",
                    flush=True,
                )
        print(f"# {load_average()} at the end")


if __name__ == "__main__":
    main()
