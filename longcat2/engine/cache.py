"""Paged latent cache: MLA latents and LSA indexer keys for many sequences in one shared pool.

Design choices:
- What is cached is what MLA needs in absorbed form and nothing more: per attention sublayer the normalised,
  α_kv-scaled latent `c_kv` [kv_lora_rank] and the rotated `k_rope` [qk_rope_head_dim] of every token, side
  by side in one [capacity, c + r] tensor per sublayer (`kv`; `latent` and `rope` are its column views):
  the in-place attention over cached runs scores a query against both with one GEMM
  (`kernels.run_attention`); gathers read the views (index_select is as fast on them); per indexer owner (sublayer
  0 of a layer under CLI, both sublayers without it, and each MTP module with LSA) the indexer key
  [index_head_dim]. Per-head K/V are never materialised in the cache.
- Storage is paged: every layer's tensor is a flat pool of `capacity = num_blocks * block_size` rows, and a
  sequence owns a list of blocks (its block table). Token at position p of a sequence lives in pool row
  `block_table[p // block_size] * block_size + p % block_size` (its *slot*) in every layer at once, so one
  slot mapping per step serves all layers, and selected positions map to slots the same way.
- Blocks are allocated contiguously when possible: a sequence first tries the blocks right after its last
  block, a multi-block request first looks for a free run, and a request that says how long it may get
  looks for a free run with room after it to grow into, so that its decode blocks extend the run. Readers
  then see a sequence as a few contiguous *runs* of rows and can scan them as views: the indexer scan and
  dense decode read keys and latents in place, with no gather, whenever the block table is contiguous
  (always for a single sequence).
- The pool grows by doubling (a copy) when it runs out of blocks, so callers need no capacity planning;
  `max_blocks` caps it (a `CacheFull` error is raised rather than swapping).
- The cache stores whatever dtype it is given (fp32 for tests, bf16 to halve bytes); indexer keys may use
  their own dtype (`index_dtype`). FP8 index keys (`index_dtype=torch.float8_e4m3fn`) are stored as e4m3
  values with one fp32 scale per token, 132 B/token at LongCat-2.0's 128 dims as in the reference
  engines; `index_rotate` first applies the orthogonal (normalised Sylvester) Hadamard rotation to the
  keys, and selection rotates the queries the same way (q·k is unchanged, outliers are spread before
  quantisation). The scale is not simply amax / 448: of 32 scales in the binade above it, each token keeps
  the one with the least round-trip error (`quantize_fp8`; with 16-dim keys a quarter less error, which
  fp8-vs-bf16 selection overlap needs). Readers dequantise on the fly (`dequant_index`), a block of keys
  at a time.
- Hierarchical indexing (`hi_block` > 0): per indexer owner a summary pool holds, for every complete
  sub-block of `hi_block` tokens, the mean of its (dequantised, rotated) index keys, at row slot // hi_block
  (block_size is a multiple of hi_block, so a sub-block never straddles two cache blocks). `update_summaries`
  computes a sub-block's mean once, when its last token is written (decode, chunked prefill alike), from the
  cached keys in a fixed order, so the summaries are bit-identical however the sequence was chunked and are
  never rebuilt. Incomplete sub-blocks have no summary: they are always inside the forced local window.
- Prefix caching (`prefix_cache_blocks` > 0): a full block's key is blake2b(parent key | its token ids), so
  equal keys mean equal prefixes, and every entry derived from the prefix (latent, rope key and index key of
  every layer; the N-gram state is a function of the tokens) can be reused by another sequence. Only full
  blocks are shared, and a sequence never writes below the prefix it reused, so shared blocks are read-only
  and need no copy-on-write. Blocks carry reference counts; at zero a keyed block stays cached on an LRU list,
  at most `prefix_cache_blocks` of them, and is evicted (least recently used first) when that budget is
  exceeded or when the pool cannot grow. A lookup never returns the block holding a prompt's last token
  (its logits must be computed).
- MTP entries: the MTP entry of position p depends on token p+1, so a block's last entry depends on the
  next block's first token. A block is marked MTP-exact once its owner's exact MTP entries cover it, and a
  lookup for a speculative engine stops at the first unmarked block and drops the last matched one, whose
  next token may differ: every reused position then has an exact MTP entry.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from longcat2.config import ModelConfig


class CacheFull(RuntimeError):
    """The pool has no free blocks left and may not grow any further."""


# at most this many free blocks are looked for after a new run, for its sequence to grow into
GROWTH_ROOM_BLOCKS = 8


class BlockAllocator:
    """Free-block bookkeeping with a preference for contiguous runs."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = bytearray(b"\x01") * num_blocks
        self.num_free = num_blocks

    def grow(self, num_blocks: int) -> None:
        extra = num_blocks - self.num_blocks
        if extra > 0:
            self._free.extend(b"\x01" * extra)
            self.num_free += extra
            self.num_blocks = num_blocks

    def _take(self, start: int, n: int) -> list[int]:
        self._free[start : start + n] = b"\x00" * n
        self.num_free -= n
        return list(range(start, start + n))

    def allocate(self, n: int, after: int | None = None, room: int = 0) -> list[int] | None:
        """n blocks, contiguous with block `after` if possible, else one free run (with `room` > 0: one
        followed by `room` free blocks for its owner to grow into, and that leaves as many free after the
        run before it, if there is such a place), else any free blocks. None when fewer than n are free."""
        if n <= 0:
            return []
        if n > self.num_free:
            return None
        free = self._free
        if after is not None and after + 1 + n <= self.num_blocks:
            if free.find(b"\x00", after + 1, after + 1 + n) == -1:
                return self._take(after + 1, n)
        start = -1
        if room > 0:
            # a free stretch that also keeps `room` blocks free for the run that may end before it (none
            # does at block 0), else one with room after the new run only
            gap = free.find(b"\x01" * (room + n + room))
            if gap > 0:
                start = gap + room
            elif gap == 0:
                start = 0
            else:
                start = free.find(b"\x01" * (n + room))
        if start == -1:
            start = free.find(b"\x01" * n)  # first fit
        if start != -1:
            return self._take(start, n)
        out: list[int] = []
        pos = 0
        while len(out) < n:  # fragmented: any free blocks, lowest first
            pos = free.find(b"\x01", pos)
            out.append(pos)
            free[pos] = 0
            pos += 1
        self.num_free -= n
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._free[b]:
                raise ValueError(f"block {b} freed twice")
            self._free[b] = 1
        self.num_free += len(blocks)


