"""Facts about the hardware that several layers ask about (engine, training), kept in one neutral module so
that neither has to import the other.

Design choices:
- Ask the library that would run the kernel: whether a CPU has a native bf16 GEMM is oneDNN's own check
  (`torch.ops.mkldnn._is_mkldnn_bf16_supported`: AVX512-BF16 or AMX), not a CPU-flag parser of ours. Where
  that private op is missing (a torch built without oneDNN), the answer is "no native bf16 GEMM".
- Cached per process: the answer cannot change while it runs.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_has_bf16_gemm() -> bool:
    """Whether this CPU has native bf16 matmul kernels (oneDNN: AVX512-BF16 / AMX). Without them PyTorch's
    bf16 `mm`/`bmm`/`linear` fall back to a reference loop ~50x below the fp32 BLAS."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
