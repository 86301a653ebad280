"""Training throughput: longcat2 vs transformers' LongcatFlashForCausalLM, same MoE config, same weights.

Measures tokens/s of one full training step (forward + backward + optimizer step) on the same batches for
  - transformers `LongcatFlashForCausalLM` (5.x: per-expert Python loop, identity experts inside the loop),
  - longcat2 `LongCatForCausalLM` (sorted tokens + grouped GEMM, zero experts as one fused add),
both with `torch.optim.AdamW` (foreach) and the loss computed the same way outside the model, so only
the model code differs; plus longcat2 with its own optimizer (Muon + AdamW, `longcat2.train.optim`).
Weights are copied through the project's HF adapter (`longcat2.hf_checkpoint.save_pretrained` in the released
layout, which transformers >= 5.25 loads: its `experts` module holds only the routed experts →
`LongcatFlashForCausalLM.from_pretrained`), and the first-step logits are compared before timing: the run
stops with an error when they differ by more than 1e-3.

The three arms take turns step by step (bench/timing.py): the same warm-up steps, the same timed steps on
the same batches; each arm reports the median step with its spread, the speed-up is the median of the
per-step ratios.

Matmul utilisation: model FLOPs per step (`longcat2.plan.model_math.flops_per_token`, 3× forward for
forward+backward, with the *measured* FFN experts per token) divided by step time, against a measured
peak (the best of a few square `torch.mm` runs in the same dtype and thread count).

    python bench/train_throughput.py                  # bf16 autocast, 1 thread, the default config
    python bench/train_throughput.py --precision fp32 --threads 2
    python bench/train_throughput.py --skip-transformers --model hidden_size=1024 ...   # MFU only
    python bench/train_throughput.py --steps 1 --warmup 1 --batch-size 1 --seq-len 32 --model hidden_size=128  # smoke

Times are CPU seconds of this process: on a shared machine that is the number that depends least on what
else runs (the load average is printed with the results). torch.compile is not used: dynamo cannot trace `torch._grouped_mm` on CPU
(torch 2.13).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import TRAIN_MODEL  # noqa: E402
from timing import interleaved, load_average, ratio_spread, spread  # noqa: E402

from longcat2.config import ModelConfig  # noqa: E402
from longcat2.hf_checkpoint import save_pretrained  # noqa: E402
from longcat2.model import LongCatForCausalLM  # noqa: E402
from longcat2.plan.model_math import flops_per_token  # noqa: E402
from longcat2.train.balance import RoutingStats, moe_layers  # noqa: E402
from longcat2.train.env import tune_cpu_allocator  # noqa: E402
from longcat2.train.optim import MuonAdamW, param_groups_for  # noqa: E402


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of n×n×n `torch.mm` in `dtype` on this thread count (CPU time, like the steps)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        torch.mm(a, b, out=c)
        best = min(best, time.process_time() - t)
    return 2 * n**3 / best / 1e9


def build_models(cfg: ModelConfig):
    from transformers import LongcatFlashForCausalLM

    torch.manual_seed(0)
    ours = LongCatForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, Path(tmp) / "m", transformers_compat=False)  # released layout
        hf = LongcatFlashForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32)
    hf.train()
    ours.train()
    return ours, hf


def make_step(model, optimizer, autocast, forward, batches):
    """One training step per call, on the next batch (every arm walks the same batches)."""
    it = iter(batches)

    def step():
        x, y = next(it)
        with autocast():
            logits = forward(model, x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--model", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    ap.add_argument("--skip-transformers", action="store_true", help="time longcat2 only (MFU runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = tune_cpu_allocator()  # process-wide: both models benefit equally
    overrides = {}
    for kv in args.model:
        k, v = kv.split("=", 1)
        overrides[k] = type(TRAIN_MODEL[k])(v) if TRAIN_MODEL.get(k) is not None else v
    cfg = ModelConfig(**{**TRAIN_MODEL, **overrides})
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def autocast():
        return (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if dtype == torch.bfloat16
            else contextlib.nullcontext()
        )

    ours, hf = build_models(cfg)
    n_params = sum(p.numel() for p in ours.parameters())
    gen = torch.Generator().manual_seed(1)
    n = args.warmup + args.steps
    batches = [
        (
            torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=gen),
            torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=gen),
        )
        for _ in range(n)
    ]
    x0 = batches[0][0]
    with torch.no_grad():
        diff = (ours(x0).float() - hf(x0).logits.float()).abs().max().item()
    # routed FFN experts per token actually executed (same for both: same weights, same inputs)
    moes = moe_layers(ours)
    stats = RoutingStats.for_model(moes)
    with torch.no_grad():
        ours(x0)
    stats.record(moes)
    ffn_per_token = float(stats.ffn_per_token().mean())

    if diff > 1e-3:
        raise SystemExit(f"logits differ: max |diff| {diff:.2e} longcat2 vs transformers (same weights)")

    tokens = args.batch_size * args.seq_len
    runs = {}
    if not args.skip_transformers:
        runs["transformers LongcatFlashForCausalLM + AdamW"] = make_step(
            hf,
            torch.optim.AdamW(hf.parameters(), lr=1e-4, foreach=True),
            autocast,
            lambda m, x: m(x).logits,
            batches,
        )
    del hf
    runs["longcat2 LongCatForCausalLM + AdamW"] = make_step(
        ours,
        torch.optim.AdamW(ours.parameters(), lr=1e-4, foreach=True),
        autocast,
        lambda m, x: m(x),
        batches,
    )
    # our trainer's optimizer on a fresh copy of the same weights
    ours2, _ = build_models(cfg)
    muon = MuonAdamW(param_groups_for(ours2, lr=1e-4))
    runs["longcat2 LongCatForCausalLM + Muon/AdamW"] = make_step(
        ours2, muon, autocast, lambda m, x: m(x), batches
    )
    results = interleaved(runs, args.steps, warmup=args.warmup, clock=time.process_time)

    fwd = flops_per_token(cfg, args.seq_len, experts_per_token=ffn_per_token, mtp=False)["trunk"]
    step_flops = 3 * fwd * tokens
    peak = matmul_peak(dtype)
    print(
        f"command: python bench/train_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    )
    print(
        f"config: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.n_routed_experts} routed + "
        f"{cfg.zero_expert_num} zero experts, top-{cfg.moe_topk}, expert_ffn {cfg.expert_ffn_hidden_size}, "
        f"vocab {cfg.vocab_size}; {n_params / 1e6:.1f} M params; batch {args.batch_size}x{args.seq_len}; "
        f"{args.precision}{' autocast' if args.precision == 'bf16' else ''}; {args.threads} thread(s); "
        f"torch {torch.__version__}; glibc heap tuning {'on' if allocator else 'off'}"
    )
    print(
        f"logits max |diff| longcat2 vs transformers at init: {diff:.2e}; FFN experts/token {ffn_per_token:.2f}"
    )
    print(
        f"model FLOPs per step (fwd+bwd): {step_flops / 1e9:.2f} GFLOP; measured {args.precision} matmul peak {peak:.1f} GFLOP/s"
    )
    print(f"  (CPU time of this process per step: median [min–max] over {args.steps} steps, arms interleaved; "
          f"{load_average()})")  # fmt: skip
    for name, cpu in results.items():
        m = statistics.median(cpu)
        print(
            f"  {name:44s} {spread(cpu, 1e3, 0)} ms/step  {tokens / m:7.0f} tokens/s  "
            f"{step_flops / m / 1e9:6.1f} GFLOP/s  MFU {100 * step_flops / m / 1e9 / peak:5.1f} %"
        )
    names = list(results)
    if not args.skip_transformers:
        print(
            f"speed-up longcat2 / transformers (same AdamW): {ratio_spread(results[names[0]], results[names[1]])}"
        )
        print(
            f"  longcat2 Muon/AdamW vs transformers AdamW: {ratio_spread(results[names[0]], results[names[2]])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
