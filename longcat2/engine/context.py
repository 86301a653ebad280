"""The engine's attention cache for one step: what `MLA.forward(..., cache=...)` stores into and attends over.

A step is a flat batch of segments (T new tokens of one sequence each). `StepContext` carries what the
model's attention needs to know about them — positions, cache slots, which rows belong to which sequence
and how many keys each sees — and implements the model's `AttentionCache` protocol with the cache-side
kernels. The layer math (projections, indexer queries/keys, the absorbed-form weights, o_proj) stays in the
model; this module only stores, selects over and gathers from the paged pool.

Design choices:
- Per segment the regime is chosen like the model: dense when every query of the segment sees <=
  index_topk keys (or the layer has no LSA), else per-query top-k (queries that still see <= index_topk
  keys get all of them, as in the model's selection). The consumer sublayer reuses the owner's selection
  (CLI); the attention plan derived from a selection is computed once per step and shared.
- Attention forms: LSA rows of a prefill segment (at least `window_min_rows` of them, each selection
  checked to be sink ∪ dynamic ∪ local window) share the sink + window part per block of rows
  (`kernels.window_attention`); other selected keys (decode rows, short dense rows) go through one batched
  gather + absorbed MLA call for the whole step (`kernels.gather_attention`: the model's sparse core on
  the pool);
  on a CPU short dense segments (decode rows of a context <= dense_gather_max) instead attend over their
  sequence's contiguous runs in place (`kernels.run_attention_segments`, `short_kernel="runs"`): one C
  call for all segments where the compiled kernels exist (each key read once), else a loop over
  segments, but no gathered copy — at batch 8 and 512 keys the gather's copy cost as much as the GEMMs
  (the fp32 batch-8 gap of issue 21); on accelerators one batched gather beats a per-segment loop;
  dense segments with many queries (prefill without LSA, or the rows of an LSA segment at positions
  < index_topk, which select every key they see) use the expanded form when it is cheaper in FLOPs: on
  CPU with one oneDNN GEMM per head and tile (`kernels.dense_prefill_onednn`, fp32 where oneDNN beats
  the BLAS — on AMD CPUs, where MKL skips AVX-512, 1.8-2x PyTorch's flash op — and bf16 on CPUs with
  native bf16 GEMMs, 1.08-1.13x the tiled kernel at LongCat-2.0 dims); else in fp32 through PyTorch's
  fused flash-attention op (`kernels.dense_prefill_flash`), otherwise `kernels.dense_prefill_tiled`
  (keys expanded per block, online softmax over query blocks, one batched GEMM over heads); the plain
  `MLA.expand` + `kernels.dense_prefill` is the selectable reference; long dense decode rows use the
  online-softmax kernel over the cache's contiguous runs (`kernels.dense_decode`).
- Selection never builds [T, S] masks: only the dynamic region is scored (see kernels.py), in query chunks
  bounded by `score_budget` elements, so prefill memory stays bounded for 1M-token contexts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longcat2.config import ModelConfig
from longcat2.engine.cache import PagedKVCache, SeqBlocks
from longcat2.engine.hi import hi_active, hi_rows, scan_keys
from longcat2.engine.kernels import (
    absorb,
    cpu_flash_available,
    dense_decode,
    dense_prefill,
    dense_prefill_flash,
    dense_prefill_onednn,
    dense_prefill_tiled,
    dense_rows,
    gather_attention,
    index_scan_bf16_rows,
    index_scan_rows,
    index_scan_select_bf16,
    lsa_rows,
    onednn_prefill_ok,
    run_attention_segments,
    unabsorb,
    window_attention,
)
from longcat2.model.attention import MLA, MLAProjection

BF16_SCAN_MIN_KEYS_CPU = 1 << 17  # (`_use_bf16`: the two scans break even near 128K keys here)
# (`_use_bf16_prefill`) last 4,096-row bf16 chunk's scan at LongCat-2.0 dims, exact → two-pass CPU s:
# 1.58 → 1.38 at 12K context, 2.75 → 2.07 at 20K, 5.19 → 4.24 at 36K (BENCHMARKS.md, session 16)
BF16_PREFILL_SCAN_MIN_KEYS = 8192
BF16_PREFILL_SCAN_MIN_ROWS = 16
HI_SCORE_ELEMS = 1 << 22  # coarse page scores per HI call (a reusable buffer, not fresh pages)
# windowed LSA rows are absorbed, attended and unabsorbed this many at a time: whole-chunk latent queries
# and outputs (at LongCat-2.0 dims 4,096 rows x 64 heads x 576 fp32 = 600 MB) are fresh pages every call,
# and their first-touch page faults cost ~15 % of a 16K prefill chunk; 128-row blocks stay small enough
# for the allocator to reuse
WINDOW_ROWS = 128
Selection = list[torch.Tensor | None]  # per segment: selected positions [T, K] (-1 = empty) or None (dense)


@dataclass
class AttentionSettings:
    """What the runner decides once: the cache, each MLA's cache layer and the kernel choices."""

    cache: PagedKVCache
    cfg: ModelConfig
    layer_ids: dict[MLA, int]  # MLA sublayer → its cache layer
    index_mode: str = "auto"  # "exact" | "bf16" | "auto" (see ModelRunner)
    score_budget: int = 1 << 24
    expanded_min_rows: int = 32
    dense_gather_max: int = 4096
    # dense prefill: "auto" (on CPU onednn where oneDNN runs the dtype at its rate, else flash in fp32;
    # else tiled; see StepContext._prefill_kernel) | "flash"
    # (kernels.dense_prefill_flash) | "onednn" (kernels.dense_prefill_onednn) | "tiled"
    # (kernels.dense_prefill_tiled) | "plain" (kernels.dense_prefill)
    prefill_kernel: str = "auto"
    short_kernel: str = "gather"  # short dense segments: "gather" (batched) | "runs" (kernels.run_attention)
    # segments with at least this many LSA rows share their sink + local-window part per query block
    # (kernels.window_attention); fewer (decode) gather each row's whole selection
    window_min_rows: int = 16
    # a step's plain LSA decode rows (one query each, of different sequences), when at least this many,
    # select together: one scan call and one top-k (StepContext._select_decode_rows)
    decode_select_min_rows: int = 2
    workspace: dict = field(default_factory=dict)  # reused gather buffers (kernels.gather_attention)


