"""Torch ops per engine decode step, by module, and where the step's CPU time goes (issue 21).

The checkpoint is bench/vs_vllm_cpu.py's random LongCat-Flash model (hidden 256, 2 layers, MLA 512+64);
`--batch` random prompts of `--prompt-len` tokens are prefilled through `Engine.step`, then `--steps` decode
steps are measured three ways, 1 thread:
  - Python-level torch calls (`TorchFunctionMode`) and ATen ops (`TorchDispatchMode`) per step, attributed to
    the innermost longcat2 function on the Python stack (file:function), so the table reads by module
    (attention projections, cache kernels, MoE router / experts, sampling, engine bookkeeping ...);
  - the profiler's self-CPU time per ATen op (torch.profiler, CPU) over the same steps;
  - the process CPU time per step without any instrumentation (median over the steps); with several
    `--short-kernels` the timed steps alternate between them (same process, same cache state), so their
    medians compare kernels under the same load.
Op counts and self-CPU times depend far less on the machine's load than wall time: compare revisions by them.

    python bench/decode_ops.py --dtype float32 --batch 8
    python bench/decode_ops.py --dtype bfloat16 --batch 1 --top 30
    python bench/decode_ops.py --short-kernels runs,gather --steps 16   # A/B of the short dense kernels
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import load_average, spread  # noqa: E402
from vs_vllm_cpu import VOCAB, build_checkpoint  # noqa: E402

PKG = str(ROOT / "longcat2")
SKIP = ("engine/cpu.py",)  # the bf16-via-fp32 mode: attribute its calls to whoever made the matmul


def where() -> str:
    """The innermost longcat2 function on the Python stack (file:function), or '<other>'."""
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if fn.startswith(PKG) and not fn.endswith(SKIP):
            return f"{fn[len(PKG) + 1 :]}:{f.f_code.co_name}"
        f = f.f_back
    return "<other>"


class CountCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.counts[where()] += 1
        return func(*args, **(kwargs or {}))


class CountAten(TorchDispatchMode):
    """ATen ops and their CPU time (process clock around each op) by where they were called from."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.cpu: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key = where()
        self.counts[key] += 1
        c0 = time.process_time()
        out = func(*args, **(kwargs or {}))
        self.cpu[key] += time.process_time() - c0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=20, help="rows of the profiler's self-CPU table")
    ap.add_argument(
        "--short-kernels", default="", help="runs,gather: counted/profiled with the first, timed alternating"
    )
    ap.add_argument("--time-only", action="store_true", help="only the uninstrumented CPU time per step")
    ap.add_argument("--checkpoint", type=Path, default=None, help="reuse/build the checkpoint here")
    args = ap.parse_args()

    from longcat2 import LongCatForCausalLM
    from longcat2.engine import Engine, SamplingParams

    torch.set_num_threads(1)
    ckpt = args.checkpoint or Path(tempfile.mkdtemp(prefix="decode_ops_")) / "flash_released"
    if not (ckpt / "config.json").exists():
        build_checkpoint(ckpt)
    dtype = getattr(torch, args.dtype)
    model = LongCatForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    n_kernels = len(args.short_kernels.split(",")) if args.short_kernels else 1
    n_steps = (2 + n_kernels) * args.steps + 4  # counted, profiled and timed steps, plus warm-up
    per_seq = -(-(args.prompt_len + n_steps + 8) // 256)
    eng = Engine(model, max_batch_size=8, num_blocks=8 * per_seq + 4, prefix_cache_bytes=0)
    kernels = (
        args.short_kernels.split(",")
        if args.short_kernels
        else [getattr(eng.runner.attention, "short_kernel", "gather")]
    )
    eng.runner.attention.short_kernel = kernels[0]
    g = torch.Generator().manual_seed(7)
    sp = SamplingParams(max_new_tokens=n_steps + 4, temperature=0.0, ignore_eos=True)
    for _ in range(args.batch):
        eng.add_request(torch.randint(4, VOCAB, (args.prompt_len,), generator=g).tolist(), sp)
    while any(r.num_prefilled < len(r.prompt) for r in eng.requests.values()):
        eng.step()
    for _ in range(3):
        eng.step()

    calls, aten = CountCalls(), CountAten()
    if not args.time_only:
        with calls, aten:
            for _ in range(args.steps):
                eng.step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                eng.step()
    cpu: dict[str, list[float]] = {k: [] for k in kernels}
    for _ in range(args.steps):
        for k in kernels:
            eng.runner.attention.short_kernel = k
            c0 = time.process_time()
            eng.step()
            cpu[k].append(time.process_time() - c0)

    n = args.steps
    print(f"# {args.dtype}, batch {args.batch}, {args.prompt_len}-token prompts, {n} steps; {load_average()}")
    print(
        f"# per decode step ({kernels[0]}): {sum(calls.counts.values()) / n:.0f} Python-level torch calls, "
        f"{sum(aten.counts.values()) / n:.0f} ATen ops"
    )
    for k, xs in cpu.items():
        print(f"# CPU per step, short_kernel={k}: {spread(xs, 1e3)} ms (uninstrumented)")
    if args.time_only:
        return
    print(
        "\n| where (innermost longcat2 function) | torch calls / step | ATen ops / step | ATen CPU µs / step |"
    )
    print("|---|---|---|---|")
    for key in sorted(set(calls.counts) | set(aten.counts), key=lambda k: -aten.counts[k] - calls.counts[k]):
        us = aten.cpu[key] / n * 1e6
        print(f"| {key} | {calls.counts[key] / n:.1f} | {aten.counts[key] / n:.1f} | {us:.0f} |")
    by_file: Counter[str] = Counter()
    for key, v in aten.counts.items():
        by_file[key.split(":")[0]] += v
    print("\nATen ops / step by file: " + ", ".join(f"{k} {v / n:.0f}" for k, v in by_file.most_common()))
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    print(f"\nprofiler: self-CPU {total / n / 1e3:.2f} ms per step (with profiler overhead); top ops:")
    print("| op | calls / step | self-CPU µs / step | share |")
    print("|---|---|---|---|")
    for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        share = 100 * e.self_cpu_time_total / total
        print(f"| {e.key} | {e.count / n:.1f} | {e.self_cpu_time_total / n:.0f} | {share:.1f} % |")


if __name__ == "__main__":
    main()
