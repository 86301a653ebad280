"""Hierarchical indexing (HI) and FP8-aware index scans over the paged cache: the cached path of LSA selection.

HI (LSA report, training-free, same indexer weights), for a query at position q that sees more than
`lsa_hi_min_len` keys, with pages of P = `lsa_hi_page_size` tokens and sub-blocks of B = `lsa_hi_block_size`:
- Pages: page p holds positions [pP, pP + P). The *forced* pages are the sink pages (p < ceil(init / P)) and
  every page that reaches into the local window or beyond (any position > q - local); the *candidate* pages
  p0 = ceil(init / P) .. p0 + nc - 1 are those lying wholly in the dynamic region [init, q - local]
  (nc = floor((q - local + 1) / P) - p0), so all their sub-blocks are complete.
- Coarse stage: a candidate page's score is the max over its P/B sub-blocks of Σ_j w_j · ReLU(q_j · k̄_b),
  k̄_b the sub-block's mean index key (the cache's summaries, see cache.py). Forced pages count inside the
  `lsa_hi_top_pages` budget: keep = top_pages - (#pages - nc) candidate pages are kept, the best scores
  first, equal scores to the later page. keep >= nc (full coverage) is exactly today's selection.
- Fine stage: the usual token rule over the dynamic-region tokens of the kept pages (forced pages' dynamic
  tokens included): top-(index_topk - init - local) exact scores, ties to the later position, plus the
  forced sink and local tokens. Config validation guarantees the kept pages hold enough tokens.

Costs per query: coarse reads L/B summaries, fine reads keep·P keys (dense LSA reads L keys). In prefill the
coarse stage for a chunk of queries is one blocked scan (`kernels.index_scan`) of the chunk's queries over
the cached summaries (a small matmul per tile); the fine stage gathers each query's kept keys.
The model's forward without a cache (training) never uses HI: it always selects exactly.
"""

from __future__ import annotations

import torch

from longcat2.config import ModelConfig
from longcat2.engine.cache import PagedKVCache, SeqBlocks
from longcat2.engine.kernels import (
    NEG_INF,
    SCAN_ROWS,
    SCAN_TILE_ELEMS,
    index_scan,
    index_scan_select_bf16,
    lsa_rows,
    select_dynamic,
)

DEQUANT_ROWS = 1 << 16  # fp8 keys are dequantised this many rows at a time
# elements per fine-stage temporary ([rows, kept tokens, d] keys): small enough to be reused by the allocator
# (large fresh buffers cost a page fault per 4 KB, which dominated a first version of this stage)
FINE_ELEMS = 1 << 22


def hi_active(cfg: ModelConfig, q_pos: int) -> bool:
    """HI applies to a query at q_pos (it sees q_pos + 1 keys)."""
    return cfg.lsa_hi and q_pos + 1 > max(cfg.lsa_hi_min_len, cfg.index_topk)


