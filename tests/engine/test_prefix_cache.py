"""Prefix caching: content-addressed blocks reused across requests, with outputs identical to no caching."""

from __future__ import annotations

import pytest
import torch

from longcat2 import ModelConfig
from longcat2.engine import Engine, SamplingParams
from longcat2.engine.cache import LayerSpec, PagedKVCache
from longcat2.model.longcat import LongCatForCausalLM

BLOCK = 16


@pytest.fixture(scope="module")
def tiny() -> LongCatForCausalLM:
    # LSA (top-64) with forced sink/local tokens, N-gram embedding, zero experts, 3-step MTP
    torch.manual_seed(0)
    return LongCatForCausalLM(ModelConfig.from_preset("tiny", initializer_range=0.1)).eval()


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 512, (n,), generator=g).tolist()


def _session(engine: Engine, turns: int = 3, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """An agent-like session: each turn resends the whole conversation (earlier prompt, the model's reply,
    a new message). → (outputs per turn, cached prompt tokens per turn)."""
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    convo = _tokens(90, seed)  # system prompt + first message: past top-64, so the sparse path runs
    outs, cached = [], []
    for turn in range(turns):
        rid = engine.add_request(convo, params)
        for ev in engine.stream():
            if ev.request_id == rid and ev.finished:
                outs.append(ev.token_ids)
                cached.append(ev.num_cached_tokens)
        convo = convo + outs[-1] + _tokens(23, seed + 100 + turn)
    return outs, cached


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_agent_session_reuses_the_prefix_with_identical_outputs(tiny, speculative):
    kw = dict(block_size=BLOCK, speculative=speculative)
    ref_outs, ref_cached = _session(Engine(tiny, prefix_cache_bytes=0, **kw))
    eng = Engine(tiny, **kw)
    outs, cached = _session(eng)
    assert outs == ref_outs
    assert ref_cached == [0, 0, 0]
    assert cached[0] == 0
    # turn t resends turn t-1's prompt + reply, whose cache holds every position but the reply's last token
    prompt_lens = [90, 90 + 6 + 23]
    for t in (1, 2):
        written = prompt_lens[t - 1] + 6 - 1
        if speculative:  # blocks with exact MTP entries (at least the prompt's), less the last one
            assert cached[t] >= ((prompt_lens[t - 1] - 1) // BLOCK - 1) * BLOCK, (t, cached)
        else:
            assert cached[t] == written // BLOCK * BLOCK, (t, cached)
        assert cached[t] % BLOCK == 0
    st = eng.prefix_cache_stats()
    assert st["hit_tokens"] == sum(cached) and 0 < st["hit_rate"] < 1
    assert eng.runner.cache.num_held_blocks == 0


def test_same_prompt_twice_recomputes_only_the_last_block(tiny):
    prompt = _tokens(4 * BLOCK, 7)  # block-aligned: the block holding the last token is recomputed
    eng = Engine(tiny, block_size=BLOCK)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    first = eng.generate([prompt], params)[0]
    rid = eng.add_request(prompt, params)
    evs = [ev for ev in eng.stream() if ev.request_id == rid]
    assert evs[-1].token_ids == first
    assert evs[-1].num_cached_tokens == 3 * BLOCK


def test_concurrent_requests_share_a_prefix_while_both_run(tiny):
    system = _tokens(5 * BLOCK, 3)
    a, b = system + _tokens(20, 4), system + _tokens(31, 5)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    ref = Engine(tiny, block_size=BLOCK, prefix_cache_bytes=0).generate([a, b], params)
    eng = Engine(tiny, block_size=BLOCK, max_step_tokens=64)
    ra = eng.add_request(a, params)
    while eng.requests[ra].num_prefilled < len(system):  # a prefills the shared part first
        eng.step()
    rb = eng.add_request(b, params)
    done = {ev.request_id: ev for ev in eng.stream() if ev.finished}
    assert [done[ra].token_ids, done[rb].token_ids] == ref
    assert done[rb].num_cached_tokens == len(system)  # blocks a still holds are shared, not copied


def test_budget_bounds_cached_blocks_and_evicts_lru(tiny):
    """Many sessions through a cache of 6 blocks: outputs unchanged, never more idle blocks than the
    budget, the oldest evicted first, and the pool stops growing."""
    probe = Engine(tiny, block_size=BLOCK)
    block_bytes = probe.runner.cache.bytes_per_token() * BLOCK
    eng = Engine(tiny, block_size=BLOCK, prefix_cache_bytes=6 * block_bytes)
    ref = Engine(tiny, block_size=BLOCK, prefix_cache_bytes=0)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    sizes = []
    for s in range(8):
        prompt = _tokens(3 * BLOCK + 5, 50 + s)
        assert eng.generate([prompt], params) == ref.generate([prompt], params)
        cache = eng.runner.cache
        assert len(cache.lru) <= 6 and cache.num_held_blocks == 0
        sizes.append(cache.num_blocks)
    st = eng.prefix_cache_stats()
    assert st["evictions"] > 0 and st["idle_blocks"] <= 6
    assert sizes[-1] == sizes[2]  # memory stays flat once the budget is reached
    # the most recent prompt is still cached, the first one was evicted
    last, first = _tokens(3 * BLOCK + 5, 57), _tokens(3 * BLOCK + 5, 50)
    for prompt, hit in ((last, 3 * BLOCK), (first, 0)):
        rid = eng.add_request(prompt, params)
        fin = [ev for ev in eng.stream() if ev.request_id == rid and ev.finished][0]
        assert fin.num_cached_tokens == hit


def test_keys_chain_through_the_whole_prefix():
    """Equal blocks after different prefixes are different cache entries; a block only matches with its
    whole prefix."""
    cache = PagedKVCache([LayerSpec(8, 4, True)], 4, block_size=4, num_blocks=8, prefix_cache_blocks=8)
    a = cache.new_sequence()
    cache.reserve(a, 12)
    a.num_tokens = 12
    toks_a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    cache.commit(a, toks_a)
    assert cache.num_cached_blocks == 3
    cache.release(a)
    assert len(cache.lru) == 3 and cache.num_held_blocks == 0
    b = cache.new_sequence()
    assert cache.attach_prefix(b, [9, 2, 3, 4, 5, 6, 7, 8, 1]) == 0  # first block differs
    assert cache.attach_prefix(b, [1, 2, 3, 4, 5, 6, 7, 0, 1]) == 4  # second block differs
    assert cache.refs[b.blocks[0]] == 1 and len(cache.lru) == 2
    cache.release(b)
    c = cache.new_sequence()
    assert cache.attach_prefix(c, toks_a[:12]) == 8  # never the block of the last token
    assert cache.attach_prefix(cache.new_sequence(), toks_a, need_mtp=True) == 0  # no MTP entries marked
    cache.release(c)
    d = cache.new_sequence()
    cache.reserve(d, 12)
    d.num_tokens = 12
    cache.commit(d, toks_a, mtp_len=12)  # duplicate content stays private; nothing new is keyed
    assert cache.num_cached_blocks == 3


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_full_pool_preempts_the_newest_request_instead_of_failing(tiny, speculative):
    """A pool capped at 12 blocks cannot hold three requests of 7 blocks: the newest running request is
    preempted and recomputed (its prefix mostly from the cache), and every output equals the unconstrained
    engine's."""
    prompts = [_tokens(60, 80 + i) for i in range(3)]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    kw = dict(block_size=BLOCK, speculative=speculative, max_batch_size=3)
    ref = Engine(tiny, **kw).generate(prompts, params)
    eng = Engine(tiny, num_blocks=12, max_blocks=12, **kw)
    assert eng.generate(prompts, params) == ref
    assert eng.stats["preemptions"] > 0
    assert eng.runner.cache.num_blocks == 12 and eng.runner.cache.num_held_blocks == 0
    with pytest.raises(ValueError, match=r"prompt_ids: 200 tokens cannot fit in the KV cache"):
        eng.add_request(_tokens(200, 1), params)
