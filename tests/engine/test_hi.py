"""Hierarchical indexing (HI) and FP8 index keys on the engine's cached path (engine/hi.py, engine/cache.py)."""

from __future__ import annotations

import torch
from lsa_reference import assert_attention_matches, capture_attention, reference_model, select_hi

from longcat2.engine import Engine, SamplingParams
from longcat2.engine.cache import FP8_SCALE_CANDIDATES, LayerSpec, PagedKVCache, hadamard, quantize_fp8
from longcat2.engine.runner import ModelRunner, Segment

# tiny preset (top-k 64 = 4 sink + 16 local + 44 dynamic): pages of 16 tokens, sub-blocks of 4, HI from 64 keys
HI = dict(lsa_hi=True, lsa_hi_page_size=16, lsa_hi_block_size=4, lsa_hi_top_pages=6, lsa_hi_min_len=64)


def _prompt(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 500, (n,), generator=g).tolist()


def _engine_attention(model, prompt: list[int], new: int, **engine_kw) -> tuple[dict, dict, list[int]]:
    """Run prompt + `new` greedy tokens through the engine (prefill chunks of 96): per attention sublayer the
    inputs and outputs of every row, in position order."""
    seen, handles = capture_attention(model)
    eng = Engine(model, block_size=16, eos_token_id=None, max_step_tokens=96, **engine_kw)
    eng.add_request(prompt, SamplingParams(max_new_tokens=new))
    done = [ev for ev in eng.stream() if ev.finished][0]
    for h in handles:
        h.remove()
    assert done.finish_reason == "length", done.error
    cat = {(key, kind): torch.cat(calls, dim=1)[0] for (key, kind), calls in seen.items()}
    xs = {key: v for (key, kind), v in cat.items() if kind == "x"}
    outs = {key: v for (key, kind), v in cat.items() if kind == "out"}
    return xs, outs, done.token_ids


def test_hi_with_full_coverage_is_exact_selection_bit_for_bit() -> None:
    model = reference_model(True)
    cfg = model.config
    prompt = _prompt(300)
    _, want, want_ids = _engine_attention(model, prompt, 12)
    model.config = cfg.replace(**{**HI, "lsa_hi_top_pages": 64})  # 64 pages >= every page of 312 tokens
    _, got, got_ids = _engine_attention(model, prompt, 12)
    model.config = cfg
    assert got_ids == want_ids
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_hi_selection_matches_the_spec_reference() -> None:
    """Chunked prefill + decode with HI (coarse pages kept < candidate pages on most rows): every attention
    output equals tests/lsa_reference.py's HI reference on the engine's own attention inputs."""
    model = reference_model(True)
    cfg = model.config.replace(**HI)
    model.config = cfg
    xs, outs, _ = _engine_attention(model, _prompt(250), 16)
    model.config = model.config.replace(lsa_hi=False)
    compared = assert_attention_matches(model, xs, outs, cfg, selector=select_hi)
    assert compared > 300  # rows of both layers that attend over a strict, HI-selected subset


