"""Compiled CPU kernels (engine/native.py) against their PyTorch twins in engine/kernels.py."""

from __future__ import annotations

import os
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


@needs_cc
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


@needs_cc
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


@needs_cc
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


@needs_cc
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
    env = dict(os.environ, LONGCAT2_CACHE_DIR=str(tmp_path))
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


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,h,d", [(1, 4, 16), (37, 4, 16), (5, 3, 24), (40, 2, 8)])
def test_index_scores_equal_the_torch_scan_and_the_model(dtype: torch.dtype, t: int, h: int, d: int) -> None:
    """Several runs of keys (one of a single key, a partial last register tile), fp32 and bf16 keys."""
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
    ref = index_scan_torch(q, w, pieces, 50, s, torch.empty(t, s - 50))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    model = index_scores(q[None], w[None], k.float()[None])[0][:, 50:]
    torch.testing.assert_close(got, model, rtol=1e-5, atol=1e-5)
    out = torch.full((t, s - 50), float("nan"))
    assert native.index_scores(q, w, pieces, 50, s, out) is out  # into a caller's buffer (the workspace)
    torch.testing.assert_close(out, got, rtol=0, atol=0)


@needs_cc
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


@needs_cc
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
    (tmp_path / "tmp").mkdir()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"]
    assert list((tmp_path / "tmp").glob(f"longcat2-{os.getuid()}/native/lc2_*.so"))
