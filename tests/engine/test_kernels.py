"""Engine kernels against the model's reference semantics (selection, indexer scores, attention)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from longcat2.devices import cpu_has_bf16_gemm
from longcat2.engine import kernels, native
from longcat2.engine.kernels import (
    PER_ROW_MIN_MACS,
    dense_decode,
    dense_prefill,
    dense_prefill_flash,
    dense_prefill_onednn,
    dense_prefill_tiled,
    dense_rows,
    gather_attention,
    index_scan,
    index_scan_select_bf16,
    lsa_rows,
    run_attention,
    run_attention_segments,
    select_dynamic,
    window_attention,
)
from longcat2.model.lsa import force_and_mask, index_scores, select_topk, sparse_mla_attention


def _reference(
    scores_full: torch.Tensor, q_pos: torch.Tensor, topk: int, init: int, local: int
) -> torch.Tensor:
    masked = force_and_mask(scores_full[None], q_pos[None], init, local)[0]
    return select_topk(masked, topk)


@pytest.mark.parametrize("kind", ["random", "plateau", "ties"])
@pytest.mark.parametrize("topk,init,local", [(64, 4, 16), (32, 0, 0), (24, 8, 16), (40, 3, 0)])
def test_lsa_rows_equals_model_selection(kind: str, topk: int, init: int, local: int) -> None:
    g = torch.Generator().manual_seed(100 * ["random", "plateau", "ties"].index(kind) + topk)
    s, t = 300, 40
    if kind == "random":
        full = torch.randn(t, s, generator=g)
    elif kind == "plateau":  # ReLU plateaus: most scores exactly 0, a few positive
        full = torch.relu(torch.randn(t, s, generator=g) - 1.8)
    else:  # heavy exact ties everywhere
        full = torch.randint(0, 3, (t, s), generator=g).float()
    q_pos = torch.arange(s - t, s)
    ref = _reference(full, q_pos, topk, init, local)
    got = lsa_rows(full[:, init : s - local].contiguous(), q_pos, topk, init, local)
    assert torch.equal(got, ref)


def test_dense_rows_match_model_for_short_queries() -> None:
    full = torch.randn(10, 64)
    q_pos = torch.arange(20, 30)
    ref = _reference(full, q_pos, 64, 4, 16)
    assert torch.equal(dense_rows(q_pos, 64), ref)


def test_select_dynamic_tie_rule_prefers_larger_positions() -> None:
    row = torch.tensor([[5.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    assert select_dynamic(row, 3).tolist() == [[0, 3, 5]]


def test_index_scan_matches_model_scores() -> None:
    torch.manual_seed(1)
    t, h, d, s = 5, 4, 16, 1000
    q, w, k = torch.randn(t, h, d), torch.randn(t, h), torch.randn(s, d)
    ref = index_scores(q[None], w[None], k[None])[0]
    pieces = [(100, k[100:400]), (400, k[400:401]), (401, k[401:])]  # several runs
    got = index_scan(q, w, pieces, 100, s)
    torch.testing.assert_close(got, ref[:, 100:], rtol=1e-5, atol=1e-5)
    got1 = index_scan(q[:1], w[:1], [(0, k)], 0, s)
    torch.testing.assert_close(got1, ref[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native_on", [True, False])
def test_index_scan_rows_match_model_scores(native_on: bool) -> None:
    """Single-query rows with keys of their own (`index_scan_rows`, a decode step's rows of several
    sequences): each row's columns up to its own last key equal the model's scores of its keys, from one C
    call or from a PyTorch scan per row; rows of different lengths, several runs each."""
    if native_on and not native.available():
        pytest.skip("no compiled kernels here")
    torch.manual_seed(3)
    h, d = 32, 128
    lengths = [900, 400, 1000]
    q, w = torch.randn(3, h, d), torch.randn(3, h)
    keys = [torch.randn(n, d) for n in lengths]
    row_pieces = [[(10, k[10:300]), (300, k[300:301]), (301, k[301:])] for k in keys]
    with contextlib.nullcontext() if native_on else native.disabled():
        got = kernels.index_scan_rows(q, w, row_pieces, 10, max(lengths) - 10, workspace={})
    assert got.shape == (3, max(lengths) - 10)
    for i, k in enumerate(keys):
        ref = index_scores(q[None, i : i + 1], w[None, i : i + 1], k[None])[0][0, 10:]
        torch.testing.assert_close(got[i, : lengths[i] - 10], ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_scan_tiles_match_model_scores(
    monkeypatch: pytest.MonkeyPatch, native_on: bool, dtype: torch.dtype
) -> None:
    """The prefill scan's tiles (`index_scan_torch`, the path for wide indexer heads): keys widened
    SCAN_WIDEN_KEYS at a time (lowered here so a run spans several), dot products as GEMM tiles, the
    ReLU / weight / head sum as one C pass (`native.relu_wsum`) or as PyTorch ops; several runs, a
    one-key run and partial blocks; fp32 scores of bf16 values."""
    if native_on and not native.available():
        pytest.skip("no compiled kernels here")
    monkeypatch.setattr(kernels, "SCAN_WIDEN_KEYS", 512)
    torch.manual_seed(2)
    t, h, d, s = 40, 8, 64, 3000
    q, w, k = torch.randn(t, h, d).to(dtype), torch.randn(t, h), torch.randn(s, d).to(dtype)
    ref = index_scores(q[None].float(), w[None], k[None].float())[0]
    pieces = [(100, k[100:1400]), (1400, k[1400:1401]), (1401, k[1401:])]
    with contextlib.nullcontext() if native_on else native.disabled():
        got = kernels.index_scan_torch(q, w, pieces, 100, s, torch.empty(t, s - 100))
    torch.testing.assert_close(got, ref[:, 100:], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_prefill_scan_selects_exactly_the_fp32_set(seed: int) -> None:
    """Prefill rows through the certified two-pass scan (bf16 GEMM tiles, exact rescoring near each row's
    threshold): `lsa_rows` selects the same positions as on the exact fp32 scores, with the keys in
    shuffled pool blocks (several runs) and duplicated keys (exact ties at the boundary)."""
    if not native.available():
        pytest.skip("no compiled kernels here")
    g = torch.Generator().manual_seed(seed)
    t, h, d, init, local, kd, s, block = 24, 4, 32, 4, 16, 40, 900, 64
    topk = init + kd + local
    q_pos = torch.arange(s - t, s)
    end = s - 1 - local + 1
    keys = torch.randn(s, d, generator=g)
    keys[300:340] = keys[500:540]  # equal scores
    keys = keys.bfloat16()
    table = torch.randperm(-(-s // block), generator=g)  # position block → pool block
    pool = torch.zeros(len(table) * block, d, dtype=torch.bfloat16)
    for b, pb in enumerate(table.tolist()):
        pool[pb * block : pb * block + min(block, s - b * block)] = keys[b * block : (b + 1) * block]
    runs = []
    for a in range(init, end):  # one run per position block, clipped to [init, end)
        if a == init or a % block == 0:
            m = min(end, (a // block + 1) * block) - a
            runs.append((a, int(table[a // block]) * block + a % block, m))
    q = torch.randn(t, h, d, generator=g).bfloat16()
    w = torch.randn(t, h, generator=g)
    exact = index_scan(q, w, [(a, pool[r : r + m]) for a, r, m in runs], init, end)
    want = lsa_rows(exact.clone(), q_pos, topk, init, local)
    norm = float(keys.float().norm(dim=-1).max())
    got = kernels.index_scan_bf16_rows(q, w, pool, runs, q_pos, init, local, kd, norm)
    assert got is not None
    assert torch.equal(lsa_rows(got, q_pos, topk, init, local), want)
    one = kernels.index_scan_bf16_rows(q[-1:], w[-1:], pool, runs, q_pos[-1:], init, local, kd, norm)
    assert torch.equal(lsa_rows(one, q_pos[-1:], topk, init, local), want[-1:])  # a one-row chunk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_two_pass_scan_selects_exactly_the_fp32_set(seed: int) -> None:
    """bf16 GEMM scan + certified bounds + exact rescoring = the fp32 scan's selection (ties included)."""
    g = torch.Generator().manual_seed(seed)
    h, d, s, kd = 8, 64, 6000, 200
    q = torch.randn(h, d, generator=g).bfloat16()
    w = torch.randn(h, generator=g) * 0.1
    keys = torch.randn(s, d, generator=g).bfloat16()
    keys[1000:1100] = keys[2000:2100]  # exact duplicate keys → exact score ties
    norm = float(keys.float().norm(dim=-1).max())
    exact = index_scan(q[None], w[None], [(0, keys)], 0, s)  # fp32 reference of bf16 values
    ref = select_dynamic(exact, kd)[0]
    pieces = [(0, keys[:2500]), (2500, keys[2500:])]
    got = index_scan_select_bf16(q, w, pieces, 0, s, kd, norm)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("size", ["small", "large", "small-native", "large-native"])
