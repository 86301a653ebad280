"""longcat2.devices: the one bf16-GEMM check that the engine and the trainer both follow."""

from __future__ import annotations

import pytest
import torch

from longcat2.devices import cpu_has_bf16_gemm
from longcat2.engine import cpu
from longcat2.train.env import bf16_supported


def test_engine_and_trainer_follow_the_same_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LONGCAT2_BF16_MATMUL", raising=False)
    cpu.bf16_matmul_via_fp32.cache_clear()
    try:
        assert cpu.bf16_matmul_via_fp32() is (not cpu_has_bf16_gemm())
    finally:
        cpu.bf16_matmul_via_fp32.cache_clear()
    assert bf16_supported(torch.device("cpu")) is cpu_has_bf16_gemm()
