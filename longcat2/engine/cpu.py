"""CPU-specific choices of the engine: bf16 matmuls on CPUs without a native bf16 GEMM, fp32 linear layers
through oneDNN where it beats the BLAS, and how many threads.

Design choices:
- bf16 GEMM: where oneDNN has no bf16 kernel for the CPU (no AVX512-BF16 / AMX: e.g. AVX2-only parts), PyTorch
  falls back to a reference loop for bf16 `mm`/`bmm`/`linear` that runs ~50x below the fp32 BLAS (measured
  0.3 vs 15 GFLOP/s on a 1-core AVX2 EPYC slice). `Bf16MatmulViaFp32` is a `TorchFunctionMode` that runs the
  matmul family on bf16 operands as fp32 BLAS calls and rounds the result back to bf16: the same values as
  a bf16 GEMM with fp32 accumulation, up to accumulation order. Weights stay bf16 in memory (an upcast per
  call, which large batches amortise); everything else (elementwise work, caches) stays bf16. The runner
  enters it only for bf16 models on such CPUs (`bf16_matmul_via_fp32() is True`); it is a selectable fast
  path (`LONGCAT2_BF16_MATMUL=native|fp32` overrides the detection), device-neutral code and tested against
  the plain bf16 ops.
- Linear layers (`route_cpu_linears`): a decode step's products have a few rows, so they are bound by
  reading the weight; `native.linear` streams it once (fp32 up to 8 rows, bf16 up to 2: 1.1-1.6x oneDNN
  on LongCat-2.0's 1536x12288 q_b_proj, BENCHMARKS.md), and takes fp32 batches of 12-16 and 28-32 rows
  with the rows in vector lanes (`native.LINEAR_BROADCAST_ROWS`: 1.05-1.3x oneDNN there). A MoE's routed
  experts likewise (`CpuExperts`: a decode step's few rows per expert in one C call instead of three
  grouped GEMMs, 2-8x).
- fp32 linear layers: PyTorch's fp32 `linear` calls the BLAS (MKL). On AMD CPUs MKL does not run its
  AVX-512 kernels: on session 12's Zen 4 slice a 1024³ fp32 GEMM ran at 116 GFLOP/s through MKL and 254-265
  through oneDNN (`torch.ops.mkldnn._linear_pointwise`, plain weights), and an 8-row product with
  q_b_proj's 1536×12288 weight took 8.0 vs 2.7 ms. oneDNN costs ~8 µs more per call, so
  `CpuLinear` calls oneDNN for fp32 products of at least `ONEDNN_MIN_MACS` multiply-adds, and only
  where no gradient is needed (training and DTensor weights keep `F.linear`). The choice is measured once per process
  (`fp32_linear_via_onednn`: oneDNN is used where it runs a 64×1024×1024 product ≥ 1.25x faster);
  `LONGCAT2_FP32_LINEAR=onednn|blas` overrides it. The same values as `F.linear` up to accumulation order
  (tested against it).
- Threads: `choose_threads` picks from the cores this process may run on (`os.sched_getaffinity`) minus
  the load other processes put on them (1-minute load average, read before this process computes), at least
  1. Threads that share a busy core spin against each other in OpenMP barriers (issue 21: with another
  process busy on one of two cores, 2-thread decode fell from 69-118 to 1.4 tok/s), so the default degrades
  to fewer threads when cores are taken; `--threads` / `LONGCAT2_THREADS` override it.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from longcat2.devices import cpu_has_bf16_gemm
from longcat2.engine import native
from longcat2.model.moe import Experts


@functools.cache
def bf16_matmul_via_fp32() -> bool:
    """True when bf16 matmuls should run as fp32 BLAS calls here: a CPU without a native bf16 GEMM
    (oneDNN's bf16 support check), unless LONGCAT2_BF16_MATMUL=native|fp32 says otherwise."""
    forced = os.environ.get("LONGCAT2_BF16_MATMUL", "")
    if forced in ("native", "fp32"):
        return forced == "fp32"
    if forced:
        raise ValueError(f"LONGCAT2_BF16_MATMUL: 'native' or 'fp32', got {forced!r}")
    return not cpu_has_bf16_gemm()


_BF16 = torch.bfloat16
# out-of-place matmul functions (Python-level entry points) and in-place methods → their out-of-place form
_MATMULS = {
    F.linear,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.Tensor.mm,
    torch.bmm,
    torch.Tensor.bmm,
    torch.baddbmm,
    torch.Tensor.baddbmm,
    torch.addmm,
    torch.Tensor.addmm,
    torch.mv,
    torch.Tensor.mv,
}
_INPLACE = {torch.Tensor.baddbmm_: torch.baddbmm, torch.Tensor.addmm_: torch.addmm}
if hasattr(torch, "_grouped_mm"):
    _MATMULS.add(torch._grouped_mm)


def _up(x: Any) -> Any:
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == _BF16 else x


class Bf16MatmulViaFp32(TorchFunctionMode):
    """Within this mode, matmuls with a bf16 operand compute in fp32 and return bf16 (see module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inplace = _INPLACE.get(func)
        if (func in _MATMULS or inplace is not None) and any(
            isinstance(a, torch.Tensor) and a.dtype == _BF16 for a in args
        ):
            out = kwargs.pop("out", None)
            res = (inplace or func)(*map(_up, args), **{k: _up(v) for k, v in kwargs.items()})
            if inplace is not None:
                return args[0].copy_(res)
            if out is not None:
                return out.copy_(res)
            return res.to(_BF16) if res.dtype == torch.float32 else res
        return func(*args, **kwargs)


ONEDNN_MIN_MACS = 1 << 21  # below this a oneDNN call's fixed cost outweighs its faster GEMM (module doc)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T (+ bias) through oneDNN; weight must be contiguous (module doc)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def fp32_linear_via_onednn() -> bool:
    """True when fp32 linear layers should run through oneDNN here (module doc): measured once, unless
    LONGCAT2_FP32_LINEAR=onednn|blas says otherwise."""
    forced = os.environ.get("LONGCAT2_FP32_LINEAR", "")
    if forced in ("onednn", "blas"):
        return forced == "onednn"
    if forced:
        raise ValueError(f"LONGCAT2_FP32_LINEAR: 'onednn' or 'blas', got {forced!r}")
    if not torch.backends.mkldnn.is_available():
        return False
    import time

    x, w = torch.randn(64, 1024), torch.randn(1024, 1024)
    try:
        if not torch.allclose(onednn_linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-3):
            return False
    except RuntimeError:  # no oneDNN kernel for this CPU
        return False

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(lambda: F.linear(x, w)) >= 1.25 * best(lambda: onednn_linear(x, w))


def onednn_fp32_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `onednn_linear(x, weight)` is the faster, safe product here: fp32 CPU tensors, a contiguous
    plain weight (a strided one takes oneDNN's reference path, ~1,000x slower; a DTensor shard has no
    oneDNN kernel), on a CPU where oneDNN measured faster (module doc)."""
    return (
        x.dtype == weight.dtype == torch.float32
        and x.device.type == "cpu"
        and type(weight) in (nn.Parameter, torch.Tensor)
        and weight.is_contiguous()
        and fp32_linear_via_onednn()
    )


def onednn_worth(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """`onednn_fp32_ok`, and the product x [..., in] @ weight [out, in]^T has at least ONEDNN_MIN_MACS
    multiply-adds: the one rule for routing an inference product to oneDNN (module doc)."""
    return x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS and onednn_fp32_ok(x, weight)


def mm_nt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T: through oneDNN where `onednn_worth`, else `x @ w.t()`."""
    return onednn_linear(x, w) if onednn_worth(x, w) else x @ w.t()


class CpuLinear(nn.Linear):
    """An `nn.Linear` for CPU inference (made by `route_cpu_linears`; a class swap: parameters, state-dict
    keys and isinstance checks are unchanged). Per call, where no gradient is needed: a few rows (decode)
    stream the weight through `native.linear`; fp32 products of at least ONEDNN_MIN_MACS multiply-adds run
    through oneDNN where it measured faster (a row-strided input is copied first: the dense prefill's
    latents come from the joint [latent | rope] pool, and took MKL's GEMM at half the rate, 1.5 of a 4K
    prefill's 6.1 s); everything else, and every call that needs a gradient, is `F.linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
            if self.bias is None and (y := native.linear(x, w)) is not None:
                return y
            if onednn_worth(x, w):  # (a row-strided x, such as latents read from the joint [latent |
                # rope] pool, is copied: M·K elements against the product's M·K·N; F.linear would take
                # MKL's fp32 GEMM, half oneDNN's rate here)
                return onednn_linear(x.contiguous(), w, self.bias)
        return F.linear(x, w, self.bias)


class CpuExperts(Experts):
    """A MoE's routed experts for CPU inference (made by `route_cpu_linears`; a class swap, as `CpuLinear`).
    Where no gradient is needed and no expert has more than `native.EXPERTS_MAX_ROWS` rows (a decode
    step), one C call runs every expert's three products and the silu gating (`native.experts`); on CPU
    the grouped GEMM cost ~100 µs per call there, three per MoE. Everything else is `Experts.forward`."""

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        weights = (self.gate_proj, self.up_proj, self.down_proj)
        if not (
            torch.is_grad_enabled() and (x_sorted.requires_grad or any(w.requires_grad for w in weights))
        ):
            y = native.experts(x_sorted, counts.tolist(), *weights)
            if y is not None:
                return y
        return super().forward(x_sorted, counts)


def route_cpu_linears(model: nn.Module) -> int:
    """Give every plain fp32 / bf16 `nn.Linear` of `model` on CPU `CpuLinear`'s forward, and every MoE's
    `Experts` `CpuExperts`'; → how many linear layers."""
    n = 0
    for m in model.modules():
        if type(m) is Experts and m.gate_proj.device.type == "cpu":
            m.__class__ = CpuExperts
        if (
            type(m) is nn.Linear
            and m.weight.dtype in (torch.float32, torch.bfloat16)
            and m.weight.device.type == "cpu"
        ):
            m.__class__ = CpuLinear
            n += 1
    return n


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MB for reuse instead of returning them to the OS (mallopt:
    mmap threshold 32 MB, trim threshold 1 GB); → whether it took. By default glibc serves blocks from
    128 KB up (up to the size of the last freed one) by fresh mmaps and trims the heap's top, so an
    engine step's temporary tensors of a few MB (a chunk's score tiles, a batch's gathered keys) are new
    pages on every call, each page a fault: 27 % of a 4,096-row bf16 LSA prefill chunk at LongCat-2.0
    dims went to such faults (a 4.5M-element upcast: 16.6 ms). What the process keeps is bounded by its
    own peak. Once per process; `LONGCAT2_KEEP_FREED=0` leaves glibc's defaults; other C libraries: no-op."""
    if os.environ.get("LONGCAT2_KEEP_FREED", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library (glibc has it, musl does not)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def choose_threads(requested: int | None = None) -> int:
    """Compute threads: `requested` (or LONGCAT2_THREADS) when given, else the cores this process may use
    minus the other processes' 1-minute load, at least 1 (see module doc)."""
    if requested is None and os.environ.get("LONGCAT2_THREADS"):
        requested = int(os.environ["LONGCAT2_THREADS"])
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads: at least 1, got {requested}")
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))