@dataclass
class _Plan:
    rows: torch.Tensor | None = None  # query rows that attend over explicit slots (None: all rows)
    slots: torch.Tensor | None = None  # [R, K] pool rows per query, -1 = empty
    expanded: list[tuple[int, int, SeqBlocks, int]] = field(
        default_factory=list
    )  # (row offset, T, blocks, start)
    long_rows: list[tuple[int, SeqBlocks, int]] = field(default_factory=list)  # (row, blocks, visible keys)
    # LSA rows with a shared sink + window part: (row offset, T, blocks, pool rows of the dynamic picks)
    windowed: list[tuple[int, int, SeqBlocks, torch.Tensor]] = field(default_factory=list)
    runs: list[tuple[int, int, int, list[tuple[int, int]]]] = field(
        default_factory=list
    )  # (row offset, T, start, [(first pool row, length)] of the keys' runs)


@dataclass
class StepContext:
    """One step's rows: segment i covers rows offsets[i] .. offsets[i]+lengths[i]-1 at positions
    starts[i] .. of the sequence whose cache blocks are blocks[i]. Implements `model.attention.AttentionCache`."""

    settings: AttentionSettings
    blocks: list[SeqBlocks]
    starts: list[int]
    offsets: list[int]
    lengths: list[int]
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] pool rows of the new tokens
    plans: dict[int, tuple[Selection | None, _Plan]] = field(default_factory=dict)

    # ------------------------------------------------------------------ AttentionCache
    def store(
        self, mla: MLA, kv_latent: torch.Tensor, k_rope: torch.Tensor, index_keys: torch.Tensor | None
    ) -> None:
        cache, lid = self.settings.cache, self.settings.layer_ids[mla]
        cache.write(lid, self.slots, kv_latent[0], k_rope[0])
        if index_keys is not None:
            cache.write_index(lid, self.slots, index_keys[0])  # [N, d]
            if cache.hi_block:  # HI: sub-blocks completed by this step get their mean key
                b = cache.hi_block
                cache.update_summaries(lid, self.slots[self.positions % b == b - 1])

    def select(self, mla: MLA, q: torch.Tensor, w: torch.Tensor) -> Selection:
        """q [1, N, h, d], w [1, N, h] fp32 → per segment [T, index_topk] positions or None (dense)."""
        st = self.settings
        cfg, cache, lid = st.cfg, st.cache, st.layer_ids[mla]
        q, w = cache.rotate_queries(q[0]), w[0]
        topk, init, local = cfg.index_topk, cfg.index_init_tokens, cfg.index_local_tokens
        pool = cache.index_keys[lid]
        batched = self._select_decode_rows(lid, q, w)
        out: Selection = []
        for i, (blocks, start, off, t) in enumerate(
            zip(self.blocks, self.starts, self.offsets, self.lengths)
        ):
            if i in batched:
                out.append(batched[i])
                continue
            if start + t <= topk:
                out.append(None)  # every query sees <= topk keys: dense
                continue
            q_pos = self.positions[off : off + t]
            rows = []
            n_dense = max(0, min(t, topk - start))  # queries at positions < topk see <= topk keys
            if n_dense:
                rows.append(dense_rows(q_pos[:n_dense], topk))
            qs, ws, ps = q[off + n_dense : off + t], w[off + n_dense : off + t], q_pos[n_dense:]
            n_hi = sum(1 for p in ps.tolist()[::-1] if hi_active(cfg, p)) if ps.numel() else 0
            if n_hi:  # hierarchical indexing for the queries that see more than lsa_hi_min_len keys
                rows_hi = self._hi(lid, blocks, qs[-n_hi:], ws[-n_hi:], ps[-n_hi:])
                qs, ws, ps = qs[:-n_hi], ws[:-n_hi], ps[:-n_hi]
            if ps.numel() == 1 and self._use_bf16(q, pool, int(ps[0]) - local + 1 - init):
                # decode: bf16 GEMM scan + exact rescoring (same indices as the fp32 scan)
                qp = int(ps[0])
                lo, hi = init, qp - local + 1
                pieces = [(a, pool[r : r + m]) for a, r, m in cache.runs(blocks, lo, hi)]
                kd = topk - init - local
                dyn = index_scan_select_bf16(qs[0], ws[0], pieces, lo, hi, kd, cache.index_key_max_norm[lid])
                sink = torch.arange(init, device=dyn.device)
                loc = torch.arange(qp - local + 1, qp + 1, device=dyn.device)
                rows.append(torch.cat([sink, dyn, loc])[None])
            elif ps.numel():
                chunk = max(1, st.score_budget // max(1, int(ps[-1])))
                for c0 in range(0, ps.numel(), chunk):
                    pc, qc, wc = ps[c0 : c0 + chunk], qs[c0 : c0 + chunk], ws[c0 : c0 + chunk]
                    lo, hi = init, int(pc[-1]) - local + 1  # dynamic region of the chunk's last query
                    scores = None
                    if self._use_bf16_prefill(q, pool, hi - lo, pc.numel()):  # (fp8 keys: not bf16)
                        # bf16 GEMM scan + exact rescoring of the keys that can be selected
                        scores = index_scan_bf16_rows(
                            qc, wc, pool, cache.runs(blocks, lo, hi), pc, init, local,
                            topk - init - local, cache.index_key_max_norm[lid], st.workspace,
                        )  # fmt: skip
                    if scores is None:
                        scores = scan_keys(cache, lid, blocks, qc, wc, lo, hi, st.workspace)
                    rows.append(lsa_rows(scores, pc, topk, init, local))
            if n_hi:
                rows.extend(rows_hi)
            out.append(torch.cat(rows) if len(rows) > 1 else rows[0])
        return out

    def _select_decode_rows(self, lid: int, q: torch.Tensor, w: torch.Tensor) -> dict[int, torch.Tensor]:
        """The selections of the step's plain decode segments (one query that sees more than index_topk
        keys, no HI, the exact fp32 scan of unquantised keys), all at once: one scan call
        (`index_scan_rows`) into one score buffer and one top-k over it (`lsa_rows`, each row bounded by its
        own last candidate). The same positions as `select`'s per-segment loop, which serves every other
        segment. q [N, h, d] (rotated), w [N, h] → {segment index: [1, index_topk] positions}; empty with
        fewer than `decode_select_min_rows` (at least two) such segments."""
        st = self.settings
        cfg, cache = st.cfg, st.cache
        topk, init, local = cfg.index_topk, cfg.index_init_tokens, cfg.index_local_tokens
        pool = cache.index_keys[lid]
        if cache.index_fp8:
            return {}
        segs = [
            i
            for i, (start, t) in enumerate(zip(self.starts, self.lengths))
            if t == 1
            and start + 1 > topk
            and not hi_active(cfg, start)
            and not self._use_bf16(q, pool, start - local + 1 - init)
            and not self._use_bf16_prefill(q, pool, start - local + 1 - init, 1)
        ]
        if len(segs) < max(2, st.decode_select_min_rows):
            return {}
        offs = [self.offsets[i] for i in segs]
        ends = [self.starts[i] - local + 1 for i in segs]  # dynamic region [init, end) per row
        row_pieces = [
            [(a, pool[r : r + m]) for a, r, m in cache.runs(self.blocks[i], init, end)]
            for i, end in zip(segs, ends)
        ]
        rows = torch.tensor(offs, device=q.device)
        scores = index_scan_rows(q[rows], w[rows], row_pieces, init, max(ends) - init, st.workspace)
        sel = lsa_rows(scores, self.positions[rows], topk, init, local)  # [R, topk]
        return {i: sel[j : j + 1] for j, i in enumerate(segs)}

    def attend(self, mla: MLA, p: MLAProjection, selection: Selection | None) -> torch.Tensor:
        """→ attention output before o_proj [1, N, h*v]."""
        cache, lid = self.settings.cache, self.settings.layer_ids[mla]
        plan = self._plan(selection)
        kv_pool, lat_pool, rope_pool = cache.kv[lid], cache.latent[lid], cache.rope[lid]
        q_nope, q_rope = p.q_nope[0], p.q_rope[0]  # [N, h, nope], [N, h, r]
        if plan.runs and plan.slots is None and not (plan.expanded or plan.long_rows or plan.windowed):
            # common CPU case (short dense decode): every segment attends over its runs in place
            return unabsorb(mla, self._run_attention(mla, plan.runs, absorb(mla, q_nope), q_rope))[None]
        if (
            plan.slots is not None
            and plan.rows is None
            and not (plan.expanded or plan.long_rows or plan.windowed)
        ):
            # common case (decode, LSA prefill): every row attends over explicit slots
            o_lat = gather_attention(
                absorb(mla, q_nope),
                q_rope,
                kv_pool,
                plan.slots,
                mla.softmax_scale,
                workspace=self.settings.workspace,
            )
            return unabsorb(mla, o_lat)[None]
        n = self.positions.shape[0]
        out = q_nope.new_empty(n, mla.num_heads * mla.v_dim)
        # latent queries only for the rows that attend in absorbed form (a mixed step's prefill rows go
        # through the expanded kernels: absorbing them too cost 12 % of a batch of 512-token prefills)
        for off, t, start, runs in plan.runs:
            sl = slice(off, off + t)
            o_lat = self._run_attention(mla, [(0, t, start, runs)], absorb(mla, q_nope[sl]), q_rope[sl])
            out[sl] = unabsorb(mla, o_lat).to(out.dtype)
        if plan.slots is not None:
            rows = plan.rows if plan.rows is not None else slice(None)
            o_lat = gather_attention(
                absorb(mla, q_nope[rows]),
                q_rope[rows],
                kv_pool,
                plan.slots,
                mla.softmax_scale,
                workspace=self.settings.workspace,
            )  # [R, h, c]
            out[rows] = unabsorb(mla, o_lat).to(out.dtype)
        cfg = self.settings.cfg
        for off, t, blocks, dyn in plan.windowed:
            for b0 in range(0, t, WINDOW_ROWS):  # (row blocks: see WINDOW_ROWS)
                b1 = min(t, b0 + WINDOW_ROWS)
                sl = slice(off + b0, off + b1)
                o_lat = window_attention(
                    absorb(mla, q_nope[sl]),
                    q_rope[sl],
                    kv_pool,
                    self.positions[sl],
                    lambda pos, blocks=blocks: cache.slots(blocks, pos),
                    dyn[b0:b1],
                    cfg.index_init_tokens,
                    cfg.index_local_tokens,
                    mla.softmax_scale,
                    workspace=self.settings.workspace,
                )  # [B, h, c]
                out[sl] = unabsorb(mla, o_lat).to(out.dtype)
        for off, t, blocks, start in plan.expanded:
            end = start + t
            lat = cache.read(lat_pool, blocks, 0, end).to(q_nope.dtype)  # [S, c]
            rope = cache.read(rope_pool, blocks, 0, end).to(q_nope.dtype)  # [S, r]
            sl = slice(off, off + t)
            kernel = self.settings.prefill_kernel
            if kernel == "auto":
                kernel = self._prefill_kernel(mla, lat)
            if kernel in ("onednn", "flash"):
                o = (dense_prefill_onednn if kernel == "onednn" else dense_prefill_flash)(
                    q_nope[sl],
                    q_rope[sl],
                    lat,
                    rope,
                    mla.kv_b_proj,
                    start,
                    mla.softmax_scale,
                    workspace=self.settings.workspace,
                )
            elif kernel == "tiled":
                o = dense_prefill_tiled(
                    q_nope[sl], q_rope[sl], lat, rope, mla.kv_b_proj, start, mla.softmax_scale
                )
            else:  # "plain": the reference (whole K/V expanded, query chunks)
                k, v = mla.expand(lat, rope)  # [S, h, qk], [S, h, v]
                q = torch.cat([q_nope[sl], q_rope[sl]], dim=-1)  # [T, h, qk]
                o = dense_prefill(q, k, v, start, mla.softmax_scale)
            out[sl] = o.reshape(t, -1).to(out.dtype)
        if plan.long_rows:
            long_rows = torch.tensor([row for row, _, _ in plan.long_rows], device=q_nope.device)
            q_latent = absorb(mla, q_nope[long_rows])  # [L, h, c]
        for i, (row, blocks, vis) in enumerate(plan.long_rows):
            pieces = [(lat_pool[r : r + m], rope_pool[r : r + m]) for _, r, m in cache.runs(blocks, 0, vis)]
            o_lat = dense_decode(q_latent[i], q_rope[row], pieces, mla.softmax_scale)  # [h, c]
            out[row] = unabsorb(mla, o_lat[None])[0]
        return out[None]

    # ------------------------------------------------------------------ helpers
    def _run_attention(
        self,
        mla: MLA,
        segs: list[tuple[int, int, int, list[tuple[int, int]]]],
        q_latent: torch.Tensor,
        q_rope: torch.Tensor,
    ) -> torch.Tensor:
        """Segments at row offsets of q_latent [N, h, c] / q_rope [N, h, r], each over its cached keys in
        place (`kernels.run_attention_segments`) → [N, h, c]. Per-sublayer work (the query concat, the
        scale, the output) happens once, not per segment: a decode step has a segment per sequence."""
        cache, lid = self.settings.cache, self.settings.layer_ids[mla]
        n, h, c = q_latent.shape
        q = torch.cat([q_latent, q_rope.to(q_latent.dtype)], dim=-1).view(n * h, -1)  # [N*h, c + r]
        kv = cache.kv[lid]  # [P, c + r]: latent | rope key per row
        # the softmax scale folded into the queries once per sublayer, not once per sequence
        q = (q.float() * mla.softmax_scale).to(kv.dtype)
        out = q.new_empty(n * h, c)
        run_attention_segments(q, kv, segs, out)
        return out.view(n, h, c)

    def _hi(
        self, lid: int, blocks: SeqBlocks, q: torch.Tensor, w: torch.Tensor, q_pos: torch.Tensor
    ) -> list[torch.Tensor]:
        """HI selection of ascending queries, in chunks whose coarse scores fit the score budget."""
        st = self.settings
        cfg, cache = st.cfg, st.cache
        n_pages = max(1, int(q_pos[-1]) // cfg.lsa_hi_page_size)
        chunk = max(1, min(st.score_budget, HI_SCORE_ELEMS) // n_pages)  # [rows, pages] coarse scores
        return [
            hi_rows(
                cache,
                lid,
                blocks,
                cfg,
                q[c0 : c0 + chunk],
                w[c0 : c0 + chunk],
                q_pos[c0 : c0 + chunk],
                st.score_budget,
                bf16_decode=st.index_mode != "exact",
            )
            for c0 in range(0, q_pos.numel(), chunk)
        ]

    @staticmethod
    def _prefill_kernel(mla: MLA, lat: torch.Tensor) -> str:
        """The "auto" dense prefill kernel (module doc): on CPU, per-head oneDNN GEMMs where oneDNN runs
        the dtype at its rate (fp32 where it beats the BLAS, bf16 on CPUs with native bf16 GEMMs); else,
        in fp32 on CPU, PyTorch's CPU flash op; otherwise the tiled kernel."""
        if onednn_prefill_ok(lat.dtype, lat.device):
            return "onednn"
        fits = mla.v_dim <= mla.nope + mla.rope  # (the flash op's V is padded to the QK head size)
        cpu_fp32 = lat.device.type == "cpu" and lat.dtype == torch.float32
        return "flash" if cpu_fp32 and fits and cpu_flash_available() else "tiled"

    def _use_bf16(self, q: torch.Tensor, pool: torch.Tensor, n_keys: int) -> bool:
        """Whether a decode row's scan of n_keys keys takes the bf16 two-pass scan. "auto" on a CPU: only
        from BF16_SCAN_MIN_KEYS_CPU keys on (below, its rescoring of the candidate keys costs more than
        the fp32 scan's slower GEMM saves: LongCat-2.0 dims, bf16, 8K-64K keys, 1.07-1.09x faster exact)."""
        mode = self.settings.index_mode
        if mode == "exact" or (mode == "auto" and q.device.type == "cpu" and n_keys < BF16_SCAN_MIN_KEYS_CPU):
            return False
        ok = q.dtype == torch.bfloat16 and pool.dtype == torch.bfloat16
        if mode == "bf16" and not ok:
            raise ValueError(
                "index_mode='bf16' needs a bf16 model (bf16 indexer queries) and bf16 index keys"
            )
        return ok

    def _use_bf16_prefill(self, q: torch.Tensor, pool: torch.Tensor, n_keys: int, n_rows: int) -> bool:
        """Whether n_rows prefill rows whose dynamic region has n_keys keys take the certified two-pass
        scan (`index_scan_bf16_rows`): bf16 queries and keys, index_mode "bf16", or "auto" from
        BF16_PREFILL_SCAN_MIN_KEYS keys and BF16_PREFILL_SCAN_MIN_ROWS rows on (many rows: the GEMMs are
        compute-bound, and bf16 runs them at ~2x the fp32 rate here; a decode row takes `_use_bf16`)."""
        mode = self.settings.index_mode
        if mode == "exact" or (
            mode == "auto" and (n_keys < BF16_PREFILL_SCAN_MIN_KEYS or n_rows < BF16_PREFILL_SCAN_MIN_ROWS)
        ):
            return False
        return q.dtype == torch.bfloat16 and pool.dtype == torch.bfloat16

    def _plan(self, sel: Selection | None) -> _Plan:
        """How each segment attends (shared by every sublayer that sees the same selection)."""
        key = id(sel) if sel is not None else 0
        hit = self.plans.get(key)
        if hit is not None and hit[0] is sel:  # (ids of dead selections can be reused: check identity)
            return hit[1]
        st = self.settings
        plan = _Plan()
        rows: list[tuple[int, int]] = []
        positions: list[tuple[SeqBlocks, torch.Tensor]] = []  # each row block's positions, as `rows`
        for i, (blocks, start, off, t) in enumerate(
            zip(self.blocks, self.starts, self.offsets, self.lengths)
        ):
            end = start + t
            s_sel = sel[i] if sel is not None else None
            if s_sel is not None:
                # queries at positions < index_topk select every key they see (`select`): those of a
                # segment that straddles index_topk attend in the expanded form when it is cheaper
                n_dense = max(0, min(t, st.cfg.index_topk - start))
                if n_dense < st.expanded_min_rows or not self._expanded_better(n_dense):
                    n_dense = 0
                if n_dense:
                    plan.expanded.append((off, n_dense, blocks, start))
                lsa = s_sel[n_dense:]  # [T', K]
                if n_dense < t and self._windowed(lsa, start + n_dense):
                    init, local = st.cfg.index_init_tokens, st.cfg.index_local_tokens
                    dyn = st.cache.slots(blocks, lsa[:, init : lsa.shape[1] - local])
                    plan.windowed.append((off + n_dense, t - n_dense, blocks, dyn))
                elif n_dense < t:
                    rows.append((off + n_dense, t - n_dense))
                    positions.append((blocks, lsa))
            elif t >= st.expanded_min_rows and self._expanded_better(t):
                plan.expanded.append((off, t, blocks, start))
            elif end <= st.dense_gather_max and st.short_kernel == "runs":
                runs = [(r, m) for _, r, m in st.cache.runs(blocks, 0, end)]
                plan.runs.append((off, t, start, runs))
            elif end <= st.dense_gather_max:
                rows.append((off, t))
                positions.append((blocks, dense_rows(self.positions[off : off + t], end)))
            else:
                plan.long_rows.extend((off + j, blocks, start + j + 1) for j in range(t))
        if rows:
            plan.slots = st.cache.slots_rows(positions)  # [R, K] (one lookup for every segment's rows)
            n_rows = sum(t for _, t in rows)
            if n_rows != self.positions.shape[0]:
                dev = self.positions.device
                plan.rows = torch.cat([torch.arange(o, o + t, device=dev) for o, t in rows])
        self.plans[key] = (sel, plan)
        return plan

    def _windowed(self, sel: torch.Tensor, first: int) -> bool:
        """Whether LSA rows at positions first.. with selection sel [T, K] take `window_attention`: enough
        rows, and every row is sink ∪ dynamic ∪ its local window (checked, not assumed: HI rows or another
        selection rule fall back to the gathered path)."""
        cfg = self.settings.cfg
        t, k = sel.shape
        init, local = cfg.index_init_tokens, cfg.index_local_tokens
        if t < self.settings.window_min_rows or local == 0 or k != cfg.index_topk or init + local >= k:
            return False
        dev = sel.device
        sink_ok = torch.equal(sel[:, :init], torch.arange(init, device=dev).expand(t, init))
        window = first + torch.arange(t, device=dev)[:, None] - local + 1 + torch.arange(local, device=dev)
        return sink_ok and torch.equal(sel[:, k - local :], window)

    def _expanded_better(self, t: int) -> bool:
        """Expanded MLA costs S·c·h·(nope+v) to expand keys plus T·S·h·(qk+v); absorbed T·S·h·(2c+r)."""
        cfg = self.settings.cfg
        c, r, nope, v = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        return t * (2 * c + r) > c * (nope + v) + t * (nope + r + v)