def scan_keys(
    cache: PagedKVCache,
    lid: int,
    blocks: SeqBlocks,
    q: torch.Tensor,
    w: torch.Tensor,
    lo: int,
    hi: int,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Exact scores [T, hi - lo] of the cached index keys of positions [lo, hi) (fp8 keys dequantised a
    block at a time; other dtypes read in place). With `workspace`, the scores may be a view of a buffer
    kept there (valid until the next call)."""
    pool = cache.index_keys[lid]
    runs = cache.runs(blocks, lo, hi)
    if not cache.index_fp8:
        return index_scan(q, w, [(a, pool[r : r + m]) for a, r, m in runs], lo, hi, workspace)
    out = torch.empty(q.shape[0], hi - lo, dtype=torch.float32, device=q.device)
    for a, r, m in runs:
        for b0 in range(0, m, DEQUANT_ROWS):
            n = min(DEQUANT_ROWS, m - b0)
            keys = cache.dequant_index(lid, slice(r + b0, r + b0 + n))
            out[:, a + b0 - lo : a + b0 - lo + n] = index_scan(q, w, [(a + b0, keys)], a + b0, a + b0 + n)
    return out


def page_scores(
    cache: PagedKVCache,
    lid: int,
    blocks: SeqBlocks,
    q: torch.Tensor,
    w: torch.Tensor,
    p0: int,
    n_pages: int,
    page: int,
) -> torch.Tensor:
    """Coarse scores [T, n_pages] of pages p0 .. p0 + n_pages - 1: max over each page's sub-block scores.

    Pages that sit whole in the pool (block_size a multiple of P) are scored in L2-sized tiles of
    [rows·h, pages·G] dot products whose page maxima are written straight out (no [T, sub-blocks] score
    tensor); otherwise the sub-block scores come from `index_scan` and are reduced after."""
    b = cache.hi_block
    g = page // b
    pool = cache.index_summaries[lid]
    runs = cache.runs(blocks, p0 * page, (p0 + n_pages) * page)
    t, h, d = q.shape
    if cache.block_size % page:
        pieces = [(a // b, pool[r // b : (r + m) // b]) for a, r, m in runs]
        sub = index_scan(q, w, pieces, p0 * g, (p0 + n_pages) * g)  # [T, n_pages * g]
        return sub.view(t, n_pages, g).amax(dim=-1)
    out = torch.empty(t, n_pages, dtype=torch.float32, device=q.device)
    qf = q.float().reshape(t * h, d)
    rc = max(1, SCAN_ROWS // h)
    per_tile = max(1, SCAN_TILE_ELEMS // (min(t, rc) * h * g))  # pages per tile
    for r0 in range(0, t, rc):
        n_rows = min(rc, t - r0)
        qr = qf[r0 * h : (r0 + n_rows) * h]  # [rows*h, d]
        wr = w[r0 : r0 + n_rows].float()[:, :, None]  # [rows, h, 1]
        for a, r, m in runs:
            summ = pool[r // b : (r + m) // b]  # [pages*g, d] of this run
            first = a // page - p0
            for j in range(0, m // page, per_tile):
                sb = summ[j * g : (j + per_tile) * g].float()
                dots = (qr @ sb.t()).view(n_rows, h, -1).relu_()  # [rows, h, pages*g]
                sc = dots.mul_(wr).sum(1).view(n_rows, -1, g).amax(-1)  # [rows, pages]
                out[r0 : r0 + n_rows, first + j : first + j + sc.shape[1]] = sc
    return out


def hi_rows(
    cache: PagedKVCache,
    lid: int,
    blocks: SeqBlocks,
    cfg: ModelConfig,
    q: torch.Tensor,
    w: torch.Tensor,
    q_pos: torch.Tensor,
    budget: int,
    bf16_decode: bool = True,
) -> torch.Tensor:
    """HI selection for queries q [T, h, d], w [T, h] at ascending positions q_pos [T] (each HI-active)
    → positions [T, index_topk] ascending. bf16_decode: a single bf16 decode row may take `_decode_bf16`
    (False: the fp32 path, the engine's index_mode="exact")."""
    topk, init, local = cfg.index_topk, cfg.index_init_tokens, cfg.index_local_tokens
    page = cfg.lsa_hi_page_size
    p0 = -(-init // page)
    pos = q_pos.tolist()
    nc = [max(0, (p - local + 1) // page - p0) for p in pos]
    keep = [cfg.lsa_hi_top_pages - (p // page + 1 - n) for p, n in zip(pos, nc)]
    out = torch.empty(len(pos), topk, dtype=torch.long, device=q.device)
    exact = [i for i in range(len(pos)) if keep[i] >= nc[i]]  # full coverage: today's selection
    if exact:
        ix = torch.tensor(exact, device=q.device)
        hi = pos[exact[-1]] - local + 1
        scores = scan_keys(cache, lid, blocks, q[ix], w[ix], init, hi)
        out[ix] = lsa_rows(scores, q_pos[ix], topk, init, local)
    rows = [i for i in range(len(pos)) if keep[i] < nc[i]]
    if not rows:
        return out
    # coarse: one scan of all rows over the summaries of the last row's candidate pages
    ix = torch.tensor(rows, device=q.device)
    n_pages = nc[rows[-1]]
    ps = page_scores(cache, lid, blocks, q[ix], w[ix], p0, n_pages, page)  # [R, n_pages]
    ncr = torch.tensor([nc[i] for i in rows], device=q.device)
    ps.masked_fill_(torch.arange(n_pages, device=q.device)[None, :] >= ncr[:, None], NEG_INF)
    if len(rows) == 1 and bf16_decode and _bf16_decode(cache, lid, q):
        i = rows[0]
        out[i] = _decode_bf16(cache, lid, blocks, cfg, q[i], w[i], pos[i], p0, nc[i], keep[i])
        return out
    # fine: per group of rows with the same page budget (forced pages differ by at most one)
    for k in sorted({keep[i] for i in rows}):
        gi = torch.tensor([j for j, i in enumerate(rows) if keep[i] == k], device=q.device)
        kept = select_dynamic(ps[gi], k) + p0  # [G, k] kept candidate pages (ties: later page), ascending
        per_row = max(1, min(budget, FINE_ELEMS) // max(1, (k + 2) * page * (q.shape[1] + q.shape[2])))
        for c0 in range(0, gi.numel(), per_row):
            rr = ix[gi[c0 : c0 + per_row]]
            out[rr] = _fine(
                cache,
                lid,
                blocks,
                cfg,
                q[rr],
                w[rr],
                q_pos[rr],
                kept[c0 : c0 + per_row],
                p0,
                ncr[gi[c0 : c0 + per_row]],
            )
    return out


def _fine(
    cache: PagedKVCache,
    lid: int,
    blocks: SeqBlocks,
    cfg: ModelConfig,
    q: torch.Tensor,
    w: torch.Tensor,
    q_pos: torch.Tensor,
    kept: torch.Tensor,
    p0: int,
    nc: torch.Tensor,
) -> torch.Tensor:
    """Token top-k of C queries over their kept pages. Candidates, in ascending position order (the tie
    rule picks the later column): the sink pages' dynamic tokens [init, p0·P), the kept pages' tokens, the
    local pages' dynamic tokens [(p0 + nc)·P, q - local]. → positions [C, index_topk]."""
    topk, init, local = cfg.index_topk, cfg.index_init_tokens, cfg.index_local_tokens
    page = cfg.lsa_hi_page_size
    c, k = kept.shape
    dev = q.device
    ar = torch.arange(page, device=dev)
    head = torch.arange(init, p0 * page, device=dev)  # [S0] same for every row
    tail = ((nc + p0) * page)[:, None] + ar  # [C, P] (< P of them are dynamic tokens)
    tail_ok = tail <= (q_pos - local)[:, None]
    tok_keys = cache.dequant_index(
        lid, cache.slots(blocks, torch.cat([head.expand(c, -1), tail.clamp(max=int(q_pos[-1]))], 1)).flatten()
    )
    tok_keys = tok_keys.view(c, head.numel() + page, -1)
    qf, wf = q.float(), w.float()[:, None, :]  # [C, h, d], [C, 1, h]

    def score(keys: torch.Tensor) -> torch.Tensor:  # keys [C, M, d] → [C, M] (q·kᵀ: M is the long output dim)
        return torch.bmm(wf, torch.bmm(qf, keys.transpose(1, 2)).relu_())[:, 0]

    s0, kp = head.numel(), k * page
    scores = torch.empty(c, s0 + kp + page, dtype=torch.float32, device=dev)  # [C, S0 + k·P + P]
    scores[:, :s0] = score(tok_keys[:, :s0])
    per_tile = max(1, FINE_ELEMS // (c * page * cache.index_head_dim))  # pages per [C, pages·P, d] tile
    for j in range(0, k, per_tile):
        page_keys = _page_keys(cache, lid, blocks, kept[:, j : j + per_tile], page)  # [C, pages·P, d]
        scores[:, s0 + j * page : s0 + j * page + page_keys.shape[1]] = score(page_keys)
    scores[:, s0 + kp :] = score(tok_keys[:, s0:]).masked_fill_(~tail_ok, NEG_INF)
    cols = select_dynamic(scores, topk - init - local)  # [C, kd] ascending columns
    in_pages = (cols >= s0) & (cols < s0 + kp)
    rel = (cols - s0).clamp(0, kp - 1)
    pos_pages = torch.gather(kept, 1, rel // page) * page + rel % page
    pos_tail = torch.gather(tail, 1, (cols - s0 - kp).clamp(0, page - 1))
    dyn = torch.where(cols < s0, cols + init, torch.where(in_pages, pos_pages, pos_tail))
    sink = torch.arange(init, device=dev).expand(c, init)
    loc = q_pos[:, None] - local + 1 + torch.arange(local, device=dev)
    return torch.cat([sink, dyn, loc], dim=1)


def _bf16_decode(cache: PagedKVCache, lid: int, q: torch.Tensor) -> bool:
    """A bf16 model's decode row over bf16 keys: the bf16 GEMM path (`_decode_bf16`) applies."""
    return q.dtype == torch.bfloat16 and cache.index_keys[lid].dtype == torch.bfloat16 and cache.hi_block > 0


def _decode_bf16(
    cache: PagedKVCache,
    lid: int,
    blocks: SeqBlocks,
    cfg: ModelConfig,
    q: torch.Tensor,
    w: torch.Tensor,
    qp: int,
    p0: int,
    nc: int,
    keep: int,
) -> torch.Tensor:
    """HI for one bf16 decode query q [h, d], w [h] (AMX-friendly): coarse page scores from one bf16 GEMM
    over the bf16 summaries (outputs rounded to bf16: the coarse stage is an approximation either way), then
    the fine stage as the bf16 two-pass scan (`kernels.index_scan_select_bf16`: bf16 GEMM + exact fp32
    rescoring near the threshold, so the same tokens as the fp32 fine stage) over the kept pages' keys
    copied into one buffer in ascending position order. → positions [index_topk]."""
    topk, init, local = cfg.index_topk, cfg.index_init_tokens, cfg.index_local_tokens
    page, b = cfg.lsa_hi_page_size, cache.hi_block
    g = page // b
    qt = q.t().contiguous()  # [d, h]
    w1 = w.float()
    pool = cache.index_summaries[lid]
    ps = torch.empty(nc, dtype=torch.float32, device=q.device)
    for a, r, m in cache.runs(blocks, p0 * page, (p0 + nc) * page):
        sub = (pool[r // b : (r + m) // b] @ qt).float().relu_() @ w1  # [pages*g]
        ps[a // page - p0 : a // page - p0 + m // page] = sub.view(-1, g).amax(-1)
    kept = select_dynamic(ps[None], keep)[0] + p0  # [keep] ascending
    keys = cache.index_keys[lid]
    head = torch.arange(init, p0 * page, device=q.device)
    tail = torch.arange((p0 + nc) * page, qp - local + 1, device=q.device)
    if cache.block_size % page == 0:
        rows = cache.slots(blocks, kept * page) // page
        pages = keys.view(-1, page * keys.shape[1]).index_select(0, rows).view(-1, keys.shape[1])
    else:
        pos = (kept[:, None] * page + torch.arange(page, device=q.device)).flatten()
        pages = keys.index_select(0, cache.slots(blocks, pos))
    buf = torch.cat(
        [
            keys.index_select(0, cache.slots(blocks, head)),
            pages,
            keys.index_select(0, cache.slots(blocks, tail)),
        ]
    )
    cols = index_scan_select_bf16(
        q, w1, [(0, buf)], 0, buf.shape[0], topk - init - local, cache.index_key_max_norm[lid]
    )
    s0, kp = head.numel(), kept.numel() * page
    rel = (cols - s0).clamp(0, kp - 1)
    pos_pages = kept[rel // page] * page + rel % page
    dyn = torch.where(
        cols < s0, cols + init, torch.where(cols < s0 + kp, pos_pages, cols - s0 - kp + (p0 + nc) * page)
    )
    return torch.cat(
        [torch.arange(init, device=q.device), dyn, torch.arange(qp - local + 1, qp + 1, device=q.device)]
    )


def _page_keys(
    cache: PagedKVCache, lid: int, blocks: SeqBlocks, pages: torch.Tensor, page: int
) -> torch.Tensor:
    """Index keys of whole pages [C, k] → [C, k·P, d] fp32: one row copy per page when pages sit whole in
    the pool (block_size a multiple of P), else one per token."""
    c, k = pages.shape
    d = cache.index_head_dim
    if cache.block_size % page:
        pos = (pages[:, :, None] * page + torch.arange(page, device=pages.device)).flatten()
        return cache.dequant_index(lid, cache.slots(blocks, pos)).view(c, k * page, d)
    first = (cache.slots(blocks, pages * page) // page).flatten()  # page rows of the [rows/P, P·d] view
    pool = cache.index_keys[lid]
    if cache.index_fp8:
        raw = pool.view(torch.uint8).view(-1, page * d).index_select(0, first).view(torch.float8_e4m3fn)
        scale = cache.index_scales[lid].view(-1, page).index_select(0, first)  # [C·k, P]
        return (raw.float().view(-1, page, d) * scale[:, :, None]).view(c, k * page, d)
    return pool.view(-1, page * d).index_select(0, first).float().view(c, k * page, d)
