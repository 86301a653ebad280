"""Paged cache: allocation, contiguity, growth, addressing."""

from __future__ import annotations

import pytest
import torch

from longcat2.engine.cache import BlockAllocator, CacheFull, LayerSpec, PagedKVCache


def _cache(**kw) -> PagedKVCache:
    specs = [LayerSpec(8, 4, True), LayerSpec(8, 4, False)]
    return PagedKVCache(specs, 6, **kw)


def test_allocator_prefers_contiguous_blocks() -> None:
    a = BlockAllocator(16)
    assert a.allocate(3) == [0, 1, 2]
    assert a.allocate(2) == [3, 4]
    assert a.allocate(1, after=2) == [5]  # 3 is taken: falls back to the next free run
    a.free([0, 1, 2])
    assert a.allocate(2, after=5) == [6, 7]  # right after its last block
    assert a.allocate(3) == [0, 1, 2]
    assert a.num_free == 16 - 8
    with pytest.raises(ValueError):
        a.free([0, 0])


def test_allocator_fragmented_and_exhausted() -> None:
    a = BlockAllocator(6)
    assert a.allocate(6) == list(range(6))
    a.free([1, 3, 5])
    assert a.allocate(3) == [1, 3, 5]
    assert a.allocate(1) is None


def test_allocator_leaves_room_to_grow() -> None:
    a = BlockAllocator(12)
    assert a.allocate(2, room=1) == [0, 1]  # block 2 stays free for this run to grow into
    assert a.allocate(2, room=1) == [3, 4]  # and is not taken by the next run
    assert a.allocate(1, after=1) == [2]  # the first run grows in place
    assert a.allocate(3, room=4) == [5, 6, 7]  # no stretch of 4 + 3 + 4 free: one of 3 + 4 (5..11)
    assert a.allocate(4, room=1) == [8, 9, 10, 11]  # no room left: first fit
    assert a.allocate(1) is None


def test_reserve_with_expected_length_keeps_decode_runs_contiguous() -> None:
    """Sequences prefilled together, then decoding past their last block: with the length they may reach
    each stays one run; without it the blocks interleave."""
    for expect, runs in ((0, 2), (12, 1)):
        c = _cache(block_size=4, num_blocks=16)
        seqs = [c.new_sequence() for _ in range(3)]
        for s in seqs:
            c.reserve(s, 8, expect)  # prompts of 8 tokens
        for s in seqs:
            c.reserve(s, 9, expect)  # the first decode token needs a third block
        assert all(len(c.runs(s, 0, 9)) == runs for s in seqs)


def test_slots_runs_and_reads() -> None:
    c = _cache(block_size=4, num_blocks=8)
    s1, s2 = c.new_sequence(), c.new_sequence()
    c.reserve(s1, 6)  # blocks 0, 1
    c.reserve(s2, 3)  # block 2
    c.reserve(s1, 11)  # block 3 (2 is taken)
    assert s1.blocks == [0, 1, 3]
    pos = torch.arange(11)
    slots = c.slots(s1, pos)
    assert slots.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14]
    assert c.slots(s1, torch.tensor([[-1, 9]])).tolist() == [[-1, 13]]
    assert c.runs(s1, 2, 10) == [(2, 2, 6), (8, 12, 2)]
    c.write(0, slots, torch.arange(11.0)[:, None].expand(11, 8), torch.zeros(11, 4))
    got = c.read(c.latent[0], s1, 3, 10)[:, 0]
    assert got.tolist() == [3, 4, 5, 6, 7, 8, 9]
    assert c.read(c.latent[0], s1, 0, 5).data_ptr() == c.latent[0].data_ptr()  # one run → a view
    rows = c.slots_rows([(s1, torch.tensor([[9, -1, 0], [10, 4, 1]])), (s2, torch.tensor([[2, 0]]))])
    assert rows.tolist() == [[13, -1, 0], [14, 4, 1], [10, 8, -1]]  # one lookup; s2's row padded with -1
    assert torch.equal(c.slots_rows([(s1, pos[None])]), slots[None])


def test_pool_grows_and_keeps_contents() -> None:
    c = _cache(block_size=4, num_blocks=2)
    s = c.new_sequence()
    c.reserve(s, 8)
    slots = c.slots(s, torch.arange(8))
    keys = torch.randn(8, 6)
    c.write_index(0, slots, keys)
    c.reserve(s, 40)  # grows the pool (10 blocks)
    assert c.num_blocks >= 10 and c.index_keys[0].shape[0] == c.capacity
    torch.testing.assert_close(c.index_keys[0][slots], keys)
    assert 1 not in c.index_keys  # the second layer owns no indexer
    c.release(s)
    assert c.allocator.num_free == c.num_blocks


def test_max_blocks_raises_cache_full() -> None:
    c = _cache(block_size=4, num_blocks=2, max_blocks=3)
    s = c.new_sequence()
    c.reserve(s, 12)
    with pytest.raises(CacheFull):
        c.reserve(s, 13)


def test_bytes_per_token() -> None:
    c = _cache(dtype=torch.bfloat16, index_dtype=torch.bfloat16)
    assert c.bytes_per_token() == 2 * (8 + 4) * 2 + 6 * 2
