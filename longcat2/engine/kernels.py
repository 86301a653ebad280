"""Attention and indexer kernels of the inference engine (plain PyTorch ops on cached tensors).

Design choices:
- Semantics are the model's (`longcat2.model.lsa`): score I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s]) in
  fp32; sink positions s < init and local positions q - local < s <= q forced into the top-k budget; ties at
  the boundary go to the larger position; indices sorted ascending, -1 for empty slots.
- Selection without masking passes: for a query that sees more than `topk` keys the forced tokens are
  disjoint and always in, so only the *dynamic* region [init, q - local] is scored and a top-(topk - init -
  local) is taken there. One `topk(kd + 1)` both selects and proves there is no tie at the boundary
  (value kd > value kd+1); only rows with a boundary tie take the exact slow path. This is the same set the
  model's +inf/-inf masking and tie procedure produce, at the cost of one top-k. On CPU the same rule runs
  as a sampled threshold + radix select in C where a compiler is present (`native.select_topk`: 7x
  `torch.topk` + sort on the embedded model's indexer scores at 20K keys, tie rule included, no sort and
  no masking pass).
- Indexer scan: keys are read in place from the pool's contiguous runs, in blocks sized to keep the
  [block, T*h] dot-product tile in L2 (scoring a long context in one GEMM would spill a T*h-times larger
  intermediate to memory). Keys are promoted to fp32 per block, so bf16 keys give the fp32 reference
  scores of bf16 values. The dot products go through oneDNN where it is the faster fp32 GEMM
  (engine/cpu.py; both operands are contiguous here).
- bf16 two-pass scan (decode, bf16 queries and keys): the dot products run as one bf16 GEMM (AMX on CPUs
  that have it) whose outputs are rounded to bf16; with |round(x) - x| <= 2^-9 |x|, |q_h·k| <= |q_h| |k|
  and the cache's running max key norm, every approximate score is within a certified δ of the exact
  one. Keys within 2δ of the kd-th best approximate score are the only ones that can be selected; they
  (a few % of the context) are rescored exactly in fp32 and selected with the exact rule. Result: the same
  indices as the fp32 scan, at bf16 GEMM speed plus a small rescoring set. Prefill rows use the same
  certificate with a per-key bound (`index_scan_bf16_rows`): approximate [rows, keys] scores and their
  error bounds from bf16 GEMM tiles, each row's kd best by the C top-k, every key whose interval reaches
  the lowest of theirs rescored exactly in place, and `lsa_rows` then selects on those scores what it
  would on the exact ones. There the GEMMs are compute-bound and bf16 runs them at ~2x fp32.
- Dense decode over a long context (models without LSA, and the dense baseline of the benchmarks) runs the
  absorbed form over the contiguous runs with an online softmax in blocks, so no [h, S] tensor and no copy
  of the latents are made.
- Dense prefill (expanded form), three kernels over the same latents: (1) on CPU, a tiled online softmax
  whose two products per tile are one oneDNN GEMM per head (`dense_prefill_onednn`: keys expanded per
  block into per-head contiguous K and V^T, the operand layout oneDNN's fast kernels take; in fp32 on
  AMD CPUs, where MKL skips its AVX-512 kernels, 1.8-2x PyTorch's flash op; in bf16 on CPUs with native
  bf16 GEMMs a little faster than (3)); (2) PyTorch's fused CPU flash-attention op (key blocks merged
  by their log-sum-exps; V zero-padded to the QK head size, which the op requires), for fp32 where
  oneDNN is not the faster GEMM (its bf16 path runs at its fp32 rate); (3) elsewhere, a tiled online
  softmax with one batched GEMM over the heads per tile. Online softmaxes use exp2 on log2-scaled scores
  (see LOG2E). In (1) and in the windowed LSA rows below, the softmax between the two GEMMs is one C
  pass over the scores in place where compiled (`native.softmax_tile` / `softmax_window`): as PyTorch
  ops it was an upcast, a mask, max, subtract, exp2, sum and a downcast, which in bf16 cost about as
  much as the GEMMs themselves.
- LSA prefill rows (`window_attention`): a row's selection is its sink, its dynamic picks and its local
  window, and consecutive rows share almost all of the sink + window part. Per block of 64 rows that part
  (init + local + 63 keys) is gathered once and attended as one big score GEMM and one P·V GEMM over a
  transposed copy of its latents, each row's band masked (+6 % FLOPs at LongCat-2.0's 16 + 1,024); only
  the dynamic picks (~half of index_topk) take the per-row gathered products below. One softmax over both
  parts. 1.2-1.3x the all-gathered form in fp32 at LongCat-2.0 dims (equal in bf16).
- Sparse rows gather from the cache's joint [latent | rope] pool: one gather, one score GEMM over c + r.
  On CPU the products of large rows run one row at a time: the scores through oneDNN (fp32, where it
  beats the BLAS), P·V as one `mm` per row, which ran 1.15x (fp32, MKL) and 1.19x (bf16, oneDNN) the
  batched `bmm` at LongCat-2.0 dims (12 rows x 64 heads x 2,048 keys x 512, one thread). P·V cannot go
  through `onednn_linear` at its rate: the latents are its K-strided operand, and a transposed copy
  per row costs as much as the GEMM saves. In fp32 the compiled `native.pv_rows` takes it where built
  (1.5-1.7x the per-row `mm`).
- Compiled C kernels (`native`) take, on CPU where a compiler is present, the non-GEMM parts of LSA (the
  selection, the indexer scan for narrow heads and for a decode step's few rows, sparse rows' attention
  read in place from the pool) and a decode step's few-row products (`absorb` / `unabsorb`, the attention
  over cached runs). Each keeps its PyTorch path here (the tests compare them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from longcat2.devices import cpu_has_bf16_gemm
from longcat2.engine import native
from longcat2.engine.cpu import fp32_linear_via_onednn, mm_nt, onednn_linear, onednn_worth
from longcat2.model.attention import MLA

NEG_INF = float("-inf")
# Online softmaxes here work in log2 units (scores x log2(e), then exp2): on CPU, torch.exp of arguments
# below ~-87 (results that underflow fp32, common once scores span a wide range) is ~10x slower than on
# normal arguments (measured 16 vs 1.7 ms on 2M fp32 elements, x86-64 AVX-512), while exp2 is not.
LOG2E = 1.4426950408889634

# L2-sized tile for the indexer scan: rows * T * h fp32 elements per dot-product block; at most SCAN_ROWS
# query-head rows per tile in prefill.
SCAN_TILE_ELEMS = 1 << 18
SCAN_ROWS = 256
# keys widened to fp32 at once by the prefill scan (8 MB at d = 128), reused by every row chunk
SCAN_WIDEN_KEYS = 16384
# keys per product of a decode row's scan: one shape, so oneDNN reuses its primitive
DECODE_SCAN_BLOCK = 2048
# keys per kv_b_proj call when the dense prefill expands latents: the [rows, h*(nope+v)] product stays small
# enough for the allocator to reuse (at LongCat-2.0 dims 256 rows = 16 MB; fresh blocks of hundreds of MB
# pay page faults on every call)
EXPAND_ROWS = 256
# gathered rows' P·V products of at least this many multiply-adds run as one mm per row on CPU (module doc)
PER_ROW_MIN_MACS = 1 << 21


def dense_rows(q_pos: torch.Tensor, width: int) -> torch.Tensor:
    """Selection for queries that see <= width keys: all visible positions, ascending, -1 padded.
    q_pos [T] → [T, width]."""
    ar = torch.arange(width, device=q_pos.device)
    return ar.expand(q_pos.shape[0], width).masked_fill(ar[None, :] > q_pos[:, None], -1)


# ---------------------------------------------------------------------- indexer scan
def index_scan(
    q: torch.Tensor,
    w: torch.Tensor,
    pieces: list[tuple[int, torch.Tensor]],
    start: int,
    end: int,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Exact fp32 indexer scores of keys at positions [start, end).

    q [T, h, d] (any float dtype), w [T, h] fp32 (scale folded in), pieces = [(first position, keys [n, d])]
    covering [start, end) in order (views into the pool). → scores [T, end - start] fp32 (with
    `workspace`, a view of a buffer kept there: a fresh one of tens of MB per chunk pays its page faults
    on every call, 1.7 s of the embedded model's 29K-token prefill)."""
    t, _, d = q.shape
    out = _scratch(workspace, "index_scores", q.new_empty(0, dtype=torch.float32), (t, end - start))
    # C: narrow heads (1.6x GEMM + ReLU/weight/sum passes at the embedded model's 4 x 16), or a decode
    # step's rows (1.5x oneDNN at 32 x 128, cold keys); wide heads at prefill take oneDNN's GEMM
    if (d <= native.SCAN_MAX_DIM or t <= native.WIDE_SCAN_MAX_ROWS) and native.index_scores(
        q, w, pieces, start, end, out
    ) is not None:
        return out
    return index_scan_torch(q, w, pieces, start, end, out, workspace)


