"""CPU-specific choices of the engine: bf16 matmuls on CPUs without a native bf16 GEMM, and how many threads.

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
- Threads: `choose_threads` picks from the cores this process may run on (`os.sched_getaffinity`) minus
  the load other processes put on them (1-minute load average, read before this process computes), at least
  1. Threads that share a busy core spin against each other in OpenMP barriers (issue 21: with another
  process busy on one of two cores, 2-thread decode fell from 69-118 to 1.4 tok/s), so the default degrades
  to fewer threads when cores are taken; `--threads` / `LONGCAT2_THREADS` override it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from longcat2.devices import cpu_has_bf16_gemm


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
