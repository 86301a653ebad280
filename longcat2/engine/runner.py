"""Model runner: one forward pass over a flat batch of token segments against the paged cache.

A step is a list of `Segment`s, one per sequence: T new tokens at positions start .. start+T-1 of that
sequence (T = 1 for decode, T = chunk for prefill, T = drafts + 1 for speculative verification). All
segments run as one flat [1, N, H] batch through the embedding, norms, projections, MLPs and MoE; only
attention looks at segments separately.

Design choices:
- The runner composes the model's own modules and weights in the order of `DecoderLayer.forward` (and
  `MTPLayer.forward`), so the no-cache model code is untouched; the few hot pieces it re-implements with
  fewer dispatched ops (RMSNorm via `F.rms_norm`, `MLA.project`, the indexer's keys/queries, RoPE with
  per-step cos/sin) are bitwise equal to the modules, and the whole cached path is tested against the
  model's full forward (decode, chunked prefill, MTP).
- Per attention sublayer: project the new tokens, write their latent (+ indexer key for an owner) into the
  cache, then attend. Owners select per query; the consumer sublayer reuses the owner's selection (CLI).
  Per segment the regime is chosen like the model: dense when every query of the segment sees <=
  index_topk keys (or the model has no LSA), else per-query top-k (queries that still see <= index_topk
  keys get all of them, as in the model's selection).
- Attention forms: selected keys (sparse rows, and short dense rows) go through one batched gather +
  absorbed MLA call for the whole step (`kernels.gather_attention`: the model's sparse core on the pool);
  dense segments with many queries (prefill without LSA, or within index_topk) use the expanded form
  (`kernels.dense_prefill`: K/V expanded through kv_b_proj, chunked causal matmul-softmax-matmul) when it
  is cheaper in FLOPs; long dense decode rows use the online-softmax kernel over the cache's contiguous
  runs (`kernels.dense_decode`).
- Selection never builds [T, S] masks: only the dynamic region is scored (see kernels.py), in query chunks
  bounded by `score_budget` elements, so prefill memory stays bounded for 1M-token contexts.
- N-gram history: the n-1 tokens before a segment come from the sequence's token list, so they survive
  chunk and step boundaries and speculative rollback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from longcat2.config import ModelConfig
from longcat2.engine.cache import PagedKVCache, SeqBlocks
from longcat2.engine.kernels import (
    dense_decode,
    dense_prefill,
    dense_rows,
    gather_attention,
    index_scan,
    index_scan_select_bf16,
    lsa_rows,
)
from longcat2.model.attention import MLA, MLAProjection
from longcat2.model.layers import RMSNorm

Selection = list[torch.Tensor | None]  # per segment: selected positions [T, K] (-1 = empty) or None (dense)


@dataclass
class SeqState:
    """Everything the runner keeps per sequence."""

    blocks: SeqBlocks
    tokens: list[int] = field(default_factory=list)  # the sequence so far (prompt + accepted output)
    mtp_len: int = 0  # MTP cache holds exact step-1 entries for positions < mtp_len

    @property
    def num_cached(self) -> int:
        return self.blocks.num_tokens


@dataclass
class Segment:
    seq: SeqState
    tokens: torch.Tensor  # [T] int64: the tokens at positions start .. start+T-1
    start: int
    logits: str = "last"  # "last" | "all" | "none"


@dataclass
class StepOutput:
    hidden: torch.Tensor  # [N, H] last-layer output (pre final norm), all rows
    logits: list[torch.Tensor | None]  # per segment: [1, V] ("last"), [T, V] ("all") or None
    offsets: list[int]  # row offset of each segment in `hidden`
    selection: Selection | None = None  # MTP: the step's owner selection (for draft steps)


@dataclass
class _Ctx:
    segments: list[Segment]
    offsets: list[int]
    lengths: list[int]
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N]
    cos: torch.Tensor
    sin: torch.Tensor
    rope: _Rope
    plans: dict[int, tuple[Selection | None, _Plan]] = field(default_factory=dict)


@dataclass
class _Plan:
    rows: torch.Tensor | None = None  # query rows that attend over explicit slots (None: all rows)
    slots: torch.Tensor | None = None  # [R, K] pool rows per query, -1 = empty
    expanded: list[tuple[int, int, Segment]] = field(default_factory=list)  # (row offset, T, segment)
    long_rows: list[tuple[int, Segment, int]] = field(default_factory=list)  # (row, segment, visible keys)


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        *,
        block_size: int = 256,
        num_blocks: int = 16,
        max_blocks: int | None = None,
        with_mtp: bool = False,
        cache_dtype: torch.dtype | None = None,
        index_dtype: torch.dtype | None = None,
        index_mode: str = "auto",
        score_budget: int = 1 << 24,
        expanded_min_rows: int = 32,
        dense_gather_max: int = 4096,
        prefix_cache_blocks: int = 0,
    ) -> None:
        """index_mode: "exact" (fp32 scan) | "bf16" (bf16 GEMM scan + exact rescoring, decode rows with
        bf16 queries and keys) | "auto" (bf16 when the indexer runs in bf16, else exact).
        prefix_cache_blocks: unreferenced full blocks the prefix cache may keep (0: no prefix caching)."""
        self.model = model
        self.cfg: ModelConfig = model.config
        self.device = next(model.parameters()).device
        self.cache = PagedKVCache.for_model(
            model,
            device=self.device,
            with_mtp=with_mtp,
            dtype=cache_dtype,
            block_size=block_size,
            num_blocks=num_blocks,
            max_blocks=max_blocks,
            index_dtype=index_dtype,
            prefix_cache_blocks=prefix_cache_blocks,
        )
        if index_mode not in ("auto", "exact", "bf16"):
            raise ValueError(f"index_mode: one of auto/exact/bf16, got {index_mode!r}")
        self.index_mode = index_mode
        self.score_budget = score_budget
        self.expanded_min_rows = expanded_min_rows
        self.dense_gather_max = dense_gather_max
        self.num_main = 2 * self.cfg.num_layers
        self.with_mtp = with_mtp and model.model.mtp is not None
        self.ngram_ctx = self.cfg.oe_neighbor_num - 1 if self.cfg.use_ngram else 0

    # ------------------------------------------------------------------ sequences
    def new_sequence(self, tokens: list[int] | None = None) -> SeqState:
        return SeqState(blocks=self.cache.new_sequence(), tokens=list(tokens or []))

    def attach_prefix(self, seq: SeqState) -> int:
        """Reuse the longest cached block-aligned prefix of a new sequence's tokens (prefix caching).
        → the number of positions reused; the MTP cache is exact for all of them."""
        n = self.cache.attach_prefix(seq.blocks, seq.tokens, need_mtp=self.with_mtp)
        seq.mtp_len = n
        return n

    def commit(self, seq: SeqState) -> None:
        """Offer the sequence's completed blocks to the prefix cache."""
        self.cache.commit(seq.blocks, seq.tokens, seq.mtp_len if self.with_mtp else 0)

    def free(self, seq: SeqState) -> None:
        self.cache.release(seq.blocks)
        seq.mtp_len = 0

    def truncate(self, seq: SeqState, num_tokens: int) -> None:
        """Forget cached positions >= num_tokens (speculative rollback); blocks stay allocated."""
        seq.blocks.num_tokens = min(seq.blocks.num_tokens, num_tokens)
        seq.mtp_len = min(seq.mtp_len, num_tokens)

    # ------------------------------------------------------------------ context
    def _context(self, segments: list[Segment]) -> _Ctx:
        offsets, lengths = [], []
        pos: list[int] = []
        slots: list[int] = []
        n = 0
        bs = self.cache.block_size
        for seg in segments:
            t = int(seg.tokens.shape[0])
            self.cache.reserve(seg.seq.blocks, seg.start + t)
            blocks = seg.seq.blocks.blocks
            rng = range(seg.start, seg.start + t)
            pos.extend(rng)
            slots.extend(blocks[p // bs] * bs + p % bs for p in rng)
            offsets.append(n)
            lengths.append(t)
            n += t
        dev = self.cache.device
        positions = torch.tensor(pos, device=dev)
        cos, sin = self.model.model.rotary_emb(positions)
        return _Ctx(
            segments, offsets, lengths, positions, torch.tensor(slots, device=dev), cos, sin, _Rope(cos, sin)
        )

    def _history(self, seq: SeqState, start: int) -> list[int]:
        c = self.ngram_ctx
        h = seq.tokens[max(0, start - c) : start]
        return [-1] * (c - len(h)) + h

    def _embed(self, segments: list[Segment], lengths: list[int]) -> torch.Tensor:
        """→ [N, H]; segments of equal length share one embedding call (decode rows batch together)."""
        m = self.model.model
        if m.ngram_embeddings is None:
            return m.embed_tokens(torch.cat([s.tokens for s in segments]).to(self.device))
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(lengths):
            groups.setdefault(t, []).append(i)
        parts: list[torch.Tensor | None] = [None] * len(segments)
        for idx in groups.values():
            ids = torch.stack([segments[i].tokens for i in idx]).to(self.device)  # [B, T]
            hist = torch.tensor(
                [self._history(segments[i].seq, segments[i].start) for i in idx], device=self.device
            )
            emb = m.embed(ids, hist)  # [B, T, H]
            for j, i in enumerate(idx):
                parts[i] = emb[j]
        return torch.cat(parts)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ main model
    @torch.inference_mode()
    def forward(self, segments: list[Segment]) -> StepOutput:
        ctx = self._context(segments)
        h = self._embed(segments, ctx.lengths)[None]  # [1, N, H]
        for li, layer in enumerate(self.model.model.layers):
            attn0, sel = self._attention(
                layer.self_attn[0], 2 * li, _norm(layer.input_layernorm[0], h), ctx, None
            )
            a0 = h + attn0
            x0 = _norm(layer.post_attention_layernorm[0], a0)
            moe = layer.mlp(x0)
            m0 = a0 + layer.mlps[0](x0)
            attn1, _ = self._attention(
                layer.self_attn[1], 2 * li + 1, _norm(layer.input_layernorm[1], m0), ctx, sel
            )
            a1 = m0 + attn1
            h = a1 + layer.mlps[1](_norm(layer.post_attention_layernorm[1], a1)) + moe
        for seg, t in zip(segments, ctx.lengths):
            seg.seq.blocks.num_tokens = seg.start + t
        hidden = h[0]
        return StepOutput(hidden, self._logits(hidden, segments, ctx, self.model.model.norm), ctx.offsets)

    def _logits(self, hidden: torch.Tensor, segments: list[Segment], ctx: _Ctx, norm: nn.Module) -> list:
        rows, spans = [], []
        for seg, off, t in zip(segments, ctx.offsets, ctx.lengths):
            if seg.logits == "last":
                spans.append((len(rows), 1))
                rows.append(off + t - 1)
            elif seg.logits == "all":
                spans.append((len(rows), t))
                rows.extend(range(off, off + t))
            else:
                spans.append(None)
        if not rows:
            return [None] * len(segments)
        logits = self.model.lm_head(_norm(norm, hidden[torch.tensor(rows, device=hidden.device)]))  # [R, V]
        return [None if s is None else logits[s[0] : s[0] + s[1]] for s in spans]

    # ------------------------------------------------------------------ MTP head
    @torch.inference_mode()
    def mtp_forward(
        self,
        segments: list[Segment],
        hidden_prev: torch.Tensor,
        module: int = 0,
        shared: Selection | None = None,
    ) -> StepOutput:
        """One MTP step: row i combines hidden_prev[i] (state at position p) with the embedding of
        segments' token (token p+1) at RoPE position p, writes the MTP cache entry of position p, and
        predicts token p+2. `shared`: reuse this selection instead of running the MTP indexer."""
        mtp = self.model.model.mtp
        layer = mtp.layers[module]
        ctx = self._context(segments)
        emb = mtp.embed_tokens(torch.cat([s.tokens for s in segments]).to(self.device))[None]  # [1, N, H]
        x = layer.eh_proj(torch.cat([layer.enorm(emb), layer.hnorm(hidden_prev[None])], dim=-1))
        a, sel = self._attention(
            layer.self_attn,
            self.num_main + module,
            _norm(layer.input_layernorm, x),
            ctx,
            shared,
            reuse=shared is not None,
        )
        x = x + a
        x = x + layer.transformer_layer.mlp(_norm(layer.post_attention_layernorm, x))
        hidden = x[0]
        out = StepOutput(hidden, self._logits(hidden, segments, ctx, mtp.norm), ctx.offsets, sel)
        return out

    # ------------------------------------------------------------------ attention
    def _attention(
        self,
        mla: MLA,
        lid: int,
        x: torch.Tensor,
        ctx: _Ctx,
        shared: Selection | None,
        reuse: bool = False,
    ) -> tuple[torch.Tensor, Selection | None]:
        """x [1, N, H] (normed attention input) → (o_proj output [1, N, H], selection)."""
        p = _project(mla, x, ctx.rope)
        self.cache.write(lid, ctx.slots, p.kv_latent[0], p.k_rope[0])
        sel = shared
        idx = mla.indexer
        if idx is not None:
            keys = ctx.rope.apply(_norm(idx.k_norm, F.linear(x, idx.wk.weight)), idx.rope_dim, idx.interleave)
            self.cache.write_index(lid, ctx.slots, keys[0])  # [N, d]
            if not reuse:
                n = x.shape[1]
                q = F.linear(p.q_lora, idx.wq_b.weight).view(1, n, idx.n_heads, idx.head_dim)
                q = ctx.rope.apply(q, idx.rope_dim, idx.interleave)  # [1, N, h, d]
                w = F.linear(x, idx.weights_proj.weight).float() * idx.weight_scale  # [1, N, h]
                sel = self._select(lid, q[0], w[0], ctx)
        out = self._attend(mla, lid, p, sel, ctx)
        return mla.o_proj(out), sel

    def _select(self, lid: int, q: torch.Tensor, w: torch.Tensor, ctx: _Ctx) -> Selection:
        cfg = self.cfg
        topk, init, local = cfg.index_topk, cfg.index_init_tokens, cfg.index_local_tokens
        pool = self.cache.index_keys[lid]
        out: Selection = []
        for seg, off, t in zip(ctx.segments, ctx.offsets, ctx.lengths):
            end = seg.start + t
            if end <= topk:
                out.append(None)  # every query sees <= topk keys: dense
                continue
            q_pos = ctx.positions[off : off + t]
            rows = []
            n_dense = max(0, min(t, topk - seg.start))  # queries at positions < topk see <= topk keys
            if n_dense:
                rows.append(dense_rows(q_pos[:n_dense], topk))
            qs, ws, ps = q[off + n_dense : off + t], w[off + n_dense : off + t], q_pos[n_dense:]
            if ps.numel() == 1 and self._use_bf16(q, pool):
                # decode: bf16 GEMM scan + exact rescoring (same indices as the fp32 scan)
                qp = int(ps[0])
                lo, hi = init, qp - local + 1
                pieces = [(a, pool[r : r + m]) for a, r, m in self.cache.runs(seg.seq.blocks, lo, hi)]
                kd = topk - init - local
                dyn = index_scan_select_bf16(
                    qs[0], ws[0], pieces, lo, hi, kd, self.cache.index_key_max_norm[lid]
                )
                sink = torch.arange(init, device=dyn.device)
                loc = torch.arange(qp - local + 1, qp + 1, device=dyn.device)
                rows.append(torch.cat([sink, dyn, loc])[None])
            else:
                chunk = max(1, self.score_budget // max(1, int(ps[-1]) if ps.numel() else 1))
                for c0 in range(0, ps.numel(), chunk):
                    pc = ps[c0 : c0 + chunk]
                    lo, hi = init, int(pc[-1]) - local + 1  # dynamic region of the chunk's last query
                    pieces = [(a, pool[r : r + m]) for a, r, m in self.cache.runs(seg.seq.blocks, lo, hi)]
                    scores = index_scan(qs[c0 : c0 + chunk], ws[c0 : c0 + chunk], pieces, lo, hi)
                    rows.append(lsa_rows(scores, pc, topk, init, local))
            out.append(torch.cat(rows) if len(rows) > 1 else rows[0])
        return out

    def _use_bf16(self, q: torch.Tensor, pool: torch.Tensor) -> bool:
        if self.index_mode == "exact":
            return False
        ok = q.dtype == torch.bfloat16 and pool.dtype == torch.bfloat16
        if self.index_mode == "bf16" and not ok:
            raise ValueError(
                "index_mode='bf16' needs a bf16 model (bf16 indexer queries) and bf16 index keys"
            )
        return ok

    def _plan(self, sel: Selection | None, ctx: _Ctx) -> _Plan:
        """How each segment attends (shared by every sublayer that sees the same selection)."""
        key = id(sel) if sel is not None else 0
        hit = ctx.plans.get(key)
        if hit is not None and hit[0] is sel:  # (ids of dead selections can be reused: check identity)
            return hit[1]
        plan = _Plan()
        rows, slots = [], []
        for i, (seg, off, t) in enumerate(zip(ctx.segments, ctx.offsets, ctx.lengths)):
            end = seg.start + t
            s_sel = sel[i] if sel is not None else None
            if s_sel is not None:
                rows.append((off, t))
                slots.append(self.cache.slots(seg.seq.blocks, s_sel))
            elif t >= self.expanded_min_rows and self._expanded_better(t):
                plan.expanded.append((off, t, seg))
            elif end <= self.dense_gather_max:
                rows.append((off, t))
                slots.append(self.cache.slots(seg.seq.blocks, dense_rows(ctx.positions[off : off + t], end)))
            else:
                plan.long_rows.extend((off + j, seg, seg.start + j + 1) for j in range(t))
        if rows:
            width = max(x.shape[1] for x in slots)
            if any(x.shape[1] != width for x in slots):
                slots = [nn.functional.pad(x, (0, width - x.shape[1]), value=-1) for x in slots]
            plan.slots = torch.cat(slots) if len(slots) > 1 else slots[0]  # [R, K]
            n_rows = sum(t for _, t in rows)
            if n_rows != ctx.positions.shape[0]:
                plan.rows = torch.cat([torch.arange(o, o + t, device=self.device) for o, t in rows])
        ctx.plans[key] = (sel, plan)
        return plan

    def _attend(self, mla: MLA, lid: int, p: MLAProjection, sel: Selection | None, ctx: _Ctx) -> torch.Tensor:
        """→ attention output before o_proj [1, N, h*v]."""
        h, v = mla.num_heads, mla.v_dim
        plan = self._plan(sel, ctx)
        lat_pool, rope_pool = self.cache.latent[lid], self.cache.rope[lid]
        w_uk, w_uv = mla._kv_b_halves()  # [h, nope, c], [h, v, c]
        q_nope, q_rope = p.q_nope[0], p.q_rope[0]  # [N, h, nope], [N, h, r]
        if plan.slots is not None and plan.rows is None and not plan.expanded and not plan.long_rows:
            # common case (decode, LSA prefill): every row attends over explicit slots
            q_latent = torch.matmul(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [N, h, c]
            o_lat = gather_attention(q_latent, q_rope, lat_pool, rope_pool, plan.slots, mla.softmax_scale)
            out = torch.matmul(o_lat.transpose(0, 1), w_uv.transpose(1, 2))  # [h, N, v]
            return out.transpose(0, 1).reshape(1, -1, h * v)
        n = ctx.positions.shape[0]
        out = q_nope.new_empty(n, h * v)
        if plan.slots is not None or plan.long_rows:
            q_latent = torch.matmul(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [N, h, c]
        if plan.slots is not None:
            rows = plan.rows if plan.rows is not None else slice(None)
            o_lat = gather_attention(
                q_latent[rows], q_rope[rows], lat_pool, rope_pool, plan.slots, mla.softmax_scale
            )  # [R, h, c]
            o = torch.matmul(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [R, h, v]
            out[rows] = o.reshape(-1, h * v).to(out.dtype)
        for off, t, seg in plan.expanded:
            end = seg.start + t
            lat = self.cache.read(lat_pool, seg.seq.blocks, 0, end).to(q_nope.dtype)  # [S, c]
            rope = self.cache.read(rope_pool, seg.seq.blocks, 0, end).to(q_nope.dtype)  # [S, r]
            kv = F.linear(lat, mla.kv_b_proj.weight).view(end, h, mla.nope + v)
            k_nope, vv = kv.split([mla.nope, v], dim=-1)
            k = torch.cat([k_nope, rope[:, None, :].expand(-1, h, -1)], dim=-1)  # [S, h, qk]
            sl = slice(off, off + t)
            q = torch.cat([q_nope[sl], q_rope[sl]], dim=-1)  # [T, h, qk]
            out[sl] = dense_prefill(q, k, vv, seg.start, mla.softmax_scale).reshape(t, h * v).to(out.dtype)
        for row, seg, vis in plan.long_rows:
            pieces = [
                (lat_pool[r : r + m], rope_pool[r : r + m])
                for _, r, m in self.cache.runs(seg.seq.blocks, 0, vis)
            ]
            o_lat = dense_decode(q_latent[row], q_rope[row], pieces, mla.softmax_scale)  # [h, c]
            out[row] = torch.matmul(o_lat.to(w_uv.dtype)[:, None, :], w_uv.transpose(1, 2)).reshape(h * v)
        return out[None]

    def _expanded_better(self, t: int) -> bool:
        """Expanded MLA costs S·c·h·(nope+v) to expand keys plus T·S·h·(qk+v); absorbed T·S·h·(2c+r)."""
        cfg = self.cfg
        c, r, nope, v = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        return t * (2 * c + r) > c * (nope + v) + t * (nope + r + v)


# ---------------------------------------------------------------------- module fast paths
# The same maths as the model's modules with fewer dispatched ops per call (a decode step is overhead-bound
# on CPU); bitwise equal to the modules for fp32 and bf16 (checked by the parity tests).


def _norm(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm(x) as `layers.RMSNorm` computes it (fp32 normalisation, cast, then the weight)."""
    if type(mod) is RMSNorm:
        if x.dtype == torch.float32 and mod.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), mod.weight, mod.eps)
        return mod.weight * F.rms_norm(x.float(), (x.shape[-1],), None, mod.eps).to(x.dtype)
    return mod(x)


class _Rope:
    """cos/sin of one step, cast and shaped once for every layer (`layers.apply_rope` semantics)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin
        self._cache: dict[tuple[torch.dtype, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _cs(self, dtype: torch.dtype, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, dim)
        if key not in self._cache:
            c, s = self.cos.to(dtype), self.sin.to(dtype)
            if dim == 4:
                c, s = c.unsqueeze(-2), s.unsqueeze(-2)
            self._cache[key] = (c, s)
        return self._cache[key]

    def rotate(self, x: torch.Tensor, interleave: bool = True) -> torch.Tensor:
        c, s = self._cs(x.dtype, x.dim())
        if interleave:
            a, b = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            a, b = x[..., :half], x[..., half:]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    def apply(self, x: torch.Tensor, rope_dim: int, interleave: bool) -> torch.Tensor:
        """Rotate the first rope_dim dims of x (the indexer layout)."""
        if x.shape[-1] == rope_dim:
            return self.rotate(x, interleave)
        return torch.cat([self.rotate(x[..., :rope_dim], interleave), x[..., rope_dim:]], dim=-1)


def _project(mla: MLA, x: torch.Tensor, rope: _Rope) -> MLAProjection:
    """`MLA.project` (x [1, N, H])."""
    b, t, _ = x.shape
    q_lora = _norm(mla.q_a_layernorm, F.linear(x, mla.q_a_proj.weight, mla.q_a_proj.bias))
    q = F.linear(q_lora, mla.q_b_proj.weight).view(b, t, mla.num_heads, mla.nope + mla.rope) * mla.q_scale
    q_nope, q_rope = q.split([mla.nope, mla.rope], dim=-1)
    kv = F.linear(x, mla.kv_a_proj_with_mqa.weight, mla.kv_a_proj_with_mqa.bias)
    kv_latent, k_rope = kv.split([mla.kv_lora_rank, mla.rope], dim=-1)
    kv_latent = _norm(mla.kv_a_layernorm, kv_latent) * mla.kv_scale
    return MLAProjection(q_nope, rope.rotate(q_rope), kv_latent, rope.rotate(k_rope), q_lora)