@dataclass
class SeqBlocks:
    """A sequence's view of the pool: its block table and how many positions hold valid entries."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # positions 0..num_tokens-1 are written (in every layer)
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the first len(keys) (full) blocks
    mtp_marked: int = 0  # its first mtp_marked blocks are known MTP-exact (commit resumes from there)
    _table: torch.Tensor | None = None  # int64 [len(blocks)], rebuilt lazily
    _runs: list[tuple[int, int, int]] | None = None  # (first position, first slot, length) per run of blocks

    def invalidate(self) -> None:
        self._table = None
        self._runs = None


@dataclass
class LayerSpec:
    """Which pools one attention sublayer has (`index`: it owns an indexer)."""

    latent_dim: int
    rope_dim: int
    index: bool


class PagedKVCache:
    """Pools for every attention sublayer of a model; sublayer ids: main layer l, sublayer i → 2l + i;
    MTP module j → 2 * num_layers + j."""

    def __init__(
        self,
        layers: list[LayerSpec],
        index_head_dim: int,
        *,
        block_size: int = 256,
        num_blocks: int = 16,
        max_blocks: int | None = None,
        dtype: torch.dtype = torch.float32,
        index_dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        prefix_cache_blocks: int = 0,
        hi_block: int = 0,
        index_rotate: bool = False,
    ) -> None:
        """prefix_cache_blocks: how many unreferenced full blocks the prefix cache may keep (0: off).
        hi_block: sub-block size of the HI page summaries (0: no summaries); index_rotate: Hadamard-rotate
        index keys (and, in selection, queries) before storing them."""
        if block_size <= 0 or num_blocks <= 0:
            raise ValueError("block_size and num_blocks must be positive")
        if hi_block < 0 or (hi_block and block_size % hi_block):
            raise ValueError(f"block_size ({block_size}) must be a multiple of the HI sub-block ({hi_block})")
        if prefix_cache_blocks < 0:
            raise ValueError(f"prefix_cache_blocks: must be >= 0, got {prefix_cache_blocks}")
        self.layers = layers
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.dtype = dtype
        self.index_dtype = index_dtype or dtype
        self.device = torch.device(device)
        self.index_head_dim = index_head_dim
        self.allocator = BlockAllocator(num_blocks)
        cap = num_blocks * block_size
        self.kv = [
            torch.zeros(cap, s.latent_dim + s.rope_dim, dtype=dtype, device=self.device) for s in layers
        ]
        self._split_kv()
        self.index_keys: dict[int, torch.Tensor] = {
            i: torch.zeros(cap, index_head_dim, dtype=self.index_dtype, device=self.device)
            for i, s in enumerate(layers)
            if s.index
        }
        self.index_fp8 = self.index_dtype == torch.float8_e4m3fn
        # fp8 keys: one fp32 scale per token per owner
        self.index_scales: dict[int, torch.Tensor] = (
            {i: torch.zeros(cap, 1, dtype=torch.float32, device=self.device) for i in self.index_keys}
            if self.index_fp8
            else {}
        )
        self.rotation = hadamard(index_head_dim, self.device) if index_rotate else None
        self.fp8_scale_candidates = FP8_SCALE_CANDIDATES  # per-token scale search of fp8 keys (quantize_fp8)
        # HI page summaries: sub-block means (fp32 for fp32 keys, else bf16)
        self.hi_block = hi_block
        self.summary_dtype = torch.float32 if self.index_dtype == torch.float32 else torch.bfloat16
        self.index_summaries: dict[int, torch.Tensor] = (
            {
                i: torch.zeros(cap // hi_block, index_head_dim, dtype=self.summary_dtype, device=self.device)
                for i in self.index_keys
            }
            if hi_block
            else {}
        )
        # running max of indexer-key L2 norms per owner (bf16 keys only: bounds of the bf16 two-pass scan)
        self.index_key_max_norm: dict[int, float] = {i: 0.0 for i in self.index_keys}
        # prefix cache
        self.prefix_cache_blocks = prefix_cache_blocks
        self.refs = [0] * num_blocks  # live sequences holding each block
        self.key_of: dict[int, bytes] = {}  # block → key (keyed blocks only)
        self.block_of: dict[bytes, int] = {}  # key → block
        self.mtp_exact: set[int] = set()
        self.lru: OrderedDict[int, None] = OrderedDict()  # keyed blocks nobody holds, oldest first
        self.prefix_stats = {"queries": 0, "query_tokens": 0, "hit_tokens": 0, "evictions": 0}

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def for_model(
        cls, model: torch.nn.Module, *, with_mtp: bool = False, dtype: torch.dtype | None = None, **kw
    ) -> PagedKVCache:
        """Layer specs read off a LongCatForCausalLM (its MLA modules decide who owns an indexer)."""
        cfg: ModelConfig = model.config
        specs = []
        for layer in model.model.layers:
            for attn in layer.self_attn:
                specs.append(LayerSpec(cfg.kv_lora_rank, cfg.qk_rope_head_dim, attn.indexer is not None))
        if with_mtp and model.model.mtp is not None:
            for mtp_layer in model.model.mtp.layers:
                specs.append(
                    LayerSpec(cfg.kv_lora_rank, cfg.qk_rope_head_dim, mtp_layer.self_attn.indexer is not None)
                )
        if dtype is None:
            dtype = next(model.parameters()).dtype
        return cls(specs, cfg.index_head_dim, dtype=dtype, **kw)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.block_size

    def index_bytes_per_token(self) -> float:
        """Index-key cache bytes per token over all owners (fp8: + 4 B scale; HI: + the summaries)."""
        per = self.index_head_dim * torch.finfo(self.index_dtype).bits // 8 + (4 if self.index_fp8 else 0)
        if self.hi_block:
            per += self.index_head_dim * torch.finfo(self.summary_dtype).bits / 8 / self.hi_block
        return len(self.index_keys) * per

    def bytes_per_token(self) -> int:
        e = torch.finfo(self.dtype).bits // 8
        lat = sum((s.latent_dim + s.rope_dim) * e for s in self.layers)
        return lat + math.ceil(self.index_bytes_per_token())

    # ------------------------------------------------------------------ allocation
    def _grow(self, min_blocks: int) -> None:
        new = max(min_blocks, 2 * self.num_blocks)
        if self.max_blocks is not None:
            if min_blocks > self.max_blocks:
                raise CacheFull(f"cache needs {min_blocks} blocks, max_blocks={self.max_blocks}")
            new = min(new, self.max_blocks)
        extra = (new - self.num_blocks) * self.block_size

        def grown(t: torch.Tensor) -> torch.Tensor:
            if t.dtype == torch.float8_e4m3fn:  # (no fp8 cat on CPU: grow the bytes)
                return grown(t.view(torch.uint8)).view(torch.float8_e4m3fn)
            return torch.cat([t, t.new_zeros(extra, t.shape[1])])

        self.kv = [grown(t) for t in self.kv]
        self._split_kv()
        self.index_keys = {i: grown(t) for i, t in self.index_keys.items()}
        self.index_scales = {i: grown(t) for i, t in self.index_scales.items()}
        if self.hi_block:
            n_sum = (new - self.num_blocks) * self.block_size // self.hi_block
            self.index_summaries = {
                i: torch.cat([t, t.new_zeros(n_sum, t.shape[1])]) for i, t in self.index_summaries.items()
            }
        self.refs.extend([0] * (new - self.num_blocks))
        self.allocator.grow(new)

    def _split_kv(self) -> None:
        """`latent[l]` [P, c] and `rope[l]` [P, r]: the column views of `kv[l]` [P, c + r]."""
        self.latent = [t[:, : s.latent_dim] for t, s in zip(self.kv, self.layers)]
        self.rope = [t[:, s.latent_dim :] for t, s in zip(self.kv, self.layers)]

    def new_sequence(self) -> SeqBlocks:
        return SeqBlocks()

    def reserve(self, seq: SeqBlocks, num_tokens: int, expect_tokens: int = 0) -> None:
        """Make sure positions 0..num_tokens-1 have slots. Grows the pool, and when it may not grow any
        further evicts cached prefix blocks; raises CacheFull when neither gives enough blocks.

        expect_tokens: how long the sequence may get (prompt + max new tokens). A new run of blocks is then
        placed, when the pool has the space, where up to GROWTH_ROOM_BLOCKS free blocks follow it, so the
        blocks decode adds later continue the run: attention reads a sequence as one contiguous run
        instead of two (each run costs its own small GEMMs per sublayer and step). Nothing is held back:
        those blocks stay free for anyone who needs them."""
        n_blocks = -(-num_tokens // self.block_size)
        need = n_blocks - len(seq.blocks)
        if need <= 0:
            return
        after = seq.blocks[-1] if seq.blocks else None
        growth = min(GROWTH_ROOM_BLOCKS, max(0, -(-expect_tokens // self.block_size) - n_blocks))
        got = self.allocator.allocate(need, after, growth)
        if got is None:
            missing = need - self.allocator.num_free
            room = None if self.max_blocks is None else self.max_blocks - self.num_blocks
            if room is not None and room < missing:
                self.evict(min(len(self.lru), missing - room))
            if self.allocator.num_free < need:
                self._grow(self.num_blocks - self.allocator.num_free + need)
            got = self.allocator.allocate(need, after)
            assert got is not None
        for b in got:
            self.refs[b] = 1
        seq.blocks.extend(got)
        seq.invalidate()

    def release(self, seq: SeqBlocks) -> None:
        """Drop a sequence's references: keyed blocks stay cached (LRU), the others are freed."""
        free = []
        for b in seq.blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.lru[b] = None
                    self.lru.move_to_end(b)
                else:
                    free.append(b)
        self.allocator.free(free)
        seq.blocks = []
        seq.keys = []
        seq.mtp_marked = 0
        seq.num_tokens = 0
        seq.invalidate()
        if len(self.lru) > self.prefix_cache_blocks:
            self.evict(len(self.lru) - self.prefix_cache_blocks)

    # ------------------------------------------------------------------ prefix cache
    @property
    def num_held_blocks(self) -> int:
        """Blocks that live sequences hold (neither free nor only cached)."""
        return self.num_blocks - self.allocator.num_free - len(self.lru)

    @property
    def num_cached_blocks(self) -> int:
        """Keyed blocks (held by live sequences or only cached)."""
        return len(self.key_of)

    def _key(self, parent: bytes, tokens: list[int]) -> bytes:
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(np.asarray(tokens, dtype=np.int64).tobytes())
        return h.digest()

    def evict(self, n: int) -> None:
        """Free the n least recently used cached blocks nobody holds."""
        free = []
        for _ in range(min(n, len(self.lru))):
            b, _ = self.lru.popitem(last=False)
            del self.block_of[self.key_of.pop(b)]
            self.mtp_exact.discard(b)
            free.append(b)
        self.allocator.free(free)
        self.prefix_stats["evictions"] += len(free)

    def attach_prefix(self, seq: SeqBlocks, tokens: list[int], *, need_mtp: bool = False) -> int:
        """Give an empty sequence the longest cached block-aligned prefix of `tokens` (never the block of
        the last token). → the number of positions reused."""
        assert not seq.blocks, "attach_prefix needs an empty sequence"
        self.prefix_stats["queries"] += 1
        self.prefix_stats["query_tokens"] += len(tokens)
        if not self.prefix_cache_blocks:
            return 0
        bs = self.block_size
        keys: list[bytes] = []
        blocks: list[int] = []
        parent = b""
        for i in range((len(tokens) - 1) // bs):
            parent = self._key(parent, tokens[i * bs : (i + 1) * bs])
            b = self.block_of.get(parent)
            if b is None or (need_mtp and b not in self.mtp_exact):
                break
            keys.append(parent)
            blocks.append(b)
        if need_mtp and blocks:  # the last block's final MTP entry depends on the next (unmatched) token
            keys.pop()
            blocks.pop()
        for b in blocks:
            self.refs[b] += 1
            self.lru.pop(b, None)
        seq.blocks, seq.keys = blocks, keys
        seq.mtp_marked = len(blocks) if need_mtp else 0
        seq.num_tokens = len(blocks) * bs
        seq.invalidate()
        self.prefix_stats["hit_tokens"] += seq.num_tokens
        return seq.num_tokens

    def commit(self, seq: SeqBlocks, tokens: list[int], mtp_len: int = 0) -> None:
        """Key the sequence's newly completed blocks (written and with known tokens) and mark the blocks its
        exact MTP entries cover."""
        if not self.prefix_cache_blocks:
            return
        bs = self.block_size
        full = min(seq.num_tokens, len(tokens)) // bs
        for i in range(len(seq.keys), full):
            key = self._key(seq.keys[-1] if seq.keys else b"", tokens[i * bs : (i + 1) * bs])
            seq.keys.append(key)
            b = seq.blocks[i]
            if key not in self.block_of and b not in self.key_of:
                self.block_of[key] = b
                self.key_of[b] = key
        covered = min(mtp_len // bs, len(seq.keys))
        for i in range(seq.mtp_marked, covered):
            b = seq.blocks[i]
            if self.key_of.get(b) == seq.keys[i]:
                self.mtp_exact.add(b)
        seq.mtp_marked = max(seq.mtp_marked, covered)

    # ------------------------------------------------------------------ addressing
    def table(self, seq: SeqBlocks) -> torch.Tensor:
        if seq._table is None:
            seq._table = torch.tensor(seq.blocks, dtype=torch.long, device=self.device)
        return seq._table

    def slots(self, seq: SeqBlocks, positions: torch.Tensor) -> torch.Tensor:
        """positions [...] (int64, >= 0) → pool rows [...]; -1 stays -1."""
        bs = self.block_size
        safe = positions.clamp(min=0)
        rows = self.table(seq)[safe // bs] * bs + safe % bs
        return torch.where(positions >= 0, rows, positions)

    def slots_rows(self, items: list[tuple[SeqBlocks, torch.Tensor]]) -> torch.Tensor:
        """`slots` for the position rows of several sequences at once: items [(seq, positions [T_i, K_i])]
        → pool rows [sum T_i, max K_i], each item's rows padded with -1 to the widest (a decode step's
        rows of many sequences: one lookup instead of one per sequence)."""
        if len(items) == 1:
            return self.slots(*items[0])
        width = max(p.shape[1] for _, p in items)
        pos = torch.cat([F.pad(p, (0, width - p.shape[1]), value=-1) for _, p in items])  # [R, K]
        tables = pad_sequence([self.table(seq) for seq, _ in items], batch_first=True)  # [S, max blocks]
        counts = torch.tensor([p.shape[0] for _, p in items], device=pos.device)
        item_of_row = torch.repeat_interleave(torch.arange(len(items), device=pos.device), counts)  # [R]
        bs = self.block_size
        safe = pos.clamp(min=0)
        rows = tables[item_of_row].gather(1, safe // bs) * bs + safe % bs
        return torch.where(pos >= 0, rows, pos)

    def runs(self, seq: SeqBlocks, start: int, end: int) -> list[tuple[int, int, int]]:
        """Contiguous pieces of positions [start, end): (first position, first pool row, length)."""
        if seq._runs is None:
            runs: list[tuple[int, int, int]] = []
            bs = self.block_size
            for i, b in enumerate(seq.blocks):
                if runs and runs[-1][1] + runs[-1][2] == b * bs:
                    p, r, n = runs[-1]
                    runs[-1] = (p, r, n + bs)
                else:
                    runs.append((i * bs, b * bs, bs))
            seq._runs = runs
        out = []
        for p, r, n in seq._runs:
            lo, hi = max(p, start), min(p + n, end)
            if lo < hi:
                out.append((lo, r + lo - p, hi - lo))
        return out

    def read(self, pool: torch.Tensor, seq: SeqBlocks, start: int, end: int) -> torch.Tensor:
        """Rows of positions [start, end) of one pool: a view when contiguous, else a gathered copy."""
        pieces = self.runs(seq, start, end)
        if len(pieces) == 1:
            _, r, n = pieces[0]
            return pool[r : r + n]
        if not pieces:
            return pool[:0]
        return torch.cat([pool[r : r + n] for _, r, n in pieces])

    # ------------------------------------------------------------------ writes
    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor) -> None:
        """slots [N], latent [N, c], rope [N, r]."""
        self.kv[layer].index_copy_(0, slots, torch.cat([latent, rope], dim=-1).to(self.dtype))

    def write_index(self, layer: int, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """slots [N], keys [N, index_head_dim] (rotated first when the cache rotates index keys)."""
        if self.rotation is not None:
            keys = keys.float() @ self.rotation
        if self.index_fp8:
            q, scale = quantize_fp8(keys, self.fp8_scale_candidates)  # (no fp8 index_copy_ on CPU: bytes)
            self.index_keys[layer].view(torch.uint8).index_copy_(0, slots, q.view(torch.uint8))
            self.index_scales[layer].index_copy_(0, slots, scale)
            return
        keys = keys.to(self.index_dtype)
        self.index_keys[layer].index_copy_(0, slots, keys)
        if keys.numel() and self.index_dtype == torch.bfloat16:
            norm = float(keys.float().norm(dim=-1).max())
            if norm > self.index_key_max_norm[layer]:
                self.index_key_max_norm[layer] = norm

    # ------------------------------------------------------------------ index-key reads (fp8, HI)
    def dequant_index(self, layer: int, rows: slice | torch.Tensor) -> torch.Tensor:
        """Index keys of pool rows (a slice or an index tensor) as fp32 (fp8: value × scale)."""
        if not self.index_fp8:
            return self.index_keys[layer][rows].float()
        keys = self.index_keys[layer].view(torch.uint8)[rows].view(torch.float8_e4m3fn)
        return keys.float() * self.index_scales[layer][rows]

    def rotate_queries(self, q: torch.Tensor) -> torch.Tensor:
        """q [..., d] → q rotated like the stored keys (unchanged without rotation)."""
        return q if self.rotation is None else (q.float() @ self.rotation).to(q.dtype)

    def update_summaries(self, layer: int, end_slots: torch.Tensor) -> None:
        """end_slots [M]: pool rows of tokens that just completed a sub-block (position % hi_block ==
        hi_block - 1; their sub-block's earlier keys are already written). Writes each sub-block's mean."""
        if not self.hi_block or end_slots.numel() == 0:
            return
        b = self.hi_block
        first = end_slots - (b - 1)
        acc = self.dequant_index(layer, first)  # [M, d]
        for j in range(1, b):  # fixed order: bit-identical however the sub-block's step was batched
            acc = acc + self.dequant_index(layer, first + j)
        self.index_summaries[layer].index_copy_(0, end_slots // b, (acc / b).to(self.summary_dtype))


INDEX_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}  # --index-dtype choices


def index_dtype_of(value: torch.dtype | str | None) -> torch.dtype | None:
    """'bf16' / 'fp8' / a torch dtype / None (= the cache dtype) → the index-key storage dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in INDEX_DTYPES:
        raise ValueError(f"index_dtype: one of {', '.join(INDEX_DTYPES)}, got {value!r}")
    return INDEX_DTYPES[value]


FP8_MAX = 448.0  # largest finite float8 e4m3fn
# per-token scales the cache's fp8 quantiser tries (see quantize_fp8): at d_I = 16 on the v2 default model,
# 32 cut the keys' relative error from 2.2 % to 1.6 % and lifted the fp8/bf16 selection overlap from 0.988
# to 0.991 (bench/hi_quality.py, BENCHMARKS.md); 128 gained 0.0003 more
FP8_SCALE_CANDIDATES = 32


def quantize_fp8(x: torch.Tensor, candidates: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, d] → (e4m3 values [N, d], fp32 scales [N, 1]) with x ≈ values · scale.

    candidates = 1: scale = amax / 448 (a row's largest element lands on 448 exactly). candidates = C > 1:
    per row, the scale among amax / 448 · 2^(i/C), i < C, whose round trip has the least squared error
    (the first of equal ones). e4m3's relative grid repeats every factor of 2, so these C scales (one
    binade, all >= amax / 448, so nothing overflows) shift where every element falls between two grid
    points; with few elements per row one of them rounds markedly better than the others. Same format,
    same dequantisation (value × scale). Cost: C round trips per key (one [N, d] pass each: ~8 ms per 2,048
    keys of 16 dims, ~60 ms at 128 dims on one core), paid once, when a key is written."""
    x = x.float()
    base = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    scale, best = base, None
    for i in range(candidates if candidates > 1 else 0):
        cand = base * 2.0 ** (i / candidates)  # [N, 1]
        err = ((x / cand).to(torch.float8_e4m3fn).float() * cand - x).square_().sum(-1, keepdim=True)
        if best is None:
            best = err
            continue
        better = err < best
        best, scale = torch.where(better, err, best), torch.where(better, cand, scale)
    return (x / scale).to(torch.float8_e4m3fn), scale


def hadamard(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix [d, d] (orthogonal and symmetric; d a power of two)."""
    if d <= 0 or d & (d - 1):
        raise ValueError(f"index_head_dim must be a power of two for the Hadamard rotation, got {d}")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return (h / math.sqrt(d)).to(device)
