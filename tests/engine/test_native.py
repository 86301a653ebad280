"""Compiled CPU kernels (engine/native.py) against their PyTorch twins in engine/kernels.py."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from longcat2.engine import native
from longcat2.engine.kernels import LOG2E, _masked_select, index_scan_torch, lsa_rows, select_dynamic_torch
from longcat2.model.lsa import force_and_mask, index_scores, select_topk, sparse_mla_attention

needs_cc = pytest.mark.skipif(
    os.name != "posix" or not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler here"
)
needs_native = pytest.mark.skipif(
    not native.available(),
    reason="compiled kernels not used here (no compiler, or a CPU they are not tuned for: tuned_for_this_cpu)",
)


def _scores(kind: str, t: int, r: int, g: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randn(t, r, generator=g)
    if kind == "ties":  # few distinct values: ties at the boundary in most rows
        return torch.randint(0, 5, (t, r), generator=g).float()
    if kind == "signed_zeros":  # ReLU sums with negative weights give -0.0, equal to 0.0
        s = torch.relu(torch.randn(t, r, generator=g) - 1.0)
        zero = s == 0
        s[zero] = torch.where(torch.rand(int(zero.sum()), generator=g) < 0.5, -0.0, 0.0)
        return s
    if kind == "narrow":  # one octave: the first radix digit puts most keys in one bin
        return 1.0 + 1e-3 * torch.rand(t, r, generator=g)
    if kind == "periodic":  # every 16th score large: the sampled threshold guess leaves too few keys
        s = torch.rand(t, r, generator=g)
        s[:, ::16] += 10.0
        return s
    s = torch.randn(t, r, generator=g)  # "masked": -inf non-candidates, as HI's page scores have
    s[:, r // 2 :] = float("-inf")
    return s


@needs_native
@pytest.mark.parametrize("kind", ["random", "ties", "signed_zeros", "narrow", "masked", "periodic"])
def test_select_topk_equals_the_torch_rule(kind: str) -> None:
    """Short rows (radix select of the whole row) and long ones (n >= 64 x the sample rank: a threshold
    guessed from every 16th score, the whole row again when fewer than kd reach it)."""
    g = torch.Generator().manual_seed(len(kind))
    for t, r, kd in [(1, 7, 3), (5, 300, 37), (40, 2000, 236), (3, 20_000, 236)]:
        if kind == "masked":
            kd = min(kd, r // 2 - 1)
        scores = _scores(kind, t, r, g)
        got = native.select_topk(scores, kd)
        assert got is not None, (kind, t, r, kd)
        assert torch.equal(got, select_dynamic_torch(scores.clone(), kd)), (kind, t, r, kd)


@needs_native
def test_select_topk_rows_split_over_threads() -> None:
    g = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 50, (200, 3000), generator=g).float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        got = native.select_topk(scores, 100)
    finally:
        torch.set_num_threads(threads)
    assert got is not None and torch.equal(got, select_dynamic_torch(scores.clone(), 100))


@needs_native
@pytest.mark.parametrize("kind", ["random", "ties", "signed_zeros"])
def test_lsa_rows_both_paths_equal_the_model(kind: str) -> None:
    """The C path (candidates bounded per row, no masking) and the PyTorch path (masked, then top-k) give
    the model's selection (force_and_mask + select_topk)."""
    g = torch.Generator().manual_seed(11)
    topk, init, local, s, t = 64, 4, 16, 600, 90
    full = _scores(kind, t, s, g)
    q_pos = torch.arange(s - t, s)
    ref = select_topk(force_and_mask(full[None], q_pos[None], init, local)[0], topk)
    dynamic = full[:, init : s - local].contiguous()
    limit = q_pos - local - init
    kd = topk - init - local
    via_c = native.select_topk(dynamic, kd, limit)
    via_torch = _masked_select(dynamic.clone(), limit, kd)
    assert via_c is not None
    assert torch.equal(via_c, via_torch)
    assert torch.equal(lsa_rows(dynamic.clone(), q_pos, topk, init, local), ref)


@needs_native
def test_select_topk_declines_what_it_does_not_serve() -> None:
    """Every case outside the kernel's contract returns None, so the caller takes the PyTorch path."""
    scores = torch.randn(4, 100)
    assert native.select_topk(scores, 0) is None
    assert native.select_topk(scores.double(), 10) is None
    assert native.select_topk(scores.t().contiguous().t(), 10) is None  # column stride != 1
    assert native.select_topk(scores, 10, torch.tensor([99, 99, 5, 99])) is None  # a row with 6 candidates
    few = scores.clone()
    few[2, 3:] = float("-inf")  # the 10th largest of row 2 is -inf
    assert native.select_topk(few, 10) is None
    assert native.select_topk(scores[:, ::2], 10) is None