@pytest.mark.parametrize("linear", ["blas", "onednn"])
def test_gather_attention_matches_model_sparse_core(
    linear: str, size: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Both fp32 scoring paths (bmm, and oneDNN per row where it is the faster fp32 GEMM: engine/cpu.py),
    both P·V paths (batched for small rows, one mm per row from PER_ROW_MIN_MACS on CPU), and with the C
    kernels where they are built: small rows read the keys in place (native.slot_attend), large fp32 rows
    too, in register tiles (native.slot_attention)."""
    if size.endswith("-native") and not native.available():
        pytest.skip("no compiled kernels here")
    with contextlib.ExitStack() as stack:
        if not size.endswith("-native"):
            stack.enter_context(native.disabled())
        _gather_attention_case(linear, size.removesuffix("-native"), monkeypatch, request)


def _gather_attention_case(
    linear: str, size: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    from longcat2.engine import cpu

    if linear == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN")
    monkeypatch.setenv("LONGCAT2_FP32_LINEAR", linear)
    cpu.fp32_linear_via_onednn.cache_clear()
    request.addfinalizer(cpu.fp32_linear_via_onednn.cache_clear)  # later tests measure again
    torch.manual_seed(2)
    r, h, c, rr, p, k = (6, 4, 32, 8, 200, 50) if size == "small" else (3, 16, 512, 8, 600, 256)
    assert (h * k * c >= PER_ROW_MIN_MACS) == (size == "large")
    ql, qr = torch.randn(r, h, c) * (32 / c) ** 0.5, torch.randn(r, h, rr)  # (scores of the same spread)
    tol = dict(rtol=1e-5, atol=1e-6 if size == "small" else 1e-5)  # (sums over 512 vs 32 latents)
    lat, rope = torch.randn(p, c), torch.randn(p, rr)
    slots = torch.randint(0, p, (r, k))
    slots[0, 40:] = -1
    ref = sparse_mla_attention(ql[None], qr[None], lat[None], rope[None], slots[None], 0.3)[0]
    pool = torch.cat([lat, rope], dim=-1)  # [P, c + r]: the cache's layout
    got = gather_attention(ql, qr, pool, slots, 0.3)
    torch.testing.assert_close(got, ref, **tol)
    got_chunked = gather_attention(ql, qr, pool, slots, 0.3, max_elems=k * (c + rr + h))
    ws: dict = {}  # reused gather buffers: same result, and again when the buffers are reused (2nd call)
    for _ in range(2):
        got_ws = gather_attention(ql, qr, pool, slots, 0.3, max_elems=k * (c + rr + h), workspace=ws)
        torch.testing.assert_close(got_ws, got_chunked, rtol=0, atol=0)
    assert ws or native.library() is not None  # (the C kernel uses no gather buffers)
    torch.testing.assert_close(got_chunked, ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows,query_block,size",
    [
        (37, 16, "small"),
        (5, 64, "small"),
        (6, 4, "large"),
        (37, 16, "small-native"),
        (6, 4, "large-native"),
        (9, 4, "small-empty"),
        (9, 4, "small-native-empty"),
        (6, 4, "large-native-empty"),
    ],
)
def test_window_attention_equals_gathered_selection(
    dtype: torch.dtype, rows: int, query_block: int, size: str
) -> None:
    """Consecutive LSA rows with the shared sink + local-window part: the same result as gathering each
    row's whole selection (sink, dynamic picks, local window), over a shuffled block table (windows cross
    blocks; partial last query block); the dynamic picks' P·V batched (small rows) and one product per row
    (from PER_ROW_MIN_MACS on), or with the C kernels: (small-native) the dynamic picks attended in place
    and merged with the window's softmax block, (large-native) their fp32 P·V as native.pv_rows; with the
    C kernels the softmax passes are one C pass (`native.softmax_window`). (-empty) some dynamic slots
    empty (-1), all of them in one row."""
    native_path = "-native" in size
    if native_path and not native.available():
        pytest.skip("no compiled kernels here")
    with contextlib.ExitStack() as stack:
        if not native_path:
            stack.enter_context(native.disabled())
        _window_case(dtype, rows, query_block, size.split("-")[0], empty="-empty" in size)


def _window_case(dtype: torch.dtype, rows: int, query_block: int, size: str, empty: bool = False) -> None:
    torch.manual_seed(4)
    h, c, rr, init, local, kd, p = 4, 32, 8, 4, 24, 20, 300
    if size == "large":
        h, c, kd, p = 16, 512, 260, 640
    assert (h * kd * c >= PER_ROW_MIN_MACS) == (size == "large")
    block = 16
    table = torch.randperm(p // block)  # position block → pool block
    pool_slots = lambda pos: table[pos // block] * block + pos % block  # noqa: E731
    kv_pool = torch.randn(p, c + rr).to(dtype)
    q_pos = torch.arange(p - 180, p - 180 + rows)
    sel = []
    for pos in q_pos.tolist():  # sink, kd distinct dynamic positions of [init, pos - local], window
        dyn = (torch.randperm(pos - local - init + 1)[:kd] + init).sort().values
        sel.append(torch.cat([torch.arange(init), dyn, torch.arange(pos - local + 1, pos + 1)]))
    sel = torch.stack(sel)  # [R, init + kd + local]
    ql, qr = torch.randn(rows, h, c).to(dtype), torch.randn(rows, h, rr).to(dtype)
    slots = pool_slots(sel)
    if empty:  # empty dynamic picks (-1) are left out of the softmax
        slots[0, init : init + 3] = -1
        slots[2, init : init + kd] = -1
    ref = gather_attention(ql, qr, kv_pool, slots, 0.2).float()
    dyn_slots = slots[:, init : init + kd]
    got = window_attention(ql, qr, kv_pool, q_pos, pool_slots, dyn_slots, init, local, 0.2, query_block)
    assert got.dtype == dtype and got.shape == (rows, h, c)
    f32 = 1e-5 if size == "small" else 1e-4  # 512-wide latents: longer fp32 sums, other order
    tol = dict(rtol=f32, atol=f32) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), ref, **tol)


@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,cuts", [(1, [130]), (5, [64, 100]), (3, []), (2, [40, 41, 120])])
def test_run_attention_in_place_matches_gathered_causal_rows(
    t: int, cuts: list[int], dtype: torch.dtype, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """T queries at positions start.. over runs of a [P, c + r] pool (read in place, split at the pool
    discontinuity and at `cuts`, a one-key run among them) equal the gather kernel over each query's
    visible slots (causal rows); two paths: the C kernel that reads each key once
    (`run_attention_segments` → native.run_attend_pool) and torch's GEMMs (`run_attention`)."""
    if path == "fused" and not native.available():
        pytest.skip("no compiled kernels here")
    calls = []
    plain = native.run_attend_pool
    monkeypatch.setattr(native, "run_attend_pool", lambda *a, **k: calls.append(1) or plain(*a, **k))
    torch.manual_seed(4)
    h, c, rr, start = 4, 32, 8, 150
    s = start + t
    half = s // 2
    pool = torch.randn(400, c + rr).to(dtype)
    rows = torch.cat([torch.arange(20, 20 + half), torch.arange(250, 250 + s - half)])  # [S] pool rows
    visible = dense_rows(torch.arange(start, s), s)  # [T, S] positions, -1 = future
    slots = torch.where(visible >= 0, rows[visible.clamp(min=0)], -1)
    ql, qr = torch.randn(t, h, c).to(dtype), torch.randn(t, h, rr).to(dtype)
    ref = gather_attention(ql.float(), qr.float(), pool.float(), slots, 0.3)
    bounds = sorted({0, half, *cuts, s})
    runs = [(int(rows[a]), b - a) for a, b in zip(bounds, bounds[1:])]  # (first pool row, count)
    out = torch.empty(t * h, c, dtype=dtype)
    q = torch.cat([ql, qr], dim=-1).view(t * h, -1)
    q_before = q.clone()
    if path == "fused":
        run_attention_segments((q.float() * 0.3).to(dtype), pool, [(0, t, start, runs)], out)
    else:
        pieces = [(pool.t()[:, r : r + m], pool[r : r + m, :c]) for r, m in runs]
        run_attention(q, pieces, t, start, 0.3, out)
    assert bool(calls) is (path == "fused")
    assert torch.equal(q, q_before)  # (the scale is not applied to the caller's queries in place)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.view(t, h, c).float(), ref, **tol)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_run_attention_segments_in_one_call_match_per_sequence(
    dtype: torch.dtype, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's sequences (decode rows, a 3-query chunk, runs split across the pool, a one-key sequence)
    through one native call equal `run_attention` per sequence through torch; with 2 threads the sequences
    are split between them, each with its own scratch."""
    if not native.available():
        pytest.skip("no compiled kernels here")
    calls = []
    plain = native.run_attend_pool
    monkeypatch.setattr(native, "run_attend_pool", lambda *a, **k: calls.append(1) or plain(*a, **k))
    torch.manual_seed(5)
    h, c, rr = 4, 32, 8
    pool = torch.randn(600, c + rr).to(dtype)
    segs = [  # (row offset, T, start, runs): positions 0 .. start+T-1
        (0, 1, 9, [(10, 10)]),
        (1, 3, 40, [(100, 20), (300, 23)]),
        (4, 1, 0, [(500, 1)]),
        (5, 1, 70, [(200, 30), (30, 41)]),
    ]
    q = (torch.randn(6 * h, c + rr) * 0.5).to(dtype)
    out, ref = torch.empty(6 * h, c, dtype=dtype), torch.empty(6 * h, c, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_attention_segments(q, pool, segs, out)
    finally:
        torch.set_num_threads(before)
    assert calls
    with native.disabled():
        run_attention_segments(q, pool, segs, ref)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def test_dense_decode_online_softmax_matches_full_softmax() -> None:
    torch.manual_seed(3)
    h, c, rr, s = 4, 32, 8, 1000
    ql, qr = torch.randn(h, c), torch.randn(h, rr)
    lat, rope = torch.randn(s, c), torch.randn(s, rr)
    ref = gather_attention(ql[None], qr[None], torch.cat([lat, rope], -1), torch.arange(s)[None], 0.2)[0]
    pieces = [(lat[:300], rope[:300]), (lat[300:], rope[300:])]
    got = dense_decode(ql, qr, pieces, 0.2, block=128)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("start", [0, 37])
def test_dense_prefill_matches_sdpa(start: int) -> None:
    torch.manual_seed(4)
    t, h, qk, dv = 20, 3, 12, 8
    s = start + t
    q, k, v = torch.randn(t, h, qk), torch.randn(s, h, qk), torch.randn(s, h, dv)
    mask = torch.arange(s)[None, :] <= torch.arange(start, s)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=0.3
    ).transpose(0, 1)
    got = dense_prefill(q, k, v, start, 0.3, max_elems=h * s * 7)  # several query chunks
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", ["tiled", "flash", "onednn", "onednn-torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start,t,key_block,query_block", [(0, 50, 16, 8), (37, 20, 8, 16), (70, 33, 32, 7)])
def test_dense_prefill_from_latents_matches_plain(
    kernel: str, dtype: torch.dtype, start: int, t: int, key_block: int, query_block: int
) -> None:
    """The latent kernels against the plain expanded path: the tiled one (keys expanded per block, online
    softmax; blocks straddling the diagonal, partial last blocks, query blocks skipped for early keys) and
    the CPU flash one (key blocks before the chunk merged by log-sum-exp, the chunk itself causal), and the
    per-head oneDNN one (tiles trimmed at the diagonal and split in halves there, query blocks skipped for
    early keys) with its softmax step in C (`native.softmax_tile`, where built) and as PyTorch ops."""
    if kernel == "onednn" and not native.available():
        pytest.skip("no compiled kernels here")
    torch.manual_seed(5)
    h, nope, r, dv, c = 3, 12, 4, 8, 16
    s = start + t
    q_nope, q_rope = torch.randn(t, h, nope, dtype=dtype), torch.randn(t, h, r, dtype=dtype)
    lat, rope = torch.randn(s, c, dtype=dtype), torch.randn(s, r, dtype=dtype)
    w_kv = (torch.randn(h * (nope + dv), c) / c**0.5).to(dtype)
    kv = (lat @ w_kv.t()).view(s, h, nope + dv)
    k = torch.cat([kv[..., :nope], rope[:, None].expand(s, h, r)], dim=-1)
    q = torch.cat([q_nope, q_rope], dim=-1)
    ref = dense_prefill(q.float(), k.float(), kv[..., nope:].float(), start, 0.3)
    if kernel == "tiled":
        got = dense_prefill_tiled(
            q_nope, q_rope, lat, rope, lambda x: x @ w_kv.t(), start, 0.3, key_block, query_block
        )
    elif kernel.startswith("onednn"):
        if not torch.backends.mkldnn.is_available() or (dtype == torch.bfloat16 and not cpu_has_bf16_gemm()):
            pytest.skip("no oneDNN kernel for this dtype on this CPU")
        ws: dict = {}  # reused buffers: the same result on the second call
        with native.disabled() if kernel == "onednn-torch" else contextlib.nullcontext():
            other = dense_prefill_onednn(
                -q_nope, q_rope, lat, rope, lambda x: x @ w_kv.t(), start, 0.3, key_block, query_block, ws
            )
            kept = other.clone()
            for _ in range(2):
                got = dense_prefill_onednn(
                    q_nope, q_rope, lat, rope, lambda x: x @ w_kv.t(), start, 0.3, key_block, query_block, ws
                )
        assert ws
        assert torch.equal(other, kept)  # a result is never a view of the reused buffers
    else:
        got = dense_prefill_flash(q_nope, q_rope, lat, rope, lambda x: x @ w_kv.t(), start, 0.3, key_block)
    assert got.dtype == dtype and got.shape == (t, h, dv)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), ref, **tol)
