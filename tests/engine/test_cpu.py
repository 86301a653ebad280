"""CPU choices of the engine: bf16 matmuls via fp32 against the plain bf16 ops, and the thread choice."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from longcat2.engine.cpu import Bf16MatmulViaFp32, choose_threads


def _cases() -> list:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    a, b, w = r(5, 7), r(7, 3), r(4, 7)
    bat, bat2, acc = r(2, 5, 7), r(2, 7, 3), r(2, 5, 3)
    return [
        ("linear", lambda: F.linear(a, w)),
        ("matmul", lambda: torch.matmul(bat, bat2)),
        ("@", lambda: a @ b),
        ("mm", lambda: torch.mm(a, b)),
        ("bmm", lambda: bat.bmm(bat2)),
        ("baddbmm", lambda: torch.baddbmm(acc, bat, bat2)),
        ("addmm", lambda: torch.addmm(acc[0], a, b)),
        ("mv", lambda: torch.mv(a, b[:, 0])),
        ("baddbmm_", lambda: acc.clone().baddbmm_(bat, bat2)),
        ("out=", lambda: torch.matmul(a, b, out=torch.empty(5, 3, dtype=torch.bfloat16))),
    ]


@pytest.mark.parametrize("name,fn", _cases())
def test_bf16_matmul_via_fp32_matches_plain_bf16_ops(name: str, fn) -> None:
    """Same dtype and shape, values within bf16 rounding of the plain bf16 op (fp32 accumulation in both)."""
    ref = fn()
    with Bf16MatmulViaFp32():
        got = fn()
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape, name
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_bf16_matmul_mode_leaves_fp32_work_alone() -> None:
    a, b = torch.randn(4, 6), torch.randn(6, 2)
    with Bf16MatmulViaFp32():
        got = a @ b
        mixed = torch.softmax(a.to(torch.bfloat16), -1)  # not a matmul: untouched
    assert got.dtype == torch.float32 and mixed.dtype == torch.bfloat16
    torch.testing.assert_close(got, a @ b, rtol=0, atol=0)


def test_engine_bf16_tokens_do_not_depend_on_the_matmul_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 model through the engine: greedy tokens with matmuls via fp32 equal the native bf16 path's."""
    from longcat2 import LongCatForCausalLM, ModelConfig
    from longcat2.engine import cpu, generate

    torch.manual_seed(0)
    model = LongCatForCausalLM(ModelConfig.from_preset("tiny")).eval().to(torch.bfloat16)
    prompts = [torch.randint(4, 512, (n,)).tolist() for n in (9, 30)]
    outs = {}
    for mode in ("native", "fp32"):
        monkeypatch.setenv("LONGCAT2_BF16_MATMUL", mode)
        cpu.bf16_matmul_via_fp32.cache_clear()
        outs[mode], eng = generate(model, prompts, max_new_tokens=6, ignore_eos=True, return_engine=True)
        assert eng.runner.bf16_via_fp32 is (mode == "fp32")
    cpu.bf16_matmul_via_fp32.cache_clear()
    assert outs["fp32"] == outs["native"]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_onednn_linear_matches_f_linear_and_keeps_gradients(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """CpuLinear: the same values as F.linear (bias or not, 2-D / 3-D / strided input, below and above
    the size threshold); a call that needs a gradient takes F.linear, so training through it still works."""
    from torch import nn

    from longcat2.engine import cpu

    monkeypatch.setenv("LONGCAT2_FP32_LINEAR", "onednn")  # the oneDNN path on any CPU that has it
    cpu.fp32_linear_via_onednn.cache_clear()
    request.addfinalizer(cpu.fp32_linear_via_onednn.cache_clear)  # later tests measure again
    torch.manual_seed(0)
    cases = [
        (False, (1, 64), False),
        (True, (8, 64), False),
        (False, (3, 40, 64), True),
        (True, (5, 64, 64), True),
    ]
    for bias, shape, big in cases:
        plain = nn.Linear(64, 2048, bias=bias)
        routed = nn.Linear(64, 2048, bias=bias)
        routed.load_state_dict(plain.state_dict())
        assert cpu.route_cpu_linears(routed) == 1 and isinstance(routed, nn.Linear)
        x = torch.randn(*shape)
        if len(shape) == 3:
            x = x.transpose(0, 1)  # strided
        with torch.inference_mode():
            torch.testing.assert_close(routed(x), plain(x), rtol=1e-5, atol=1e-5)
        assert (x.numel() * 2048 >= cpu.ONEDNN_MIN_MACS) is big  # both paths are covered
        y = routed(x.requires_grad_())
        y.square().sum().backward()
        assert routed.weight.grad is not None and x.grad is not None
    assert list(routed.state_dict()) == list(plain.state_dict())
    x = torch.randn(1100, 80)[:, :64]  # row-strided, as latents read from the joint [latent | rope] pool
    with torch.inference_mode(), torch.profiler.profile() as prof:
        got = routed(x)
    torch.testing.assert_close(got, plain(x), rtol=1e-5, atol=1e-5)
    assert any("_linear_pointwise" in e.name for e in prof.events())  # oneDNN, not the BLAS


def test_engine_fp32_tokens_do_not_depend_on_the_linear_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp32 model through the engine: greedy tokens with oneDNN linear layers equal the BLAS path's."""
    from longcat2 import LongCatForCausalLM, ModelConfig
    from longcat2.engine import cpu, generate

    outs = {}
    for mode in ("blas", "onednn"):
        torch.manual_seed(0)
        model = LongCatForCausalLM(ModelConfig.from_preset("tiny")).eval()
        prompts = [torch.randint(4, 512, (n,)).tolist() for n in (9, 300)]
        monkeypatch.setenv("LONGCAT2_FP32_LINEAR", mode)
        cpu.fp32_linear_via_onednn.cache_clear()
        outs[mode], eng = generate(model, prompts, max_new_tokens=6, ignore_eos=True, return_engine=True)
        assert eng.runner.cpu_linears > 0
    cpu.fp32_linear_via_onednn.cache_clear()
    assert outs["onednn"] == outs["blas"]


def test_choose_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LONGCAT2_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert choose_threads(3) == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert choose_threads() == cores  # idle: every core this process may use
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 5.0, 0.0, 0.0))
    assert choose_threads() == 1  # every core busy: one thread, never zero
    monkeypatch.setenv("LONGCAT2_THREADS", "2")
    assert choose_threads() == 2
    with pytest.raises(ValueError, match="threads"):
        choose_threads(0)