@needs_cc
def test_library_builds_into_the_cache_dir_and_can_be_turned_off(tmp_path) -> None:
    code = (
        "from longcat2.engine import native; import torch;"
        "print(native.available(), native.select_topk(torch.randn(3, 50), 5) is not None)"
    )
    env = dict(os.environ, LONGCAT2_CACHE_DIR=str(tmp_path), LONGCAT2_NATIVE="1")  # (any CPU)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
    built = list((tmp_path / "native").glob("lc2_*.so"))
    assert len(built) == 1
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert again.stdout.split() == ["True", "True"]  # loaded from the cache
    assert list((tmp_path / "native").glob("lc2_*.so")) == built
    env["LONGCAT2_NATIVE"] = "0"
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert off.stdout.split() == ["False", "False"]
    env["LONGCAT2_NATIVE"] = "auto"  # the default: on where the kernels are tuned for the CPU
    auto = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert auto.stdout.split() == [str(native.tuned_for_this_cpu())] * 2
    env["LONGCAT2_NATIVE"] = "yes"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "LONGCAT2_NATIVE" in bad.stderr


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "t,h,d",
    [(1, 4, 16), (37, 4, 16), (5, 3, 24), (40, 2, 8), (1, 32, 128), (1, 64, 40), (3, 16, 64), (4, 48, 33)],
)
def test_index_scores_equal_the_torch_scan_and_the_model(dtype: torch.dtype, t: int, h: int, d: int) -> None:
    """Several runs of keys (one of a single key, a partial last register tile), fp32 and bf16 keys; narrow
    heads (keys transposed) and wide ones (heads in the vector lanes: 16-64 heads, head dims off the
    vector width), which serve up to WIDE_SCAN_MAX_ROWS rows."""
    g = torch.Generator().manual_seed(t * 100 + d)
    s = 700
    q, w, k = (
        torch.randn(t, h, d, generator=g),
        torch.randn(t, h, generator=g),
        torch.randn(s, d, generator=g),
    )
    k = k.to(dtype)
    pieces = [(50, k[50:333]), (333, k[333:334]), (334, k[334:])]
    got = native.index_scores(q, w, pieces, 50, s)
    assert got is not None
    tol = 1e-5 * max(1, d // 16)  # (sums of d products)
    ref = index_scan_torch(q, w, pieces, 50, s, torch.empty(t, s - 50))
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    model = index_scores(q[None], w[None], k.float()[None])[0][:, 50:]
    torch.testing.assert_close(got, model, rtol=tol, atol=tol)
    out = torch.full((t, s - 50), float("nan"))
    assert native.index_scores(q, w, pieces, 50, s, out) is out  # into a caller's buffer (the workspace)
    torch.testing.assert_close(out, got, rtol=0, atol=0)
    if d > native.SCAN_MAX_DIM:  # wide heads: more rows are a GEMM's, other head counts the PyTorch scan's
        many = torch.randn(native.WIDE_SCAN_MAX_ROWS + 1, h, d)
        assert native.index_scores(many, torch.ones(many.shape[:2]), pieces, 50, s) is None
        assert native.index_scores(q[:, :-1], w[:, :-1], pieces, 50, s) is None


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,c,rr,k", [(4, 32, 8, 50), (3, 40, 6, 37), (6, 128, 16, 17)])
def test_slot_attend_equals_the_model_sparse_core(
    dtype: torch.dtype, h: int, c: int, rr: int, k: int
) -> None:
    """o / l is the model's sparse MLA over the slots (empty slots left out); m and l are the block's
    log2-unit max and sum; a row without valid slots gives m = -inf, l = 0, o = 0."""
    g = torch.Generator().manual_seed(h * c + k)
    r, p, scale = 5, 300, 0.3
    ql, qr = torch.randn(r, h, c, generator=g) * (32 / c) ** 0.5, torch.randn(r, h, rr, generator=g)
    ql, qr = ql.to(dtype).float(), qr.to(dtype).float()  # bf16-exact queries
    lat, rope = torch.randn(p, c, generator=g).to(dtype), torch.randn(p, rr, generator=g).to(dtype)
    slots = torch.randint(0, p, (r, k), generator=g)
    slots[0, k // 2 :] = -1
    slots[4] = -1
    pool = torch.cat([lat, rope], dim=-1)  # [P, c + r]: the cache's layout
    got = native.slot_attend(torch.cat([ql, qr], dim=-1), pool, slots, c, scale * LOG2E)
    assert got is not None
    o, m, l_sum = got
    ref = sparse_mla_attention(ql[None], qr[None], lat.float()[None], rope.float()[None], slots[None], scale)[
        0
    ]
    torch.testing.assert_close(o[:4] / l_sum[:4, :, None], ref[:4], rtol=1e-5, atol=1e-5)
    kv = pool.float()[slots[:4].clamp(min=0)]  # [4, k, c + r]
    s2 = torch.einsum("rhd,rkd->rhk", torch.cat([ql, qr], dim=-1)[:4], kv) * scale * LOG2E
    s2[0, :, k // 2 :] = float("-inf")
    torch.testing.assert_close(m[:4], s2.amax(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        l_sum[:4], torch.exp2(s2 - s2.amax(-1, keepdim=True)).sum(-1), rtol=1e-5, atol=1e-5
    )
    assert torch.isinf(m[4]).all() and (l_sum[4] == 0).all() and (o[4] == 0).all()


@needs_native
@pytest.mark.parametrize("h,k,c,width", [(64, 300, 512, 576), (5, 37, 20, 24), (6, 70, 100, 100)])
def test_pv_rows_equals_matmul(h: int, k: int, c: int, width: int) -> None:
    """Whole and partial register tiles (heads not a multiple of 4, columns not of 64), key blocks of 256
    and a partial one, values a column slice of wider gathered rows; written and accumulated."""
    g = torch.Generator().manual_seed(h + k)
    n = 3
    probs = torch.rand(n, h, k, generator=g)
    values = torch.randn(n, k, width, generator=g)[..., :c]
    ref = torch.bmm(probs, values)
    out = torch.full((n, h, c), float("nan"))
    assert native.pv_rows(probs, values, out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    base = torch.randn(n, h, c, generator=g)
    acc = base.clone()
    assert native.pv_rows(probs, values, acc, accumulate=True)
    torch.testing.assert_close(acc, base + ref, rtol=1e-5, atol=1e-4)
    assert not native.pv_rows(probs.bfloat16(), values.bfloat16(), out)  # fp32 only


@needs_cc
def test_library_builds_in_a_temp_dir_when_the_cache_dir_is_not_writable(tmp_path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache directory would be: mkdir fails
    code = "from longcat2.engine import native; print(native.available())"
    env = dict(os.environ, LONGCAT2_CACHE_DIR=str(blocked / "cache"), TMPDIR=str(tmp_path / "tmp"))
    env["LONGCAT2_NATIVE"] = "1"  # (any CPU)
    (tmp_path / "tmp").mkdir()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"]
    assert list((tmp_path / "tmp").glob(f"longcat2-{os.getuid()}/native/lc2_*.so"))


def _bf16_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16 results against an fp32 reference: within one bf16 rounding (accumulation order differs)."""
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=2**-7, atol=1e-3)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_equals_f_linear(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Rows 1 .. LINEAR_MAX_ROWS, output widths that are not a multiple of the 8-row weight tile, input
    widths with a tail past the last 16 lanes, 3-D and strided inputs, one and two threads."""
    monkeypatch.setattr(native, "LINEAR_MAX_ROWS", {torch.float32: 8, torch.bfloat16: 8})
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT", 0)
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT_ROWS", 0)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for rows, n, k in [
                (1, 1, 16),
                (1, 100, 37),
                (2, 33, 256),
                (3, 300, 200),
                (5, 17, 15),
                (8, 1031, 70),
            ]:
                w = torch.randn(n, k, generator=g).to(dtype)
                x = torch.randn(rows, k, generator=g).to(dtype)
                ref = torch.nn.functional.linear(x.float(), w.float())
                got = native.linear(x, w)
                assert got is not None and got.shape == (rows, n), (rows, n, k)
                if dtype == torch.float32:
                    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
                else:
                    _bf16_close(got, ref)
            x3 = torch.randn(4, 2, 64, generator=g).to(dtype).transpose(0, 1)  # [2, 4, 64], strided
            w = torch.randn(48, 64, generator=g).to(dtype)
            got = native.linear(x3, w)
            assert got is not None and got.shape == (2, 4, 48)
            ref = torch.nn.functional.linear(x3.float(), w.float())
            if dtype == torch.float32:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            else:
                _bf16_close(got, ref)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_linear_broadcast_rows_equal_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 products of LINEAR_BROADCAST_ROWS rows (the broadcast tiles: rows in vector lanes, padded to 16
    or 32) against F.linear and against the 2-row tiles (the C threshold raised past them): weight row counts
    off the 12-row tile, input widths off the vector width, strided rows, one and two threads."""
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT_ROWS", 0)
    lib = native.library()
    min_rows = ctypes.c_int.in_dll(lib, "lc2_nt_bc_min_rows")
    default = min_rows.value
    g = torch.Generator().manual_seed(2)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for rows, n, k in [(12, 37, 70), (13, 1031, 15), (16, 12, 64), (28, 100, 129), (32, 2000, 256)]:
                assert rows in native.LINEAR_BROADCAST_ROWS
                w = torch.randn(n, k, generator=g)
                x = torch.randn(rows, 2 * k, generator=g)[:, ::2]  # strided rows and columns
                ref = torch.nn.functional.linear(x, w)
                got = native.linear(x, w)
                assert got is not None and got.shape == (rows, n), (rows, n, k)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
                min_rows.value = 1 << 30  # the 2-row tiles
                try:
                    two_row = native.linear(x, w)
                finally:
                    min_rows.value = default
                torch.testing.assert_close(got, two_row, rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_linear_bf16_rounds_to_nearest_even_and_keeps_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each output is x[a] + s * x[b] (two nonzero weights per row), exact in fp32 for these ranges, so the
    bf16 output must be that sum rounded as `Tensor.to(bfloat16)` rounds it; ties (1 + 2^-8, 1 + 3 * 2^-8)
    go to even. A NaN input gives NaN outputs."""
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT", 0)
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT_ROWS", 0)
    g = torch.Generator().manual_seed(1)
    k, n = 64, 512
    x = (1.0 + torch.rand(1, k, generator=g)).to(torch.bfloat16)  # [1, 2)
    x[0, :2] = 1.0
    a = torch.randint(0, k, (n,), generator=g)
    b = (a + 1 + torch.randint(0, k - 1, (n,), generator=g)) % k
    s = (0.5 + 0.5 * torch.rand(n, generator=g)).to(torch.bfloat16)  # [0.5, 1)
    a[:2], b[:2] = 0, 1  # x[0] = x[1] = 1: ties
    s[0], s[1] = 2.0**-8, 3 * 2.0**-8
    w = torch.zeros(n, k, dtype=torch.bfloat16)
    w[torch.arange(n), a] = 1.0
    w[torch.arange(n), b] = s
    exact = x[0, a].float() + s.float() * x[0, b].float()  # [n]
    got = native.linear(x, w)
    assert got is not None
    assert torch.equal(got[0], exact.to(torch.bfloat16))
    assert got[0, 0] == 1.0 and got[0, 1] == 1.015625  # the ties, to even
    x[0, 5] = float("nan")
    got = native.linear(x, w)
    assert got is not None and torch.isnan(got[0][(a == 5) | (b == 5)]).all()


@needs_native
def test_linear_declines_what_it_does_not_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT", 0)
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT_ROWS", 0)
    w = torch.randn(32, 16)
    assert native.linear(torch.randn(native.LINEAR_MAX_ROWS[torch.float32] + 1, 16), w) is None  # prefill
    assert native.linear(torch.randn(1, 16).double(), w.double()) is None  # dtype
    assert native.linear(torch.randn(1, 16).to(torch.bfloat16), w) is None  # mixed dtypes
    assert native.linear(torch.randn(1, 16), w.t().contiguous().t()) is None  # strided weight
    assert native.linear(torch.randn(1, 8), w[:, :8]) is None  # (a non-contiguous slice)
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT", 1 << 20)
    assert native.linear(torch.randn(1, 16), w) is None  # small: the BLAS call is cheaper
    with native.disabled():
        monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT", 0)
        monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT_ROWS", 0)
        assert native.linear(torch.randn(1, 16), w) is None


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absorb_and_unabsorb_equal_the_model(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's absorbed-form products read kv_b_proj's weight in place (`native.absorb` /
    `native.unabsorb` through `kernels.absorb` / `kernels.unabsorb`) and equal `MLA.absorb` / `unabsorb`
    (the tiny model's weight, below the fp32 size floor, with the floor lifted; at the floor fp32 declines,
    bf16 has none)."""
    floor = native.LINEAR_MIN_WEIGHT
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT", 0)
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT_ROWS", 0)
    from longcat2 import ModelConfig
    from longcat2.engine.kernels import absorb, unabsorb
    from longcat2.model.attention import MLA

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    mla = MLA(cfg, has_indexer=False).to(dtype).eval()
    h, nope, c = mla.num_heads, mla.nope, cfg.kv_lora_rank
    for t in range(1, native.ABSORB_MAX_ROWS[dtype] + 1):
        q = torch.randn(t, h, nope).to(dtype)
        o = torch.randn(t, h, c)  # fp32 attended latents, as the attention kernels return them
        with torch.no_grad():
            ref_q, ref_o = mla.absorb(q), mla.unabsorb(o)
            got_q = native.absorb(q, mla.kv_b_proj.weight, nope, mla.v_dim)
            got_o = native.unabsorb(o, mla.kv_b_proj.weight, nope, mla.v_dim)
            assert got_q is not None and got_o is not None
            assert torch.equal(absorb(mla, q), got_q) and torch.equal(unabsorb(mla, o), got_o)
        assert got_q.shape == ref_q.shape and got_o.shape == ref_o.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got_q, ref_q, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_o, ref_o, rtol=1e-5, atol=1e-5)
        else:
            _bf16_close(got_q, ref_q.float())
            _bf16_close(got_o, ref_o.float())
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT", floor)
    assert mla.kv_b_proj.weight.numel() < floor
    declined = native.absorb(q[:1], mla.kv_b_proj.weight, nope, mla.v_dim) is None
    assert declined is (dtype == torch.float32)  # (bf16 has no floor)
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT", 0)
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT_ROWS", 0)
    big = native.ABSORB_MAX_ROWS[dtype] + 1  # a prefill's rows: the model's batched GEMMs
    assert native.absorb(torch.randn(big, h, nope).to(dtype), mla.kv_b_proj.weight, nope, mla.v_dim) is None
    q = torch.randn(1, h, nope, requires_grad=True)
    if dtype == torch.float32:  # a call that needs a gradient keeps the model's differentiable path
        absorb(mla.train(), q).sum().backward()
        assert q.grad is not None and mla.kv_b_proj.weight.grad is not None


@needs_native
def test_engine_tokens_equal_with_and_without_the_streamed_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 greedy decode through the engine: every decode product through `native.linear` / `absorb` /
    `unabsorb` (size floor lifted so the tiny model's layers take it) and the MoE's experts through
    `native.experts` give the PyTorch path's tokens."""
    from longcat2 import LongCatForCausalLM, ModelConfig
    from longcat2.engine import generate

    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT", 0)
    monkeypatch.setattr(native, "LINEAR_MIN_WEIGHT_ROWS", 0)
    calls = {"n": 0}
    plain_linear = native.linear

    def counted(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        out = plain_linear(x, w)
        calls["n"] += out is not None
        return out

    monkeypatch.setattr(native, "linear", counted)
    plain_experts = native.experts

    def counted_experts(*args: torch.Tensor) -> torch.Tensor | None:
        out = plain_experts(*args)
        calls["experts"] = calls.get("experts", 0) + (out is not None)
        return out

    monkeypatch.setattr(native, "experts", counted_experts)
    outs = []
    for use_native in (True, False):
        torch.manual_seed(0)
        model = LongCatForCausalLM(ModelConfig.from_preset("tiny")).eval()
        prompts = [torch.randint(4, 512, (n,)).tolist() for n in (9, 300)]
        if use_native:
            outs.append(generate(model, prompts, max_new_tokens=8, ignore_eos=True))
        else:
            with native.disabled():
                outs.append(generate(model, prompts, max_new_tokens=8, ignore_eos=True))
    assert calls["n"] > 0 and calls["experts"] > 0
    assert outs[0] == outs[1]


@needs_native
@needs_native
@pytest.mark.parametrize("h,d", [(32, 128), (64, 40), (4, 16)])
def test_index_scores_rows_equal_each_rows_scan(h: int, d: int) -> None:
    """Rows with keys of their own (a decode step's sequences): runs of uneven length, fp32 and bf16 keys,
    wide and narrow heads, one and two threads; each row's scores equal its own `index_scan_torch`, and the
    columns past a row's keys are left alone."""
    g = torch.Generator().manual_seed(h + d)
    lengths = [700, 333, 1000]
    q, w = torch.randn(3, h, d, generator=g), torch.randn(3, h, generator=g)
    keys = [
        torch.randn(n, d, generator=g).to(dt)
        for n, dt in zip(lengths, (torch.float32, torch.bfloat16, torch.float32))
    ]
    row_pieces = [[(5, k[5:200]), (200, k[200:201]), (201, k[201:])] for k in keys]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.full((3, 1000), float("nan"))
            assert native.index_scores_rows(q, w, row_pieces, 5, out) is out
            for i, n in enumerate(lengths):
                ref = index_scan_torch(q[i : i + 1], w[i : i + 1], row_pieces[i], 5, n, torch.empty(1, n - 5))
                tol = 1e-5 * max(1, d // 16)
                torch.testing.assert_close(out[i : i + 1, : n - 5], ref, rtol=tol, atol=tol)
                assert out[i, n - 5 :].isnan().all()
    finally:
        torch.set_num_threads(before)
    assert native.index_scores_rows(q, w, row_pieces[:2], 5, torch.empty(3, 1000)) is None  # rows
    assert native.index_scores_rows(q, w, row_pieces, 5, torch.empty(3, 900)) is None  # too narrow


def test_wide_index_scan_splits_a_decode_rows_keys_over_threads() -> None:
    """A decode row's keys (runs of uneven length) cut into one group per thread; the groups cover every
    key once, so the scores equal the single-thread scan's."""
    g = torch.Generator().manual_seed(5)
    q, w = torch.randn(1, 32, 128, generator=g), torch.randn(1, 32, generator=g)
    k = torch.randn(9000, 128, generator=g)
    pieces = [(100, k[100:2500]), (2500, k[2500:2501]), (2501, k[2501:9000])]
    ref = index_scan_torch(q, w, pieces, 100, 9000, torch.empty(1, 8900))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got = native.index_scores(q, w, pieces, 100, 9000, torch.full((1, 8900), float("nan")))
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(before)
    groups = native._split_keys(pieces, 3)  # noqa: SLF001
    assert len(groups) == 3 and [sum(x.shape[0] for _, x in grp) for grp in groups] == [2967, 2967, 2966]


@needs_native
@pytest.mark.parametrize("h", [16, 48, 64, 128])
def test_slot_attention_equals_the_model_sparse_core(h: int) -> None:
    """Large rows' attention with the keys read in place: head counts that fill 1-4 register vectors and
    more than one 64-head group, key counts off the 4-key tile and the 64-key block, latent widths of one
    and of several 64-column strips (the last one partial), empty slots: in the middle, filling the
    first block (the online softmax starts from -inf), and a row with none valid (zeros); scores large
    enough that later blocks rescale the earlier ones."""
    from longcat2.engine.kernels import LOG2E

    assert f"#define SA_KEYS {native.SLOT_ATTENTION_KEYS}\n" in native._SOURCE  # the scratch it is given
    g = torch.Generator().manual_seed(h)
    rr, p = 8, 500
    for rows, k, c, q_scale in [(1, 1, 64, 0.3), (3, 37, 64, 0.3), (2, 300, 64, 0.3), (3, 150, 200, 2.0)]:
        q = torch.randn(rows, h, c + rr, generator=g) * q_scale
        lat, rope = torch.randn(p, c, generator=g), torch.randn(p, rr, generator=g)
        pool = torch.cat([lat, rope], dim=-1)
        slots = torch.randint(0, p, (rows, k), generator=g)
        if k > 1:
            slots[0, k // 2 :] = -1
        if rows > 2:
            slots[1, : min(k - 1, 70)] = -1
            slots[2] = -1
        ref = sparse_mla_attention(
            q[None, ..., :c], q[None, ..., c:], lat[None], rope[None], slots[None], 0.7
        )[0]
        if rows > 2:
            ref[2] = 0.0  # no valid key: the reference's softmax over nothing is NaN, the kernel's zeros
        got = native.slot_attention(q, pool, slots, c, 0.7 * LOG2E)
        assert got is not None
        tol = 1e-5 * q_scale / 0.3  # (scores of hundreds: fp32 rounding of the sums scales with them)
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert native.slot_attention(torch.randn(1, 12, c + rr), pool, slots[:1], c, 1.0) is None  # h % 16
    assert native.slot_attention(q.to(torch.bfloat16), pool.to(torch.bfloat16), slots, c, 1.0) is None


def test_linear_worth_rule() -> None:
    """Which products go to the C kernels: fp32 one row only for large (streamed) weights, from two rows on
    also for small ones (MKL's small-M GEMM is slow), and the LINEAR_BROADCAST_ROWS row counts past
    LINEAR_MAX_ROWS; bf16 up to LINEAR_MAX_ROWS rows at every size (a oneDNN bf16 call's fixed cost is the
    larger), never more."""
    big = torch.empty(native.LINEAR_MIN_WEIGHT, 1)
    small = torch.empty(native.LINEAR_MIN_WEIGHT_ROWS, 1)
    tiny = torch.empty(native.LINEAR_MIN_WEIGHT_ROWS // 2, 1)
    assert native.linear_worth(1, big) and not native.linear_worth(1, small)
    assert native.linear_worth(2, small) and not native.linear_worth(2, tiny)
    assert not native.linear_worth(native.LINEAR_MAX_ROWS[torch.float32] + 1, big)
    assert (
        native.linear_worth(32, big) and native.linear_worth(12, small) and not native.linear_worth(24, big)
    )
    assert not native.linear_worth(32, big.to(torch.bfloat16))  # (broadcast rows: fp32 only)
    assert native.linear_worth(2, big.to(torch.bfloat16)) and native.linear_worth(1, tiny.to(torch.bfloat16))
    assert not native.linear_worth(native.LINEAR_MAX_ROWS[torch.bfloat16] + 1, big.to(torch.bfloat16))
    assert not native.linear_worth(1, big.double()) and not native.linear_worth(0, big)


def _softmax_tile_reference(
    s: torch.Tensor, m: torch.Tensor, l_sum: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The online-softmax step as PyTorch ops (fp32): → probs, m, l, corr."""
    rows, width = s.shape
    sc = s.float().clone()
    seen = torch.arange(width)[None, :] < (offset + torch.arange(rows))[:, None]  # [R, J]
    sc.masked_fill_(~seen, float("-inf"))
    m_new = torch.maximum(m, sc.amax(dim=-1, keepdim=True))
    nothing = torch.isinf(m_new)  # no key seen yet: zeros, state unchanged
    safe = torch.where(nothing, torch.zeros_like(m_new), m_new)
    probs = (sc - safe).exp2()
    corr = torch.where(nothing, torch.ones_like(m), (m - safe).exp2())
    return probs, torch.where(nothing, m, m_new), l_sum * corr + probs.sum(-1, keepdim=True), corr[:, 0]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width,offset", [(37, 53, 10**6), (40, 70, -5), (8, 16, 1)])
def test_softmax_tile_equals_the_torch_step(dtype: torch.dtype, rows: int, width: int, offset: int) -> None:
    """One online-softmax step in place: causal limits (rows that see nothing, partial, all), running
    max from -inf and from earlier blocks, bf16 numerators rounded from the fp32 ones; then `scale_add`."""
    g = torch.Generator().manual_seed(rows + width)
    s = (4 * torch.randn(rows, width, generator=g)).to(dtype)
    m = torch.where(
        torch.rand(rows, 1, generator=g) < 0.5, -float("inf"), 3 * torch.randn(rows, 1, generator=g)
    )
    l_sum = torch.where(torch.isinf(m), 0.0, torch.rand(rows, 1, generator=g) + 1)
    probs, m_ref, l_ref, corr_ref = _softmax_tile_reference(s, m, l_sum, offset)
    got, corr = s.clone(), torch.full((rows,), float("nan"))
    m_got, l_got = m.clone(), l_sum.clone()
    assert native.softmax_tile(got, m_got, l_got, corr, offset)
    assert got.dtype == dtype
    ulp = 2**-8 if dtype == torch.bfloat16 else 1e-5  # (exp2 by polynomial: a bf16 rounding may differ)
    torch.testing.assert_close(got.float(), probs.to(dtype).float(), rtol=ulp, atol=1e-6)
    torch.testing.assert_close(m_got, m_ref, rtol=0, atol=0)
    torch.testing.assert_close(l_got, l_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(corr, corr_ref, rtol=1e-6, atol=0)
    acc, pv = torch.randn(rows, 19, generator=g), torch.randn(rows, 19, generator=g).to(dtype)
    want = acc * corr[:, None] + pv.float()
    assert native.scale_add(acc, corr, pv)
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-6)
    assert not native.softmax_tile(s.half(), m, l_sum, corr, offset)  # fp32 / bf16 only


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_picks", [True, False])
def test_softmax_window_equals_masked_softmax(dtype: torch.dtype, with_picks: bool) -> None:
    """Windowed LSA rows: row i sees the sink [0, init) and its band [init + i, init + i + local) of the
    window scores (the band clipped at W for the last rows), plus its dynamic picks but the empty ones;
    one max over both parts, scores scaled; → numerators in place, (m, l) per row and head."""
    g = torch.Generator().manual_seed(7)
    n, h, init, local, kd, scale = 6, 5, 3, 9, 21, 0.7
    width = init + local + n - 3  # the last rows' bands run past W
    s_w = (4 * torch.randn(n, h, width, generator=g)).to(dtype)
    s_d = (4 * torch.randn(n, h, kd, generator=g)).to(dtype) if with_picks else None
    slots = torch.randint(0, 100, (n, kd), generator=g)
    slots[1, 2:7] = -1
    j = torch.arange(width)
    seen_w = (j[None, :] < init) | (
        (j[None, :] >= init + torch.arange(n)[:, None])
        & (j[None, :] < init + local + torch.arange(n)[:, None])
    )
    parts = [torch.where(seen_w[:, None], s_w.float() * scale, float("-inf"))]
    if with_picks:
        parts.append(torch.where((slots >= 0)[:, None], s_d.float() * scale, float("-inf")))
    full = torch.cat(parts, dim=-1)  # [n, h, W (+ kd)]
    m_ref = full.amax(dim=-1)
    p_ref = (full - m_ref[..., None]).exp2()
    got_w, got_d = s_w.clone(), None if s_d is None else s_d.clone()
    m, l_sum = native.softmax_window(got_w, got_d, slots if with_picks else None, init, local, scale)
    torch.testing.assert_close(m, m_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l_sum, p_ref.sum(-1), rtol=1e-5, atol=1e-5)
    got = got_w if got_d is None else torch.cat([got_w, got_d], dim=-1)
    ulp = 2**-8 if dtype == torch.bfloat16 else 1e-5  # (exp2 by polynomial: a bf16 rounding may differ)
    torch.testing.assert_close(got.float(), p_ref.to(dtype).float(), rtol=ulp, atol=1e-6)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_wsum_and_rescore_equal_torch(dtype: torch.dtype) -> None:
    """The prefill scan's tile pass (scores and the two-pass scan's Σ|w||dot| bound, into a strided view;
    a tail that is not a multiple of 16) and the exact rescoring of marked keys (heads not a multiple of
    16, marks past a row's limit left alone)."""
    g = torch.Generator().manual_seed(3)
    rows, h, n, d = 5, 20, 150, 24
    dots = torch.randn(rows, h, n, generator=g).to(dtype)
    w = torch.randn(rows, h, generator=g)
    out, err = torch.zeros(rows, n + 7)[:, :n], torch.zeros(rows, n + 7)[:, :n]
    assert native.relu_wsum(dots, w, out, err)
    torch.testing.assert_close(out, (dots.float().relu() * w[:, :, None]).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(err, (dots.float().abs() * w.abs()[:, :, None]).sum(1), rtol=1e-5, atol=1e-5)
    q = torch.randn(rows, h, d, generator=g).to(dtype)
    pool = torch.randn(300, d + 8, generator=g).to(dtype)[:, :d]
    pool_row = torch.randperm(300, generator=g)[:n]
    cand = torch.rand(rows, n, generator=g) < 0.3
    limit = torch.tensor([n - 1, 40, 0, 149, 100])
    scores = torch.full((rows, n), -7.0)
    assert native.rescore(q, w, pool, pool_row, cand, limit, scores)
    exact = (torch.relu(torch.einsum("thd,nd->thn", q.float(), pool[pool_row].float())) * w[:, :, None]).sum(
        1
    )
    hit = cand & (torch.arange(n)[None, :] <= limit[:, None])
    torch.testing.assert_close(scores[hit], exact[hit], rtol=1e-5, atol=1e-5)
    assert (scores[~hit] == -7.0).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_run_attend_pool_equals_causal_softmax_attention_and_declines_bad_plans(dtype: torch.dtype) -> None:
    """`run_attend_pool` (scores in log2 units) against a float64 causal softmax over the pool rows of two
    runs: 3 queries x 3 heads (rows not a multiple of the 4-row tile), 75 keys (three key tiles, the last
    one partial and partly in the future), head dims with tails (D = 81, c = 72). Plans whose runs miss
    positions or leave the pool are declined with out untouched."""
    if not native.available():
        pytest.skip("no compiled kernels here")
    g = torch.Generator().manual_seed(11)
    t, h, c, d, start = 3, 3, 72, 81, 72
    pool = torch.randn(200, d, generator=g).to(dtype)
    runs = [(5, 40), (100, start + t - 40)]
    keys = torch.cat([pool[r : r + m] for r, m in runs]).double()  # [S, D] in position order
    q = torch.randn(t * h, d, generator=g) * 0.3  # [T*h, D], log2 units
    s = q.double() @ keys.t()  # [T*h, S]
    future = torch.arange(keys.shape[0])[None, :] > (start + torch.arange(t * h) // h)[:, None]
    p = torch.softmax(s.masked_fill(future, float("-inf")) * torch.log(torch.tensor(2.0)).double(), dim=-1)
    ref = p @ keys[:, :c]  # [T*h, c]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    out = torch.empty(t * h, c, dtype=dtype)
    assert native.run_attend_pool(q, pool, [(0, t, start, runs)], out)
    torch.testing.assert_close(out.double(), ref, **tol)
    sentinel = torch.full((t * h, c), 7.0, dtype=dtype)
    for bad in ([(5, 40), (100, 30)], [(5, 40), (190, 35)]):  # a position missing; past the pool's end
        assert not native.run_attend_pool(q, pool, [(0, t, start, bad)], sentinel)
    assert bool((sentinel == 7.0).all())


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_equal_the_grouped_gemm_module(dtype: torch.dtype, threads: int) -> None:
    """`native.experts` against `Experts.forward` (the grouped GEMM): experts with 0, 1, 2, 3 and the most
    rows it serves, an expert width with a tail (I = 40), the experts split over 1 or 2 threads; fp32 to
    rounding, bf16 within a bf16 step (the same roundings, sums in another order). An expert with more
    rows than EXPERTS_MAX_ROWS, or weights of another dtype, are declined (None)."""
    from types import SimpleNamespace

    from longcat2.model.moe import Experts

    if not native.available():
        pytest.skip("no compiled kernels here")
    torch.manual_seed(3)
    most = native.EXPERTS_MAX_ROWS[dtype]
    module = Experts(SimpleNamespace(n_routed_experts=6, hidden_size=64, expert_ffn_hidden_size=40))
    with torch.no_grad():
        for w in (module.gate_proj, module.up_proj, module.down_proj):
            w.copy_(torch.randn(w.shape) * 0.2)
    module = module.to(dtype).eval()
    counts = [0, 1, 2, 3, most, 1]
    x = torch.randn(sum(counts), 64).to(dtype)
    weights = (module.gate_proj, module.up_proj, module.down_proj)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = native.experts(x, counts, *weights)
            ref = module(x, torch.tensor(counts))
    finally:
        torch.set_num_threads(before)
    assert got is not None and got.dtype == dtype and got.shape == ref.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)
    too_many = [0, 1, 2, 3, most + 1, 1]
    assert native.experts(torch.randn(sum(too_many), 64).to(dtype), too_many, *weights) is None
    assert native.experts(x.double(), counts, *(w.double() for w in weights)) is None


@needs_cc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "x86-64-v4"])
def test_source_builds_for_each_x86_level(tmp_path, march: str) -> None:
    """The C source compiles for baseline x86-64, AVX2 (v3) and AVX-512 (v4), not only for this machine's
    -march=native. Register hints that only an AVX-512 register can satisfy once broke the AVX2 build:
    AVX2 CPUs then ran the PyTorch path only."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    src = tmp_path / "lc2.c"
    src.write_text(native._SOURCE)
    flags = [f for f in native._FLAGS if f != "-march=native"]
    res = subprocess.run(
        [cc, *flags, f"-march={march}", "-o", str(tmp_path / "lc2.so"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0 and "march" in res.stderr and march in res.stderr and "bad value" in res.stderr:
        pytest.skip(f"{cc} does not know -march={march}")
    assert res.returncode == 0, res.stderr[-2000:]
