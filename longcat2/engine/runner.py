"""Model runner: one forward pass of the model over a flat batch of token segments against the paged cache.

A step is a list of `Segment`s, one per sequence: T new tokens at positions start .. start+T-1 of that
sequence (T = 1 for decode, T = chunk for prefill, T = drafts + 1 for speculative verification). All
segments run as one flat [1, N, H] batch through the model's own modules; only attention looks at segments
separately, through the step's `StepContext` (context.py) that the model's MLA stores into and attends over.

Design choices:
- The runner does scheduling-side work only: reserve cache blocks, build the step context (positions,
  slots, segment layout), embed (the model's `embed`, N-gram history from each sequence's token list so it
  survives chunk and step boundaries and speculative rollback), call the model's decoder stack / MTP layer
  with the context, and apply the final norm + lm_head to the rows that need logits. There is no layer
  math here: training, evaluation and the engine run the same module code.
- The whole cached path is tested against the model's full forward (decode, chunked prefill, MTP).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from longcat2.config import ModelConfig
from longcat2.engine.cache import PagedKVCache, SeqBlocks, index_dtype_of
from longcat2.engine.context import AttentionSettings, Selection, StepContext
from longcat2.engine.cpu import (
    Bf16MatmulViaFp32,
    bf16_matmul_via_fp32,
    keep_freed_memory,
    route_cpu_linears,
)
from longcat2.model.attention import MLA


@dataclass
class SeqState:
    """Everything the runner keeps per sequence."""

    blocks: SeqBlocks
    tokens: list[int] = field(default_factory=list)  # the sequence so far (prompt + accepted output)
    mtp_len: int = 0  # MTP cache holds exact step-1 entries for positions < mtp_len


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
        index_dtype: torch.dtype | str | None = None,
        index_rotate: bool | None = None,
        index_mode: str = "auto",
        score_budget: int = 1 << 24,
        expanded_min_rows: int = 32,
        dense_gather_max: int = 4096,
        short_kernel: str | None = None,
    ) -> None:
        """index_mode: "exact" (fp32 scan) | "bf16" (bf16 GEMM scan + exact rescoring, decode and prefill
        rows with bf16 queries and keys; the same selection as "exact") | "auto" (bf16 when the indexer runs
        in bf16 on a device with a native bf16 GEMM, on CPU from context.BF16_SCAN_MIN_KEYS_CPU keys for
        a decode row and context.BF16_PREFILL_SCAN_MIN_KEYS for prefill rows; else exact: on CPUs where
        bf16 matmuls run as fp32 calls the bf16 pass saves nothing). index_dtype: the
        index-key cache ("bf16", "fp8" = e4m3 + fp32 scale per token, a torch dtype, None = cache_dtype);
        index_rotate: Hadamard-rotate index keys and queries (None: with fp8 keys). The HI page summaries
        exist when the model config turns HI on (`lsa_hi`). short_kernel: how short dense segments attend
        ("runs": in place over the cache's runs, "gather": one batched gather; None: "runs" on CPU). Prefix caching is
        off until the owner sets `cache.prefix_cache_blocks` (the Engine sizes it from bytes)."""
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
            index_dtype=index_dtype_of(index_dtype),
            hi_block=self.cfg.lsa_hi_block_size if self.cfg.lsa_hi and self.cfg.use_lsa else 0,
            index_rotate=(index_dtype_of(index_dtype) == torch.float8_e4m3fn)
            if index_rotate is None
            else index_rotate,
        )
        if index_mode not in ("auto", "exact", "bf16"):
            raise ValueError(f"index_mode: one of auto/exact/bf16, got {index_mode!r}")
        # bf16 model on a CPU without a native bf16 GEMM: matmuls as fp32 BLAS calls (see cpu.py)
        bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
        self.bf16_via_fp32 = self.device.type == "cpu" and bf16 and bf16_matmul_via_fp32()
        # decode rows' products streamed by the C kernel, fp32 ones through oneDNN where the BLAS is the
        # slower fp32 GEMM (see cpu.py)
        self.cpu_linears = 0
        if self.device.type == "cpu":
            self.cpu_linears = route_cpu_linears(model)
            keep_freed_memory()  # a step's MB-sized temporaries reuse memory, not fresh pages (see cpu.py)
        if index_mode == "auto" and self.bf16_via_fp32:
            # no bf16 GEMM: the two-pass scan's bf16 pass would itself run as fp32 BLAS calls, so its
            # rounding and rescoring only add work (LongCat-2.0 dims at 1M, one layer, the two runs of
            # bench/run_all.sh: LSA 196 → 189 ms, LSA+HI 177 → 78 ms; BENCHMARKS.md)
            index_mode = "exact"
        inner = model.model
        layer_ids: dict[MLA, int] = {}
        for li, layer in enumerate(inner.layers):  # cache layer 2i + j = sublayer j of decoder layer i
            for j, mla in enumerate(layer.self_attn):
                layer_ids[mla] = 2 * li + j
        if with_mtp and inner.mtp is not None:  # then one cache layer per MTP module
            for m, mtp_layer in enumerate(inner.mtp.layers):
                layer_ids[mtp_layer.self_attn] = 2 * self.cfg.num_layers + m
        if short_kernel is None:  # in place on CPUs, one batched gather elsewhere (see context.py)
            short_kernel = "runs" if self.device.type == "cpu" else "gather"
        if short_kernel not in ("runs", "gather"):
            raise ValueError(f"short_kernel: 'runs' or 'gather', got {short_kernel!r}")
        self.attention = AttentionSettings(
            self.cache,
            self.cfg,
            layer_ids,
            index_mode,
            score_budget,
            expanded_min_rows,
            dense_gather_max,
            short_kernel=short_kernel,
        )
        self.with_mtp = with_mtp and model.model.mtp is not None
        self.ngram_ctx = self.cfg.oe_neighbor_num - 1 if self.cfg.use_ngram else 0

    def _compute(self) -> contextlib.AbstractContextManager:
        return Bf16MatmulViaFp32() if self.bf16_via_fp32 else contextlib.nullcontext()

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
    def _context(self, segments: list[Segment]) -> StepContext:
        """Reserve cache blocks for the segments and lay out the step's rows."""
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
        return StepContext(
            self.attention,
            [seg.seq.blocks for seg in segments],
            [seg.start for seg in segments],
            offsets,
            lengths,
            torch.tensor(pos, device=dev),
            torch.tensor(slots, device=dev),
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
        with self._compute():
            emb = self._embed(segments, ctx.lengths)[None]  # [1, N, H]
            h = self.model.model(None, ctx.positions, cache=ctx, inputs_embeds=emb)[0]  # [1, N, H]
            for seg, t in zip(segments, ctx.lengths):
                seg.seq.blocks.num_tokens = seg.start + t
            hidden = h[0]
            logits = self._logits(hidden, segments, ctx, self.model.model.norm)
        return StepOutput(hidden, logits, ctx.offsets)

    def _logits(
        self, hidden: torch.Tensor, segments: list[Segment], ctx: StepContext, norm: nn.Module
    ) -> list:
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
        if len(rows) < hidden.shape[0]:  # (decode steps need every row: no gather)
            hidden = hidden[torch.tensor(rows, device=hidden.device)]
        logits = self.model.lm_head(norm(hidden))  # [R, V]
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
        ctx = self._context(segments)
        with self._compute():
            emb = mtp.embed_tokens(torch.cat([s.tokens for s in segments]).to(self.device))[None]  # [1, N, H]
            cos, sin = self.model.model.rotary_emb(ctx.positions, emb.dtype)
            x, sel = mtp.layers[module](
                emb, hidden_prev[None], cos, sin, ctx.positions, shared, shared is not None, ctx
            )
            hidden = x[0]
            logits = self._logits(hidden, segments, ctx, mtp.norm)
        return StepOutput(hidden, logits, ctx.offsets, sel)