def test_keep_freed_memory(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """glibc takes the mallopt settings (a runner on CPU applies them once); LONGCAT2_KEEP_FREED=0 leaves
    glibc's defaults; a C library without mallopt is a no-op."""
    import platform

    from longcat2.engine import cpu

    request.addfinalizer(cpu.keep_freed_memory.cache_clear)
    cpu.keep_freed_memory.cache_clear()
    monkeypatch.setenv("LONGCAT2_KEEP_FREED", "0")
    assert cpu.keep_freed_memory() is False
    cpu.keep_freed_memory.cache_clear()
    monkeypatch.delenv("LONGCAT2_KEEP_FREED")
    glibc = platform.libc_ver()[0] == "glibc"
    assert cpu.keep_freed_memory() is glibc


def test_cpu_experts_same_values_and_still_trainable(monkeypatch: pytest.MonkeyPatch) -> None:
    """`route_cpu_linears` gives a MoE's `Experts` `CpuExperts` (state-dict keys unchanged). Without a
    gradient it runs `native.experts` where that applies, with `Experts`' values; a call that needs a
    gradient takes the grouped GEMM, so training through the routed module still works."""
    from types import SimpleNamespace

    from longcat2.engine import cpu, native
    from longcat2.model.moe import Experts

    torch.manual_seed(0)
    cfg = SimpleNamespace(n_routed_experts=4, hidden_size=32, expert_ffn_hidden_size=16)
    plain, routed = Experts(cfg), Experts(cfg)
    for w in plain.parameters():
        torch.nn.init.normal_(w, std=0.2)
    routed.load_state_dict(plain.state_dict())
    cpu.route_cpu_linears(routed)
    assert type(routed) is cpu.CpuExperts and list(routed.state_dict()) == list(plain.state_dict())
    calls = []
    real = native.experts

    def counted(*args: torch.Tensor) -> torch.Tensor | None:
        out = real(*args)
        calls.extend([1] if out is not None else [])
        return out

    monkeypatch.setattr(native, "experts", counted)
    counts = torch.tensor([2, 0, 3, 1])
    x = torch.randn(6, 32)
    with torch.inference_mode():
        torch.testing.assert_close(routed(x, counts), plain(x, counts), rtol=1e-5, atol=1e-5)
    assert bool(calls) is native.available()
    calls.clear()
    routed(x, counts).square().sum().backward()
    assert not calls and routed.gate_proj.grad is not None and routed.down_proj.grad is not None