def test_page_summaries_after_chunked_prefill_and_decode_equal_summaries_built_at_once() -> None:
    model = reference_model(True)
    model.config = model.config.replace(**HI)
    tokens = torch.tensor(_prompt(203))
    runs = []
    for chunks in ([203], [37, 50, 13, 103], [120] + [1] * 83):
        runner = ModelRunner(model, block_size=16, num_blocks=2)
        seq = runner.new_sequence(tokens.tolist())
        start = 0
        for n in chunks:
            runner.forward([Segment(seq, tokens[start : start + n], start)])
            start += n
        b = runner.cache.hi_block
        first = runner.cache.slots(seq.blocks, torch.arange(0, 200, b))  # complete sub-blocks only
        runs.append({lid: s[first // b] for lid, s in runner.cache.index_summaries.items()})
        # built at once from the final cached keys: the same sub-block means, bit for bit
        for lid, summ in runs[-1].items():
            keys = runner.cache.dequant_index(lid, runner.cache.slots(seq.blocks, torch.arange(200)))
            blocks = keys.view(-1, b, keys.shape[-1])  # [sub-blocks, B, d]
            at_once = blocks[:, 0]
            for j in range(1, b):
                at_once = at_once + blocks[:, j]
            assert torch.equal(summ, at_once / b)
    for other in runs[1:]:  # (the keys themselves differ by GEMM rounding between chunkings)
        for lid in runs[0]:
            torch.testing.assert_close(other[lid], runs[0][lid], rtol=1e-5, atol=1e-5)


def test_fp8_round_trip_error_bound_and_hadamard_rotation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g) * torch.logspace(-3, 3, 512)[:, None]
    x[7, 3] = 80.0  # an outlier
    q, scale = quantize_fp8(x)
    back = q.float() * scale
    # e4m3: 3 mantissa bits → relative error <= 2^-4 for normal values; subnormals step scale · 2^-9
    assert bool(((back - x).abs() <= torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-9)).all())
    torch.testing.assert_close(
        back.abs().amax(-1), x.abs().amax(-1), rtol=2.0**-22, atol=0
    )  # amax → 448 exactly
    h = hadamard(128)
    torch.testing.assert_close(h @ h.T, torch.eye(128), rtol=0, atol=1e-6)
    k, qv = torch.randn(64, 128, generator=g), torch.randn(4, 128, generator=g)
    torch.testing.assert_close((qv @ h) @ (k @ h).T, qv @ k.T, rtol=1e-5, atol=1e-4)  # logits preserved


def test_fp8_scale_search_rounds_each_token_at_least_as_well_as_the_amax_scale() -> None:
    """quantize_fp8 with C per-token scale candidates (the cache's quantiser): within e4m3's bound, nothing
    beyond 448, the scale in [amax/448, 2·amax/448), every row's round-trip error <= the amax/448 scale's
    (one of the candidates) and well below it in total on 16-dim rows; rows are quantised independently
    (any batching gives the same bytes); the cache stores exactly these values and scales."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 16, generator=g) * torch.logspace(-3, 3, 5000)[:, None]  # many rows
    v1, s1 = quantize_fp8(x)
    v, s = quantize_fp8(x, FP8_SCALE_CANDIDATES)
    back, base = v.float() * s, x.abs().amax(-1, keepdim=True) / 448
    assert bool(((back - x).abs() <= torch.maximum(x.abs() * 2.0**-4, s * 2.0**-9)).all())
    assert float(v.float().abs().max()) <= 448 and bool(((s >= base) & (s < 2 * base)).all())
    err, err1 = (back - x).square().sum(-1), (v1.float() * s1 - x).square().sum(-1)
    assert bool((err <= err1).all())
    assert float((err / x.square().sum(-1)).mean()) < 0.7 * float((err1 / x.square().sum(-1)).mean())
    part_v, part_s = quantize_fp8(x[2040:2060], FP8_SCALE_CANDIDATES)
    assert torch.equal(part_v.view(torch.uint8), v[2040:2060].view(torch.uint8))
    assert torch.equal(part_s, s[2040:2060])
    cache = PagedKVCache(
        [LayerSpec(8, 8, True)], 16, block_size=64, num_blocks=2, index_dtype=torch.float8_e4m3fn
    )
    seq = cache.new_sequence()
    cache.reserve(seq, 100)
    rows = cache.slots(seq, torch.arange(100))
    cache.write_index(0, rows, x[:100])
    assert torch.equal(cache.dequant_index(0, rows), back[:100])


def test_fp8_index_keys_select_like_bf16_keys() -> None:
    """Layer 0's owner (same inputs under both caches) over a 300-token prefill: the fp8 (Hadamard-rotated)
    key selection overlaps the bf16-key selection. (A random tiny model has many near-equal scores; the
    trained-model figure is in bench/hi_quality.py.)"""
    model = reference_model(True)
    prompt = _prompt(300)
    owner = model.model.layers[0].self_attn[0]
    sel: dict[str, list[torch.Tensor]] = {}
    for dtype in ("bf16", "fp8"):
        rows: list[torch.Tensor] = []
        handle = owner.register_forward_hook(
            lambda m, a, out, rows=rows: rows.extend(s for s in out[1] if s is not None)
        )
        runner = ModelRunner(model, block_size=16, num_blocks=2, index_dtype=dtype)
        seq = runner.new_sequence(prompt)
        for start in range(0, 300, 96):
            runner.forward([Segment(seq, torch.tensor(prompt[start : start + 96]), start)])
        handle.remove()
        sel[dtype] = rows
    a, b = torch.cat(sel["bf16"]), torch.cat(sel["fp8"])
    assert a.shape == b.shape == (300, model.config.index_topk)
    sparse = slice(model.config.index_topk, None)
    overlap = [
        len(set(x.tolist()) & set(y.tolist())) / len(set(x.tolist())) for x, y in zip(a[sparse], b[sparse])
    ]
    assert sum(overlap) / len(overlap) >= 0.9


def test_bf16_decode_path_selects_like_the_generic_path() -> None:
    """A bf16 decode row (bf16 GEMM coarse scores + the bf16 two-pass fine scan) against the fp32 path on
    the same cache: the same tokens whenever the page ranking is not within bf16 rounding of a tie (random
    keys: all 20 queries here)."""
    from longcat2.config import ModelConfig
    from longcat2.engine.cache import LayerSpec, PagedKVCache
    from longcat2.engine.hi import hi_rows

    cfg = ModelConfig.from_preset("tiny").replace(**{**HI, "lsa_hi_top_pages": 12})
    g = torch.Generator().manual_seed(3)
    cache = PagedKVCache(
        [LayerSpec(8, 8, True)], 16, block_size=64, num_blocks=40, dtype=torch.bfloat16, hi_block=4
    )
    seq = cache.new_sequence()
    cache.reserve(seq, 2500)
    rows = cache.slots(seq, torch.arange(2500))
    cache.write_index(0, rows, torch.randn(2500, 16, generator=g))
    cache.update_summaries(0, rows[3::4])
    for i in range(20):
        q = torch.randn(1, 4, 16, generator=g).to(torch.bfloat16)
        w = torch.randn(1, 4, generator=g)
        pos = torch.tensor([2400 + i])
        fast = hi_rows(cache, 0, seq, cfg, q, w, pos, 1 << 20)
        slow = hi_rows(cache, 0, seq, cfg, q.float(), w, pos, 1 << 20)
        assert torch.equal(fast, slow), i