def index_scan_rows(
    q: torch.Tensor,
    w: torch.Tensor,
    row_pieces: list[list[tuple[int, torch.Tensor]]],
    start: int,
    width: int,
    workspace: dict | None = None,
) -> torch.Tensor:
    """`index_scan` for R single-query rows with keys of their own (a decode step's rows of several
    sequences): q [R, h, d], w [R, h], row i's pieces cover positions [start, start + n_i) with n_i <=
    width. → scores [R, width] fp32; row i's columns from n_i on are unspecified (a top-k bounded by each
    row's last candidate never reads them). One C call for all rows where it applies (per-row calls paid
    their Python and dispatch cost 32 times per step at batch 32), else `index_scan_torch` row by row."""
    out = _scratch(workspace, "index_scores_rows", q.new_empty(0, dtype=torch.float32), (q.shape[0], width))
    if native.index_scores_rows(q, w, row_pieces, start, out) is not None:
        return out
    for i, pieces in enumerate(row_pieces):
        end = pieces[-1][0] + pieces[-1][1].shape[0] if pieces else start
        index_scan_torch(
            q[i : i + 1], w[i : i + 1], pieces, start, end, out[i : i + 1, : end - start], workspace
        )
    return out


def index_scan_torch(
    q: torch.Tensor,
    w: torch.Tensor,
    pieces: list[tuple[int, torch.Tensor]],
    start: int,
    end: int,
    out: torch.Tensor,
    workspace: dict | None = None,
    bf16_dots: bool = False,
    err: torch.Tensor | None = None,
) -> torch.Tensor:
    """`index_scan` in PyTorch ops, into out [T, end - start] fp32 (the reference for
    `native.index_scores`, and the path on other devices and for wide indexer heads). Low-precision keys
    are widened block by block into one buffer (kept in `workspace` when given: a fresh one per block
    paid its page faults every time, 6.5 of a 44 ms bf16 decode step at batch 8). `bf16_dots` (bf16 q and
    keys, several queries): the dot products as bf16 GEMMs with bf16-rounded outputs instead, i.e. the
    approximate scores of the certified two-pass scan (`index_scan_bf16_rows`), with err (out's shape)
    receiving Σ_h |w_h| |dot_h| per row and key when given."""
    t, h, d = q.shape
    qf = (q if bf16_dots else q.float()).reshape(t * h, d)  # [T*h, d]
    blk = max(256, SCAN_TILE_ELEMS // (t * h))

    def widened(keys: torch.Tensor, b0: int, n_max: int) -> torch.Tensor:  # keys[b0 : b0 + n_max] in fp32
        kb = keys[b0 : b0 + n_max]
        if kb.dtype == torch.float32 or bf16_dots:
            return kb
        return _scratch(workspace, "scan_keys", qf, (n_max, d))[: kb.shape[0]].copy_(kb)

    decode_row = t == 1 and not bf16_dots
    if decode_row:  # fixed-size blocks: oneDNN builds a primitive per new shape, ~0.5 ms each, and
        # a piece's length is new every step; the last, partial block takes the BLAS, which builds none
        w1 = w.reshape(h).float()
        blk = DECODE_SCAN_BLOCK
        for pos, keys in pieces:
            for b0 in range(0, keys.shape[0], blk):
                kb = widened(keys, b0, blk)  # [n, d]
                dots = mm_nt(kb, qf) if kb.shape[0] == blk else kb @ qf.t()  # [n, h]
                dots.relu_()
                o = pos - start + b0
                torch.mv(dots, w1, out=out[0, o : o + kb.shape[0]])
        return out
    # several queries (prefill): tiles of [rows*h, blk] dot products, rows*h <= SCAN_ROWS so the tile stays
    # in L2; keys are re-read per row chunk (they are d-wide, the tile is rows*h-wide), widened once per
    # SCAN_WIDEN_KEYS (not once per row chunk and block: 16 GB of copies per 4,096-row chunk at 64K)
    rc = max(1, SCAN_ROWS // h)
    blk = max(256, SCAN_TILE_ELEMS // (min(t, rc) * h))
    wide = max(1, SCAN_WIDEN_KEYS // blk) * blk
    wf = w.float()
    for pos, keys in pieces:
        for s0 in range(0, keys.shape[0], wide):
            kw = widened(keys, s0, wide)  # [<= wide, d] fp32
            for r0 in range(0, t, rc):
                n_rows = min(rc, t - r0)
                qr = qf[r0 * h : (r0 + n_rows) * h]  # [rows*h, d]
                wr = wf[r0 : r0 + n_rows]  # [rows, h]
                for b0 in range(0, kw.shape[0], blk):
                    kb = kw[b0 : b0 + blk]  # [n, d]
                    dots = mm_nt(qr, kb).view(n_rows, h, kb.shape[0])  # [rows, h, n]
                    o = pos - start + s0 + b0
                    dst = out[r0 : r0 + n_rows, o : o + kb.shape[0]]  # [rows, n]
                    e_dst = None if err is None else err[r0 : r0 + n_rows, o : o + kb.shape[0]]
                    if not native.relu_wsum(dots, wr, dst, e_dst):  # (C: one pass over the tile)
                        if e_dst is not None:
                            e_dst.copy_((dots.float().abs() * wr.abs()[:, :, None]).sum(1))
                        dst.copy_(dots.float().relu_().mul_(wr[:, :, None]).sum(1))
    return out


# ---------------------------------------------------------------------- selection
def _tie_select(row: torch.Tensor, kd: int) -> torch.Tensor:
    """Exact rule on one row [R]: the kd largest scores, ties at the boundary to larger positions.
    → column indices [kd] (any order)."""
    kth = row.topk(kd).values[-1]
    greater = (row > kth).nonzero().squeeze(-1)
    need = kd - greater.numel()
    equal = (row == kth).nonzero().squeeze(-1)
    return torch.cat([greater, equal[equal.numel() - need :]])


def select_dynamic(scores: torch.Tensor, kd: int) -> torch.Tensor:
    """scores [T, R] (every row has more than kd finite entries; -inf = not a candidate) → columns of
    the kd selected keys per row [T, kd], ascending."""
    picked = native.select_topk(scores, kd)  # the same rule in C, where it applies (kd > 0, CPU fp32)
    return picked if picked is not None else select_dynamic_torch(scores, kd)


def select_dynamic_torch(scores: torch.Tensor, kd: int) -> torch.Tensor:
    """`select_dynamic` in PyTorch ops (the reference for `native.select_topk`, and the path on other
    devices)."""
    t, r = scores.shape
    if kd <= 0:
        return scores.new_zeros(t, 0, dtype=torch.long)
    vals, idx = scores.topk(min(kd + 1, r), dim=-1)  # [T, kd+1], descending
    idx = idx[:, :kd]
    if r > kd:
        tied = (vals[:, kd - 1] == vals[:, kd]).nonzero().squeeze(-1)
        if tied.numel():
            idx = idx.clone()
            for i in tied.tolist():
                idx[i] = _tie_select(scores[i], kd)
    return idx.sort(dim=-1).values


def lsa_rows(scores: torch.Tensor, q_pos: torch.Tensor, topk: int, init: int, local: int) -> torch.Tensor:
    """Selection for queries that see more than `topk` keys.

    scores [T, R]: exact scores of key positions init .. init + R - 1 (the dynamic region of the row with
    the largest q_pos; the PyTorch path overwrites non-candidates with -inf); q_pos [T], every q_pos >=
    topk (one segment's rows, ascending, or the decode rows of several segments). Column j is a candidate
    of row i iff init + j <= q_pos[i] - local. → positions [T, topk] ascending."""
    t, r = scores.shape
    kd = topk - init - local
    limit = q_pos - local - init  # last candidate column per row
    dyn = native.select_topk(scores, kd, limit)  # C: candidates bounded by `limit`, no masking pass
    if dyn is None:
        dyn = _masked_select(scores, limit, kd)
    dyn = dyn + init
    sink = torch.arange(init, device=scores.device).expand(t, init)
    loc = q_pos[:, None] - local + 1 + torch.arange(local, device=scores.device)
    return torch.cat([sink, dyn, loc], dim=1)


def _masked_select(scores: torch.Tensor, limit: torch.Tensor, kd: int) -> torch.Tensor:
    """Columns > limit[i] of row i become -inf, then `select_dynamic_torch`."""
    r = scores.shape[1]
    first_masked = int(limit.min()) + 1
    if first_masked < r:  # only the tail columns differ between rows (masked in place)
        cols = torch.arange(first_masked, r, device=scores.device)
        scores[:, first_masked:].masked_fill_(cols[None, :] > limit[:, None], NEG_INF)
    return select_dynamic_torch(scores, kd)


# ---------------------------------------------------------------------- bf16 two-pass decode scan
BF16_ROUND = 2.0**-8  # 2x the bf16 round-to-nearest bound 2^-9 (margin)


def _scan_mass(q: torch.Tensor, w: torch.Tensor, key_max_norm: float) -> torch.Tensor:
    """Σ_h |w_h| ||q_h|| · key_max_norm >= Σ_h |w_h| |q_h·k| for every key: q [..., h, d], w [..., h] → [...]."""
    return (w.float().abs() * q.float().norm(dim=-1)).sum(-1) * key_max_norm


def _accumulation_bound(d: int, h: int) -> float:
    """Relative bound of fp32 accumulation-order terms over d products and h heads, 2x margin."""
    return (d + h) * 2.0**-22


def bf16_scan_bound(q: torch.Tensor, w: torch.Tensor, key_max_norm: float) -> float:
    """δ with |approx - exact| <= δ for every key of L2 norm <= key_max_norm (see index_scan_select_bf16):
    per head |bf16(r) - r| <= 2^-9 |r| <= 2^-9 ||q_h|| ||k||, plus fp32 accumulation-order terms
    (d + h)·2^-23 of the same magnitude; 2x margin on all of it."""
    h, d = q.shape
    mass = float(_scan_mass(q, w.reshape(h), key_max_norm))
    return (BF16_ROUND + _accumulation_bound(d, h)) * mass


def index_scan_bf16_rows(
    q: torch.Tensor,
    w: torch.Tensor,
    pool: torch.Tensor,
    runs: list[tuple[int, int, int]],
    q_pos: torch.Tensor,
    init: int,
    local: int,
    kd: int,
    key_max_norm: float,
    workspace: dict | None = None,
) -> torch.Tensor | None:
    """Prefill rows' scores for `lsa_rows` by the certified two-pass scan: the same selection as the exact
    fp32 scan, with its GEMMs in bf16.

    q [T, h, d] bf16, w [T, h] fp32, pool [P, d] bf16 index keys, runs [(first position, pool row, count)]
    covering positions [init, q_pos[-1] - local + 1) in order (the dynamic region of the last row), q_pos
    [T] ascending, key_max_norm >= every key's L2 norm. Pass 1 (bf16 GEMM tiles, one C pass per tile):
    approximate scores a = Σ_h w_h ReLU(bf16(q_h·k)) and e = Σ_h |w_h| |bf16(q_h·k)| per row and key.
    With |bf16(r) - r| <= 2^-9 |r| and fp32 accumulation-order terms bounded through key_max_norm, the
    exact score x satisfies |a - x| <= ε = 2^-9 (1 + 2^-8) e + τ_t (2x margin on τ; per key, so ~10x
    tighter than `bf16_scan_bound`'s Cauchy-Schwarz bound). S = each row's kd best a among its
    candidates (C top-k), L = min over S of (a - ε). A key with a + ε < L has x < L <= the exact score of
    each of the kd keys in S, so it cannot be selected; every other candidate (S included) is rescored
    exactly (fp32 of bf16 values) in place. The keys left approximate hold a < L, below those kd exact
    scores as well, so `lsa_rows` on the result selects what it selects on the exact scores, ties
    included (the rescored values are fp32 sums of the same products as the fp32 scan's, in another
    order, as any two fp32 scans differ). → scores [T, R] fp32 (a workspace view when given), or None
    where the C kernels do not serve (the caller scans exactly)."""
    if native.library() is None or q.device.type != "cpu":  # (the C top-k picks the thresholds)
        return None
    t, h, d = q.shape
    end = int(q_pos[-1]) - local + 1
    f32 = q.new_empty(0, dtype=torch.float32)
    scores = _scratch(workspace, "index_scores", f32, (t, end - init))
    err = _scratch(workspace, "index_err", f32, (t, end - init))
    pieces = [(a, pool[r : r + m]) for a, r, m in runs]
    index_scan_torch(q, w, pieces, init, end, scores, workspace, bf16_dots=True, err=err)
    limit = q_pos - local - init  # last candidate column per row
    picked = native.select_topk(scores, kd, limit)
    if picked is None:
        return None
    tau = _accumulation_bound(d, h) * _scan_mass(q, w, key_max_norm) + 1e-30  # [T]
    err.mul_(BF16_ROUND / 2 * (1 + 2.0**-8)).add_(tau[:, None])  # ε [T, R]
    low = (scores.gather(1, picked) - err.gather(1, picked)).amin(dim=1)  # L [T]
    cand = torch.ge(  # [T, R]: a + ε >= L
        err.add_(scores),
        low[:, None],
        out=_scratch(workspace, "index_cand", err.new_empty(0, dtype=torch.bool), err.shape),
    )
    pool_row = torch.cat([torch.arange(r, r + m, device=pool.device) for _, r, m in runs])  # [R] per column
    # the marked keys' exact scores (fp32 of bf16 values, as the fp32 scan computes them), in place
    return scores if native.rescore(q, w, pool, pool_row, cand, limit, scores) else None


def index_scan_select_bf16(
    q: torch.Tensor,
    w: torch.Tensor,
    pieces: list[tuple[int, torch.Tensor]],
    start: int,
    end: int,
    kd: int,
    key_max_norm: float,
) -> torch.Tensor:
    """One decode query: the kd best keys of positions [start, end) under the exact fp32 rule, found with a
    bf16 GEMM scan plus exact rescoring of the keys whose certified interval reaches the threshold.

    q [h, d] bf16 (exactly representable: a bf16 model's indexer query), w [h] fp32, pieces of bf16 keys,
    key_max_norm >= every key's L2 norm. Approximate score a = Σ_h w_h ReLU(bf16(q_h·k)) (bf16 GEMM with
    fp32 accumulation, rounded output), |a - exact| <= δ for all keys; keys with a >= a_(kd) - 2δ are the
    only ones whose exact score can reach the kd-th largest exact score (ties included); they are rescored
    in fp32. → selected positions [kd], ascending."""
    h, d = q.shape
    n = end - start
    approx = torch.empty(n, dtype=torch.float32, device=q.device)
    w1 = w.reshape(h).float()
    qt = q.t().contiguous()  # [d, h]
    blk = max(1024, SCAN_TILE_ELEMS // h)
    for pos, keys in pieces:
        for b0 in range(0, keys.shape[0], blk):
            kb = keys[b0 : b0 + blk]
            dots = (kb @ qt).float()  # [m, h]: bf16 GEMM, bf16-rounded outputs
            dots.relu_()
            o = pos - start + b0
            torch.mv(dots, w1, out=approx[o : o + kb.shape[0]])
    delta = bf16_scan_bound(q, w1, key_max_norm)
    kth = approx.topk(kd).values[-1]
    cand = (approx >= kth - 2 * delta).nonzero().squeeze(-1)  # [M] the only keys that can be selected
    keys_c = _gather_positions(pieces, start, cand + start).float()  # [M, d]
    exact = torch.relu(keys_c @ q.float().t()) @ w1  # [M] fp32 of bf16 values, as the reference computes
    sel = select_dynamic(exact[None], kd)[0]
    return (cand[sel] + start).sort().values


def _gather_positions(
    pieces: list[tuple[int, torch.Tensor]], start: int, positions: torch.Tensor
) -> torch.Tensor:
    if len(pieces) == 1:
        pos0, keys = pieces[0]
        return keys[positions - pos0]
    out = []
    for pos0, keys in pieces:
        m = (positions >= pos0) & (positions < pos0 + keys.shape[0])
        out.append(keys[positions[m] - pos0])
    return torch.cat(out)


# ---------------------------------------------------------------------- absorbed form: in and out
def _absorbed_form(mla: MLA, x: torch.Tensor, fast: Callable, model_op: Callable) -> torch.Tensor:
    """fast(x, kv_b_proj's weight, nope, v) where it applies (no gradient needed, the C kernel takes it),
    else the model's own op."""
    w = mla.kv_b_proj.weight
    if not (torch.is_grad_enabled() and w.requires_grad):
        out = fast(x, w, mla.nope, mla.v_dim)
        if out is not None:
            return out
    return model_op(x)


def absorb(mla: MLA, q_nope: torch.Tensor) -> torch.Tensor:
    """`MLA.absorb` of q_nope [T, h, nope]; a few (decode) rows on CPU read W_uk in place from kv_b_proj's
    weight (`native.absorb`: no per-head copies, the weight streamed once)."""
    return _absorbed_form(mla, q_nope, native.absorb, mla.absorb)


def unabsorb(mla: MLA, o_latent: torch.Tensor) -> torch.Tensor:
    """`MLA.unabsorb` of attended latents [T, h, c] → [T, h*v]; a few rows on CPU through
    `native.unabsorb`."""
    return _absorbed_form(mla, o_latent, native.unabsorb, mla.unabsorb)


# ---------------------------------------------------------------------- attention over explicit slots
def gather_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_pool: torch.Tensor,
    slots: torch.Tensor,
    scale: float,
    max_elems: int = 1 << 24,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Absorbed MLA of R queries over their own K cached keys (the model's `sparse_mla_attention` on the
    pool, with one `index_select` gather and batched GEMMs).

    q_latent [R, h, c], q_rope [R, h, r], kv_pool [P, c + r] (latent | rope key per slot: the cache's
    layout), slots [R, K] (-1 = empty) → attended latent [R, h, c]. The latent and rope queries are joined
    (and, in fp32, scaled) once, so each chunk of rows is one gather, one score GEMM over c + r, a softmax
    and one output GEMM. `workspace` (a dict the caller keeps across steps): the gathered keys and the
    score / probability tiles live in buffers kept there instead of fresh allocations — a few MB per
    sublayer and step otherwise pay page faults on a new mmap'd buffer every time (measured ~2x the copy
    itself for the gather)."""
    rows, k = slots.shape
    h, c = q_latent.shape[1:]
    dt = kv_pool.dtype
    q = torch.cat([q_latent.to(dt), q_rope.to(dt)], dim=-1)  # [R, h, c + r]
    if h * k * c < PER_ROW_MIN_MACS:  # small rows on CPU: the C kernel reads the keys in place
        fused = native.slot_attend(q, kv_pool, slots, c, scale * LOG2E)
        if fused is not None:
            o, _, l_sum = fused
            return o.div_(l_sum[..., None]).to(dt)
    elif dt == torch.float32:  # large fp32 rows on CPU: register-tiled C, keys read in place (1.3x)
        o = native.slot_attention(q, kv_pool, slots, c, scale * LOG2E)
        if o is not None:
            return o
    score_scale = scale
    if dt == torch.float32:
        q.mul_(scale)  # scale folded into the queries: no pass over the scores
        score_scale = 1.0
    out = q_latent.new_empty(rows, h, c, dtype=dt)
    chunk = max(1, max_elems // max(1, k * (kv_pool.shape[1] + h)))
    for s0 in range(0, rows, chunk):
        s1 = min(rows, s0 + chunk)
        kv, invalid = gather_rows(kv_pool, slots[s0:s1], workspace)
        attend_gathered(q[s0:s1], kv, c, invalid, score_scale, out[s0:s1], workspace)
    return out


def _scratch(workspace: dict | None, name: str, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A buffer of `shape` with like's dtype/device: fresh without a workspace, else a view of one kept in
    `workspace`, grown (never shrunk) as needed."""
    if workspace is None:
        return like.new_empty(shape)
    n = math.prod(shape)
    key = (name, like.dtype, like.device)
    buf = workspace.get(key)
    if buf is None or buf.numel() < n:
        buf = workspace[key] = like.new_empty(n)
    return buf[:n].view(shape)


def _row_scores(q: torch.Tensor, kv: torch.Tensor, workspace: dict | None) -> torch.Tensor:
    """q [C, h, d] x kv [C, K, d]^T per row → scores [C, h, K] in kv's dtype (a workspace buffer when
    given): one oneDNN product per row where `cpu.onednn_worth` (1.8x MKL's bmm on AMD CPUs), else one
    batched product."""
    n = q.shape[0]
    scores = _scratch(workspace, "scores", kv, (n, q.shape[1], kv.shape[1]))
    if onednn_worth(q[0], kv[0]):
        for c in range(n):
            scores[c] = onednn_linear(q[c], kv[c])  # [h, K]
    else:
        torch.bmm(q, kv.transpose(1, 2), out=scores)
    return scores


def gather_rows(
    kv_pool: torch.Tensor, slots: torch.Tensor, workspace: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """slots [C, K] (-1 = empty) → keys [C, K, c + r] (latent | rope), empty mask [C, 1, K] or None.
    With `workspace`, the keys are a view of its buffer (valid until the next call)."""
    n, k = slots.shape
    flat = slots.reshape(-1)
    invalid = flat < 0
    if bool(invalid.any()):
        flat = flat.clamp(min=0)
        mask = invalid.view(n, 1, k)
    else:
        mask = None
    kv = torch.index_select(
        kv_pool, 0, flat, out=_scratch(workspace, "kv", kv_pool, (n * k, kv_pool.shape[1]))
    )
    return kv.view(n, k, -1), mask


def attend_gathered(
    q: torch.Tensor,
    kv: torch.Tensor,
    latent_dim: int,
    invalid: torch.Tensor | None,
    scale: float,
    out: torch.Tensor | None = None,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Absorbed attention core: q [C, h, c + r] (latent | rope query) over kv [C, K, c + r] (latent | rope
    key), c = latent_dim → attended latents [C, h, c] (written to `out` when given); scores and softmax
    in fp32."""
    n, h, _ = q.shape
    scores = _row_scores(q, kv, workspace)  # [C, h, K]
    if scores.dtype != torch.float32:  # (kept buffers: fresh ones of MBs pay page faults on every call,
        # 6x the passes themselves for a batch of 8 rows in bf16: 3.97 vs 0.65 ms)
        scores = _scratch(
            workspace, "scores_fp32", scores.new_empty(0, dtype=torch.float32), scores.shape
        ).copy_(scores)
    if scale != 1.0:
        scores.mul_(scale)
    if invalid is not None:
        scores.masked_fill_(invalid, NEG_INF)  # [C, h, K]
    probs = torch.softmax(scores, dim=-1, out=_scratch(workspace, "probs", scores, scores.shape))
    if probs.dtype != kv.dtype:
        probs = _scratch(workspace, "probs_kv", kv, probs.shape).copy_(probs)
    return _pv(probs, kv, latent_dim, out)


def _pv(probs: torch.Tensor, kv: torch.Tensor, latent_dim: int, out: torch.Tensor | None) -> torch.Tensor:
    """probs [C, h, K] @ the latents of kv [C, K, c + r] → [C, h, c] (into `out` when given)."""
    n, h, _ = probs.shape
    lat = kv[..., :latent_dim]  # [C, K, c]
    if kv.device.type != "cpu" or h * kv.shape[1] * latent_dim < PER_ROW_MIN_MACS:
        return torch.bmm(probs, lat, out=out)
    if out is None:
        out = probs.new_empty(n, h, latent_dim)
    if probs.dtype == torch.float32 and native.pv_rows(probs, lat, out):  # fp32: 1.5-1.7x MKL's mm
        return out
    for c in range(n):  # per row: 1.15-1.2x the batched product on CPU (module doc)
        torch.mm(probs[c], lat[c], out=out[c])
    return out


# ---------------------------------------------------------------------- LSA prefill rows: shared window
def _window_block_native(
    q: torch.Tensor,
    s_w: torch.Tensor,
    lat_w_t: torch.Tensor,
    kv_pool: torch.Tensor,
    dyn_slots: torch.Tensor,
    init: int,
    local: int,
    score_scale: float,
    small_rows: bool,
    out: torch.Tensor,
    workspace: dict | None,
) -> bool:
    """One block of `window_attention` with its softmax passes as one C pass (`native.softmax_window`, in
    place on the scores in their own dtype: no fp32 copies, no mask tensors): q [n, h, c + r], s_w
    [n, h, W] window scores (rows at consecutive positions), lat_w_t [c, W] → out [n, h, c]. → False
    where the C softmax does not apply (nothing written)."""
    n, h, c = out.shape
    if small_rows:  # the dynamic picks attended in C (no gathered copy); merged with the window's block
        if native.library() is None:
            return False
        fused = native.slot_attend(q, kv_pool, dyn_slots, c, score_scale)
        sm = native.softmax_window(s_w, None, None, init, local, score_scale) if fused else None
        if fused is None or sm is None:
            return False
        (o_d, m_d, l_d), (m_w, l_w) = fused, sm
        o_w = mm_nt(s_w.view(n * h, -1), lat_w_t).view(n, h, c).float()
        out.copy_(_merge_blocks(o_w, m_w, l_w, o_d, m_d, l_d))
        return True
    kv_d, invalid = gather_rows(kv_pool, dyn_slots, workspace)  # [n, kd, c + r]
    s_d = _row_scores(q, kv_d, workspace)  # [n, h, kd]
    sm = native.softmax_window(s_w, s_d, dyn_slots if invalid is not None else None, init, local, score_scale)
    if sm is None:
        return False
    o = mm_nt(s_w.view(n * h, -1), lat_w_t).view(n, h, c)  # [n, h, c]
    out.copy_(_add_picks_pv(o, s_d, kv_d[..., :c]).div_(sm[1][..., None]))
    return True


def _merge_blocks(
    o_w: torch.Tensor,
    m_w: torch.Tensor,
    l_w: torch.Tensor,
    o_d: torch.Tensor,
    m_d: torch.Tensor,
    l_d: torch.Tensor,
) -> torch.Tensor:
    """Attention from two unnormalised softmax blocks (the shared window's and the dynamic picks'): o
    [n, h, c] fp32, m (log2 units) and l [n, h] each → [n, h, c]. The window block's m is finite (a row
    sees its own position)."""
    m = torch.maximum(m_w, m_d)  # [n, h]
    a_w, a_d = (m_w - m).exp2_()[..., None], (m_d - m).exp2_()[..., None]
    l_sum = l_w[..., None].mul(a_w).add_(l_d[..., None].mul(a_d))
    return o_w.mul_(a_w).add_(o_d.mul_(a_d)).div_(l_sum)


def _add_picks_pv(o: torch.Tensor, p_d: torch.Tensor, lat_d: torch.Tensor) -> torch.Tensor:
    """o [n, h, c] + the dynamic picks' P·V, one product per row (p_d [n, h, kd], lat_d [n, kd, c]): in
    fp32 into o (`native.pv_rows` where built), in bf16 accumulated in fp32. → the sum (fp32)."""
    if o.dtype == torch.float32:
        if not native.pv_rows(p_d, lat_d, o, accumulate=True):
            for i in range(o.shape[0]):
                o[i].addmm_(p_d[i], lat_d[i])  # [h, c]
        return o
    o = o.float()
    p_d = p_d.to(lat_d.dtype)
    for i in range(o.shape[0]):
        o[i] += torch.mm(p_d[i], lat_d[i]).float()
    return o


def window_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_pool: torch.Tensor,
    q_pos: torch.Tensor,
    pool_slots: Callable[[torch.Tensor], torch.Tensor],
    dyn_slots: torch.Tensor,
    init: int,
    local: int,
    scale: float,
    query_block: int = 64,
    workspace: dict | None = None,
) -> torch.Tensor:
    """`gather_attention` for consecutive LSA rows whose selection is sink ∪ dynamic ∪ local window, with
    the forced part shared by a block of queries.

    q_latent [R, h, c], q_rope [R, h, r], kv_pool [P, c + r]; q_pos [R]: consecutive ascending positions,
    each seeing more than index_topk keys (so the three parts are disjoint); pool_slots: positions → pool
    rows (the sequence's block table); dyn_slots [R, kd]: pool rows of each row's dynamic picks (-1 =
    empty) → attended latents [R, h, c]. Per block of `query_block` rows, the sink and the union of the
    rows' local windows (init + local + rows - 1 keys, contiguous positions) are gathered once and scored
    as one [rows*h, c + r] x [c + r, W] GEMM and one P·V GEMM over a transposed copy of their latents
    (both at the GEMM rate of big operands: through oneDNN in fp32 where it beats the BLAS), with each
    row's band (its own window) masked; only the dynamic picks go through the per-row gathered products.
    One softmax over both parts (log2 units, exp2). The band costs (rows - 1) / (init + local) extra
    FLOPs in the shared part."""
    rows, h, c = q_latent.shape
    dt = kv_pool.dtype
    dev = kv_pool.device
    q = torch.cat([q_latent.to(dt), q_rope.to(dt)], dim=-1)  # [R, h, c + r]
    score_scale = scale * LOG2E  # scores in log2 units (exp2 below)
    if dt == torch.float32:
        q.mul_(score_scale)  # folded into the queries (in bf16 the fp32 scores are scaled instead)
        score_scale = 1.0
    out = q_latent.new_empty(rows, h, c, dtype=dt)
    sink = torch.arange(init, device=dev)
    small_rows = h * dyn_slots.shape[1] * c < PER_ROW_MIN_MACS  # the dynamic picks' products per row
    for r0 in range(0, rows, query_block):
        r1 = min(rows, r0 + query_block)
        n = r1 - r0
        pos = q_pos[r0:r1]  # [n]
        p0, p1 = int(pos[0]), int(pos[-1])
        w_pos = torch.cat([sink, torch.arange(p0 - local + 1, p1 + 1, device=dev)])  # [W]
        kv_w = torch.index_select(kv_pool, 0, pool_slots(w_pos))  # [W, c + r]
        qb = q[r0:r1].reshape(n * h, -1)  # [n*h, c + r]
        lat_w_t = kv_w[:, :c].t().contiguous()  # [c, W]: the shared latents as a contiguous operand
        s_w = mm_nt(qb, kv_w).view(n, h, -1)  # [n, h, W]
        if p1 - p0 == n - 1 and _window_block_native(
            q[r0:r1],
            s_w,
            lat_w_t,
            kv_pool,
            dyn_slots[r0:r1],
            init,
            local,
            score_scale,
            small_rows,
            out[r0:r1],
            workspace,
        ):  # (the C softmax's band assumes consecutive positions)
            continue
        s_w = s_w.float()
        if score_scale != 1.0:
            s_w.mul_(score_scale)
        hidden = (w_pos[None, :] > pos[:, None]) | (
            (w_pos[None, :] <= pos[:, None] - local) & (w_pos[None, :] >= init)
        )  # [n, W]: outside each row's sink ∪ window
        s_w.masked_fill_(hidden[:, None], NEG_INF)
        fused = None
        if small_rows:  # the C kernel, no gathered copy
            fused = native.slot_attend(q[r0:r1], kv_pool, dyn_slots[r0:r1], c, score_scale)
        if fused is not None:  # merge two softmax blocks: the shared window's and the dynamic picks'
            o_d, m_d, l_d = fused  # [n, h, c], [n, h], [n, h]
            m_w = s_w.amax(dim=-1, keepdim=True)  # [n, h, 1]
            p_w = s_w.sub_(m_w).exp2_()
            o_w = mm_nt(p_w.view(n * h, -1).to(dt), lat_w_t).view(n, h, c).float()
            out[r0:r1] = _merge_blocks(o_w, m_w[..., 0], p_w.sum(dim=-1), o_d, m_d, l_d)
            continue
        kv_d, invalid = gather_rows(kv_pool, dyn_slots[r0:r1], workspace)  # [n, kd, c + r]
        s_d = _row_scores(q[r0:r1], kv_d, workspace).float()  # [n, h, kd]
        if score_scale != 1.0:
            s_d.mul_(score_scale)
        if invalid is not None:
            s_d.masked_fill_(invalid, NEG_INF)
        m = torch.maximum(s_w.amax(dim=-1, keepdim=True), s_d.amax(dim=-1, keepdim=True))  # [n, h, 1]
        p_w = s_w.sub_(m).exp2_()
        p_d = s_d.sub_(m).exp2_()
        l_sum = p_w.sum(dim=-1, keepdim=True).add_(p_d.sum(dim=-1, keepdim=True))  # [n, h, 1]
        pw = p_w.view(n * h, -1).to(dt)
        o = mm_nt(pw, lat_w_t)  # [n*h, c]
        o = o.view(n, h, c)
        if small_rows:  # (no C kernel here) one batched product
            if dt == torch.float32:
                o.baddbmm_(p_d, kv_d[..., :c])
            else:
                o = o.float().add_(torch.bmm(p_d.to(dt), kv_d[..., :c]).float())
        else:
            o = _add_picks_pv(o, p_d, kv_d[..., :c])
        out[r0:r1] = o.div_(l_sum)
    return out


# ---------------------------------------------------------------------- attention over runs in place
def _mask_future(scores: torch.Tensor, t: int, start: int) -> None:
    """scores [T*h, S] of queries at positions start .. start+T-1: query i sees keys <= start + i, so the
    diagonal block's future is -inf (nothing to do for one query)."""
    if t > 1:
        future = torch.ones(t, t, dtype=torch.bool, device=scores.device).triu_(1)  # [T, T]
        scores.view(t, -1, scores.shape[1])[..., start:].masked_fill_(future[:, None], NEG_INF)


def run_attention(
    q: torch.Tensor,
    pieces: list[tuple[torch.Tensor, torch.Tensor]],
    t: int,
    start: int,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Absorbed causal MLA of T queries at positions start .. start+T-1 over every key of their sequence,
    read in place from the pool's contiguous runs (no gather: on a CPU the gather's copy costs as much
    as the attention's GEMMs; see context.py).

    q [T*h, c + r] (row i*h + j: query i, head j): the latent query (q_nope · W_uk) and the rotated rope
    query side by side (a caller may fold the softmax scale into q and pass scale=1.0: one op fewer per
    call); pieces = [(keys_t [c + r, n], latent [n, c])]: one run of the pool, transposed
    (latent | rope key per column) and its latents, covering positions 0 .. start+T-1 in order. Writes
    the attended latents to out [T*h, c]. One [T*h, S] score GEMM per run over both parts, fp32 softmax
    (`attend_gathered`'s arithmetic up to the order of the score sums). This is the PyTorch path, one
    call per sequence and sublayer, so it makes as few torch calls as it can; on CPU with the compiled
    kernels `run_attention_segments` serves every sequence of a step in one C call instead."""
    if len(pieces) == 1:  # (the common case; dtype checks in Python cost less than no-op casts)
        scores = torch.mm(q, pieces[0][0])  # [T*h, S]
    else:
        scores = torch.cat([torch.mm(q, k) for k, _ in pieces], dim=1)
    if scale != 1.0:
        scores = (scores if scores.dtype == torch.float32 else scores.float()).mul_(scale)
    _mask_future(scores, t, start)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # (fp32 softmax of bf16 scores: one op)
    if probs.dtype != out.dtype:
        probs = probs.to(out.dtype)
    if len(pieces) == 1:
        torch.mm(probs, pieces[0][1], out=out)
        return
    o = 0
    for i, (_, lat) in enumerate(pieces):
        p = probs[:, o : o + lat.shape[0]]
        if i == 0:
            torch.mm(p, lat, out=out)
        else:
            out.addmm_(p, lat)
        o += lat.shape[0]


def run_attention_segments(
    q: torch.Tensor,
    kv: torch.Tensor,
    segs: list[tuple[int, int, int, list[tuple[int, int]]]],
    out: torch.Tensor,
) -> None:
    """`run_attention` for every sequence of a step: q [N*h, c + r] with the softmax scale folded in, kv
    [P, c + r] the sublayer's pool (latent | rope key per row), segs = [(row offset, T, start, runs)]: a
    sequence's T queries are rows off*h .. (off+T)*h - 1, runs = [(first pool row, count)] its cached keys
    in position order. Writes out [N*h, c]. On CPU one `native.run_attend_pool` call for all of them (each
    key read once, sequences split over the threads, no per-sequence Python; bf16 1.4-1.5x the two C
    products it replaced, fp32 1.2x on a 4-head decode row); elsewhere, or where it does not apply,
    `run_attention` per sequence."""
    c = out.shape[1]
    if q.device.type == "cpu" and native.run_attend_pool(q.float() * LOG2E, kv, segs, out):
        return
    h = q.shape[0] // sum(t for _, t, _, _ in segs)
    keys_t, lat = kv.t(), kv[:, :c]  # [c + r, P], [P, c]
    for off, t, start, runs in segs:
        rows = slice(off * h, (off + t) * h)
        pieces = [(keys_t[:, r : r + m], lat[r : r + m]) for r, m in runs]
        run_attention(q[rows], pieces, t, start, 1.0, out[rows])


# ---------------------------------------------------------------------- dense prefill (expanded form)
def dense_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    scale: float,
    max_elems: int = 1 << 21,
) -> torch.Tensor:
    """Causal attention of T queries at positions start.. over S = start + T expanded keys.

    q [T, h, qk], k [S, h, qk], v [S, h, dv] → [T, h, dv]. Block-causal matmul/softmax/matmul over query
    chunks of R rows (h·R·S <= max_elems scores, cache-sized): chunk rows [r0, r1) read only the keys
    < start + r1, and only its diagonal [R, R] block needs the causal mask. (SDPA with an explicit mask is
    slower on CPU, and its causal kernel needs T == S.)"""
    t, h, _ = q.shape
    s = k.shape[0]
    kt = k.permute(1, 2, 0)  # [h, qk, S]
    vh = v.transpose(0, 1)  # [h, S, dv]
    qh = q.transpose(0, 1) * scale  # [h, T, qk]
    rows = max(1, min(t, max_elems // (h * s)))
    tri = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)  # future within the diagonal
    out = torch.empty(h, t, v.shape[-1], dtype=v.dtype, device=q.device)
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        n_keys = start + r1
        scores = torch.matmul(qh[:, r0:r1], kt[:, :, :n_keys]).float()  # [h, R, keys]
        scores[:, :, start + r0 :].masked_fill_(tri[: r1 - r0, : r1 - r0], NEG_INF)
        probs = scores.softmax(dim=-1).to(v.dtype)
        torch.matmul(probs, vh[:, :n_keys], out=out[:, r0:r1])
    return out.transpose(0, 1)


# ---------------------------------------------------------------------- dense prefill (tiled, from latents)
def dense_prefill_tiled(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    lat: torch.Tensor,
    rope: torch.Tensor,
    kv_b: Callable[[torch.Tensor], torch.Tensor],
    start: int,
    scale: float,
    key_block: int = 256,
    query_block: int = 128,
) -> torch.Tensor:
    """Causal MLA of T queries at positions start.. over S = start + T cached latents, expanded per key block
    and attended with an online softmax (flash-attention order: keys outer, query blocks inner).

    q_nope [T, h, nope], q_rope [T, h, r], lat [S, c], rope [S, r], kv_b: latents [B, c] → [B, h*(nope+v)]
    (the layer's kv_b_proj) → [T, h, v]. Each key block is expanded once (B·c·h·(nope+v) FLOPs, never the whole [S, h, qk] K/V) and
    read once per query block of `query_block` rows; scores [h, R, B] and the running max / sum / output
    (fp32, [h, T, ·]) are the only temporaries. Only blocks that straddle the diagonal are masked; query
    blocks that see none of a key block are skipped. Same result as `dense_prefill` on the expanded K/V."""
    t, h, nope = q_nope.shape
    r = q_rope.shape[-1]
    s = lat.shape[0]
    dt = lat.dtype
    scale2 = scale * LOG2E  # scores in log2 units: exp2 below (see LOG2E)
    q = (
        (torch.cat([q_nope.to(dt), q_rope.to(dt)], dim=-1) * scale2).transpose(0, 1).contiguous()
    )  # [h, T, qk]
    m = torch.full((h, t, 1), NEG_INF, dtype=torch.float32, device=lat.device)  # running max
    l_sum = torch.zeros(h, t, 1, dtype=torch.float32, device=lat.device)
    acc: torch.Tensor | None = None  # [h, T, v] fp32
    q_pos = start + torch.arange(t, device=lat.device)  # [T]
    for b0 in range(0, s, key_block):
        b1 = min(s, b0 + key_block)
        kv = kv_b(lat[b0:b1]).view(b1 - b0, h, -1)  # [B, h, nope+v]
        if acc is None:
            acc = torch.zeros(h, t, kv.shape[-1] - nope, dtype=torch.float32, device=lat.device)
        # contiguous per key block (read by every query block): K^T [h, qk, B] = k_nope | shared rope key
        kt = torch.empty(h, nope + r, b1 - b0, dtype=dt, device=lat.device)
        kt[:, :nope] = kv[..., :nope].permute(1, 2, 0)
        kt[:, nope:] = rope[b0:b1].t()
        v = kv[..., nope:].transpose(0, 1).contiguous()  # [h, B, v]
        first = max(0, b0 - start)  # first query row that sees key b0
        for r0 in range(first - first % query_block, t, query_block):
            r1 = min(t, r0 + query_block)
            sc = torch.bmm(q[:, r0:r1], kt)  # [h, R, B]
            if sc.dtype != torch.float32:
                sc = sc.float()  # (PyTorch's bf16 reductions are several times slower than fp32's here)
            if b1 - 1 > start + r0:  # the block reaches past some row's position: causal mask
                future = torch.arange(b0, b1, device=lat.device)[None, :] > q_pos[r0:r1, None]  # [R, B]
                sc.masked_fill_(future, NEG_INF)
            mb, lb, ab = m[:, r0:r1], l_sum[:, r0:r1], acc[:, r0:r1]
            m_new = torch.maximum(mb, sc.amax(dim=-1, keepdim=True))
            corr = (mb - m_new).exp2_()
            probs = sc.sub_(m_new).exp2_()
            lb.mul_(corr).add_(probs.sum(dim=-1, keepdim=True))
            if v.dtype == torch.float32:
                ab.mul_(corr).baddbmm_(probs, v)
            else:  # the P·V GEMM in the model's dtype (native bf16 GEMMs are several times fp32's rate)
                ab.mul_(corr).add_(torch.bmm(probs.to(v.dtype), v))
            mb.copy_(m_new)
    assert acc is not None, "dense_prefill_tiled: no keys"
    return (acc / l_sum).transpose(0, 1).to(dt)


# ---------------------------------------------------------------------- dense prefill (CPU flash kernel)
def cpu_flash_available() -> bool:
    """True when this PyTorch has the CPU flash-attention op that `dense_prefill_flash` calls."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def dense_prefill_flash(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    lat: torch.Tensor,
    rope: torch.Tensor,
    kv_b: Callable[[torch.Tensor], torch.Tensor],
    start: int,
    scale: float,
    key_block: int = 4096,
    workspace: dict | None = None,
) -> torch.Tensor:
    """`dense_prefill_tiled`'s result through PyTorch's fused CPU flash-attention op (CPU tensors only).

    q_nope [T, h, nope], q_rope [T, h, r], lat [S, c], rope [S, r] with S = start + T → [T, h, v]. The keys
    before the chunk ([0, start)) are expanded and attended in blocks of `key_block` keys without a mask;
    the chunk's own keys ([start, S), T x T) with the op's causal mask; the blocks' outputs are merged with
    their log-sum-exps, so memory stays bounded by the block, and no masked score is computed. The op wants
    one head size for K and V: V is zero-padded from v to qk (the padded columns are dropped; they cost
    (qk - v) / (qk + v) extra FLOPs, which the fused kernel's speed more than pays for on CPU). Keys are
    expanded EXPAND_ROWS at a time into the K / V block buffers (kept in `workspace` when given): fresh
    buffers of hundreds of MB per block cost page faults comparable to the expansion itself."""
    t, h, nope = q_nope.shape
    r = q_rope.shape[-1]
    qk = nope + r
    dt = lat.dtype
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q = torch.cat([q_nope.to(dt), q_rope.to(dt)], dim=-1).transpose(0, 1)[None]  # [1, h, T, qk]
    out: torch.Tensor | None = None  # [h, T, qk] fp32, merged so far
    lse: torch.Tensor | None = None  # [h, T] fp32
    s = start + t
    spans = [(b0, min(start, b0 + key_block), False) for b0 in range(0, start, key_block)]
    spans.append((start, s, True))
    vd = 0
    for b0, b1, causal in spans:
        n = b1 - b0
        k = _scratch(workspace, "flash_k", lat, (n, h, qk))  # [B, h, qk]: k_nope | shared rope key
        v = _scratch(workspace, "flash_v", lat, (n, h, qk))  # [B, h, qk]: v | zeros
        for e0 in range(0, n, EXPAND_ROWS):
            e1 = min(n, e0 + EXPAND_ROWS)
            kv = kv_b(lat[b0 + e0 : b0 + e1]).view(e1 - e0, h, -1)  # [E, h, nope + v]
            vd = kv.shape[-1] - nope
            if vd > qk:
                raise ValueError(
                    f"dense_prefill_flash: v head dim {vd} > qk head dim {qk} (V is padded to qk)"
                )
            k[e0:e1, :, :nope] = kv[..., :nope]
            v[e0:e1, :, :vd] = kv[..., nope:]
        k[..., nope:] = rope[b0:b1, None, :]
        v[..., vd:] = 0
        o_b, lse_b = flash(q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], 0.0, causal, scale=scale)
        o_b, lse_b = o_b[0].float(), lse_b[0]  # [h, T, qk], [h, T]
        if out is None:
            out, lse = o_b, lse_b
            continue
        new = torch.logaddexp(lse, lse_b)
        out = out.mul_((lse - new).exp_()[..., None]).add_(o_b.mul_((lse_b - new).exp_()[..., None]))
        lse = new
    assert out is not None
    return out[..., :vd].transpose(0, 1).to(dt)


# ---------------------------------------------------------------------- dense prefill (oneDNN, per head)
def onednn_prefill_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `dense_prefill_onednn` runs its GEMMs at oneDNN's rate here: CPU tensors, fp32 where oneDNN
    measured faster than the BLAS (engine/cpu.py), bf16 where the CPU has native bf16 GEMMs."""
    if device.type != "cpu":
        return False
    if dtype == torch.float32:
        return fp32_linear_via_onednn()
    return dtype == torch.bfloat16 and cpu_has_bf16_gemm()


def _onednn_tile(
    q: torch.Tensor,
    k: torch.Tensor,
    v_h: torch.Tensor,
    v_rows: bool,
    m: torch.Tensor,
    l_sum: torch.Tensor,
    acc: torch.Tensor,
    corr: torch.Tensor,
    r0: int,
    r1: int,
    b0: int,
    n: int,
    start: int,
    q_pos: torch.Tensor,
) -> None:
    """Query rows [r0, r1) of `dense_prefill_onednn` against its current key block (keys b0 .. b0 + n - 1,
    K [h, n, qk]; V per head as [n, v] rows when `v_rows`, else V^T [v, n]): per head the score GEMM, the
    online softmax step (`native.softmax_tile` in one pass, else PyTorch ops) and the P·V GEMM."""
    dt = k.dtype
    j1 = min(n, start + r1 - b0)  # keys of the block that some row of the query block sees
    if j1 <= 0:
        return
    future = None
    if b0 + j1 - 1 > start + r0:  # the tile reaches past some row's position: causal mask
        future = torch.arange(b0, b0 + j1, device=k.device)[None, :] > q_pos[r0:r1, None]  # [R, J]
    rc = corr[: r1 - r0]
    for hh in range(q.shape[0]):
        if v_rows:
            pv_of = lambda p, hh=hh: torch.mm(p, v_h[hh, :j1])  # noqa: E731  [R, v]
        else:  # (contiguous for oneDNN)
            vh = v_h[hh] if j1 == n else v_h[hh, :, :j1].contiguous()
            pv_of = lambda p, vh=vh: onednn_linear(p, vh)  # noqa: E731
        sc = onednn_linear(q[hh, r0:r1], k[hh, :j1])  # [R, J]
        mb, lb, ab = m[hh, r0:r1], l_sum[hh, r0:r1], acc[hh, r0:r1]
        # the softmax passes as one C pass over the tile, in place (in bf16 ~3x PyTorch's ops)
        if native.softmax_tile(sc, mb, lb, rc, start + r0 - b0 + 1):
            native.scale_add(ab, rc, pv_of(sc))
            continue
        if sc.dtype != torch.float32:
            sc = sc.float()
        if future is not None:
            sc.masked_fill_(future, NEG_INF)
        m_new = torch.maximum(mb, sc.amax(dim=-1, keepdim=True))
        rescale = (mb - m_new).exp2_()
        probs = sc.sub_(m_new).exp2_()
        lb.mul_(rescale).add_(probs.sum(dim=-1, keepdim=True))
        pv = pv_of(probs if dt == torch.float32 else probs.to(dt))  # [R, v]
        ab.mul_(rescale).add_(pv)
        mb.copy_(m_new)


def dense_prefill_onednn(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    lat: torch.Tensor,
    rope: torch.Tensor,
    kv_b: Callable[[torch.Tensor], torch.Tensor],
    start: int,
    scale: float,
    key_block: int = 512,
    query_block: int = 512,
    workspace: dict | None = None,
) -> torch.Tensor:
    """`dense_prefill_tiled`'s result with both products of every tile as one oneDNN GEMM per head (CPU).

    q_nope [T, h, nope], q_rope [T, h, r], lat [S, c], rope [S, r] with S = start + T, kv_b: the layer's
    kv_b_proj → [T, h, v]. Keys are expanded `key_block` at a time into per-head contiguous K [h, B, qk]
    and V (oneDNN's fast kernels want a contiguous weight operand; a strided one takes its reference
    loop): in fp32 V^T [h, v, B] for `onednn_linear`, in bf16 V [h, B, v] rows, which oneDNN's bf16 matmul
    takes at its rate (no transposing copy: PyTorch's ran at ~1 GB/s, 8.6 ms per 512-key block). For each
    head and query block of `query_block` rows (512: +4-10 % over 256 in a kernel microbenchmark at 64
    heads, 4K queries after 4K keys, equal through the engine; the [512 x 512] fp32 score tile still fits
    a 1 MB L2), scores = Q_h K_h^T and P V_h are oneDNN GEMMs (on AMD CPUs, where MKL skips its AVX-512
    kernels, 2x the fp32 rate of `bmm`), with an online softmax step between them (exp2 on log2-scaled
    scores): where compiled, one C pass over the tile in place (`native.softmax_tile`: the numerators in
    the scores' own dtype, so no fp32 copy and no mask tensor; bf16 ~3x the PyTorch ops it replaces) and
    one for the output update (`native.scale_add`); else PyTorch ops in fp32. Tiles above the diagonal are
    skipped; tiles that straddle it are split in two halves of rows, each trimmed to the keys its rows
    see (the upper half reads half the keys: -25 % of the diagonal tiles' work) and masked. With
    `workspace`, the queries, K / V^T blocks and softmax state live in buffers kept there (fresh buffers of
    hundreds of MB pay first-touch page faults every call). Same result as `dense_prefill` on the
    expanded K/V, up to summation order."""
    t, h, nope = q_nope.shape
    r = q_rope.shape[-1]
    s = lat.shape[0]
    dt = lat.dtype
    dev = lat.device
    q = _scratch(workspace, "dense_q", lat, (h, t, nope + r))  # [h, T, qk], log2-scaled
    q[..., :nope] = q_nope.transpose(0, 1)
    q[..., nope:] = q_rope.transpose(0, 1)
    q.mul_(scale * LOG2E)
    f32 = lat.new_empty(0, dtype=torch.float32)
    m = _scratch(workspace, "dense_m", f32, (h, t, 1)).fill_(NEG_INF)  # running max, log2 units
    l_sum = _scratch(workspace, "dense_l", f32, (h, t, 1)).zero_()
    acc: torch.Tensor | None = None  # [h, T, v] fp32
    corr = _scratch(workspace, "dense_corr", f32, (query_block,))  # a tile's rescale per row
    v_rows = dt == torch.bfloat16
    q_pos = start + torch.arange(t, device=dev)  # [T]
    for b0 in range(0, s, key_block):
        b1 = min(s, b0 + key_block)
        n = b1 - b0
        kv = kv_b(lat[b0:b1]).view(n, h, -1)  # [B, h, nope + v]
        if acc is None:
            acc = _scratch(workspace, "dense_acc", f32, (h, t, kv.shape[-1] - nope)).zero_()
        k = _scratch(workspace, "dense_k", lat, (h, n, nope + r))  # K_h: k_nope | shared rope key
        k[..., :nope] = kv[..., :nope].transpose(0, 1)
        k[..., nope:] = rope[b0:b1]
        if v_rows:  # V_h [B, v]: in bf16 oneDNN's matmul takes it at its rate, no transposing copy
            v_h = _scratch(workspace, "dense_v", lat, (h, n, kv.shape[-1] - nope))
            v_h.copy_(kv[..., nope:].transpose(0, 1))
        else:  # V_h^T [v, B], onednn_linear's weight layout (fp32: torch.mm would be MKL's slow GEMM)
            v_h = _scratch(workspace, "dense_vt", lat, (h, kv.shape[-1] - nope, n))
            v_h.copy_(kv[..., nope:].permute(1, 2, 0))
        first = max(0, b0 - start)  # first query row that sees key b0
        for r0 in range(first - first % query_block, t, query_block):
            r1 = min(t, r0 + query_block)
            if b0 + n - 1 > start + r0 and r1 - r0 > query_block // 2:  # straddles the diagonal: halves,
                half = r0 + (r1 - r0) // 2  # so the upper one reads only the keys its rows see
                parts = [(r0, half), (half, r1)]
            else:
                parts = [(r0, r1)]
            for p0, p1 in parts:
                _onednn_tile(q, k, v_h, v_rows, m, l_sum, acc, corr, p0, p1, b0, n, start, q_pos)
    assert acc is not None, "dense_prefill_onednn: no keys"
    # (in place when a copy to dt follows: the result must never be a view of the workspace)
    return (acc.div_(l_sum) if dt != acc.dtype else acc / l_sum).transpose(0, 1).to(dt)


# ---------------------------------------------------------------------- dense decode (long contexts)
def dense_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    pieces: list[tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    block: int = 8192,
) -> torch.Tensor:
    """Absorbed MLA for one query over every cached key, online softmax over blocks.

    q_latent [h, c], q_rope [h, r]; pieces = [(latent [n, c], rope [n, r])] views of the pool. → [h, c]."""
    h, c = q_latent.shape
    m = torch.full((h, 1), NEG_INF, dtype=torch.float32, device=q_latent.device)
    l_sum = torch.zeros(h, 1, dtype=torch.float32, device=q_latent.device)
    acc = torch.zeros(h, c, dtype=torch.float32, device=q_latent.device)
    ql, qr = q_latent, q_rope
    for lat, rope in pieces:
        if lat.dtype != ql.dtype:
            ql, qr = q_latent.to(lat.dtype), q_rope.to(lat.dtype)
        for b0 in range(0, lat.shape[0], block):
            lb, rb = lat[b0 : b0 + block], rope[b0 : b0 + block]
            s = torch.addmm(ql @ lb.t(), qr, rb.t()).float() * (scale * LOG2E)  # [h, n], log2 units
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            p = torch.exp2(s - m_new)
            corr = torch.exp2(m - m_new)
            l_sum = l_sum * corr + p.sum(dim=-1, keepdim=True)
            acc = acc * corr + (p.to(lb.dtype) @ lb).float()
            m = m_new
    return (acc / l_sum).to(q_latent.dtype)
