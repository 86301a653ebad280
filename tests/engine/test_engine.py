"""Engine: batching, speculative decoding, sampling, stops, streaming, abort, the generate API."""

from __future__ import annotations

import pytest
import torch
from lsa_reference import assert_attention_matches, capture_attention, reference_model

from longcat2 import ModelConfig
from longcat2.engine import Engine, SamplingParams, generate
from longcat2.engine.sampling import RequestSampler
from longcat2.model.longcat import LongCatForCausalLM


@pytest.fixture(scope="module")
def tiny() -> LongCatForCausalLM:
    torch.manual_seed(0)
    return LongCatForCausalLM(ModelConfig.from_preset("tiny", initializer_range=0.1)).eval()


@pytest.fixture(scope="module")
def tiny_flash() -> LongCatForCausalLM:
    torch.manual_seed(1)
    return LongCatForCausalLM(ModelConfig.from_preset("tiny-flash", initializer_range=0.1)).eval()


def _prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 512, (n,), generator=g).tolist() for n in lengths]


def _greedy_reference(model: LongCatForCausalLM, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(ids)[0, -1].argmax())
            out.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out


def test_greedy_equals_full_forward_loop(tiny: LongCatForCausalLM) -> None:
    (prompt,) = _prompts((100,))
    got = generate(tiny, prompt, max_new_tokens=8, ignore_eos=True)
    assert got == _greedy_reference(tiny, prompt, 8)


def test_batched_equals_one_by_one(tiny: LongCatForCausalLM) -> None:
    prompts = _prompts((5, 70, 130, 33))
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    # 2 active at a time, 48-token steps: chunked prefill interleaved with other requests' decode rows
    eng = Engine(tiny, max_batch_size=2, max_step_tokens=48, block_size=16)
    batched = eng.generate(prompts, params)
    singles = [Engine(tiny).generate([p], params)[0] for p in prompts]
    assert batched == singles
    assert eng.runner.cache.num_held_blocks == 0  # everything released (free or only cached)


@pytest.mark.parametrize("num_draft", [1, 3])
def test_speculative_greedy_equals_plain_greedy(tiny: LongCatForCausalLM, num_draft: int) -> None:
    prompts = _prompts((20, 61, 150), seed=3)  # dense, crossing index_topk while drafting, sparse
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    plain = Engine(tiny, max_batch_size=3).generate(prompts, params)
    eng = Engine(tiny, max_batch_size=3, speculative=True, num_draft_tokens=num_draft, max_step_tokens=64)
    assert eng.generate(prompts, params) == plain
    assert eng.spec is not None and eng.spec.proposed > 0


def test_speculative_rollback_with_partly_right_drafts(tiny: LongCatForCausalLM) -> None:
    """Oracle drafts (the plain greedy continuation, deliberately wrong at every third output index)
    exercise multi-token acceptance, rejection mid-way and cache rollback; the output must not change."""
    prompts = _prompts((40, 100), seed=4)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    plain = Engine(tiny, max_batch_size=2).generate(prompts, params)
    eng = Engine(tiny, max_batch_size=2, speculative=True, num_draft_tokens=3)
    truth = {}

    def oracle(req, logits, step):
        q = req.sampler.probs(logits)
        idx = len(req.output) + step - 1
        ref = truth[req.request_id]
        tok = ref[idx] if idx < len(ref) else 0
        return (tok + 1) % 512 if idx % 3 == 2 else tok, q

    eng.spec._draft = oracle  # type: ignore[union-attr,method-assign]
    rids = [eng.add_request(p, params) for p in prompts]
    truth.update(zip(rids, plain))
    out = {ev.request_id: ev.token_ids for ev in eng.stream() if ev.finished}
    assert [out[r] for r in rids] == plain
    assert 0.4 < eng.acceptance_rate < 0.9  # some rounds accept 2 drafts, some stop at the wrong one


def test_sampling_is_deterministic_per_seed_and_batch_invariant(tiny: LongCatForCausalLM) -> None:
    prompts = _prompts((12, 90), seed=5)
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, min_p=0.01, ignore_eos=True)
    a = Engine(tiny).generate(prompts, [SamplingParams(seed=7, **kw), SamplingParams(seed=8, **kw)])
    b = Engine(tiny).generate(prompts, [SamplingParams(seed=7, **kw), SamplingParams(seed=8, **kw)])
    alone = Engine(tiny).generate(prompts[1:], SamplingParams(seed=8, **kw))
    other = Engine(tiny).generate(prompts[:1], SamplingParams(seed=9, **kw))
    assert a == b
    assert a[1] == alone[0]
    assert a[0] != other[0]


def test_speculative_sampling_is_deterministic_per_seed(tiny: LongCatForCausalLM) -> None:
    prompts = _prompts((40,), seed=6)
    p = SamplingParams(max_new_tokens=10, temperature=0.8, seed=3, ignore_eos=True)
    a = Engine(tiny, speculative=True).generate(prompts, p)
    b = Engine(tiny, speculative=True).generate(prompts, p)
    assert a == b and len(a[0]) == 10


def test_rejection_sampling_follows_the_target_distribution() -> None:
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    s = RequestSampler(SamplingParams(temperature=1.0, seed=0), [], 4)
    counts = torch.zeros(4)
    n = 6000
    for _ in range(n):
        d = s.sample_from(q)
        tok = d if s.accept_draft(p, q, d) else s.sample_from(s.residual(p, q))
        counts[tok] += 1
    torch.testing.assert_close(counts / n, p, atol=0.03, rtol=0)


def test_logit_processors() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 1.0, -3.0])
    s = RequestSampler(SamplingParams(temperature=1.0, repetition_penalty=2.0), [0, 1], 5)
    torch.testing.assert_close(s.process(logits), torch.tensor([1.0, -2.0, 0.5, 1.0, -3.0]))
    s = RequestSampler(SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=1.0), [0], 5)
    s.observe(3)
    s.observe(3)
    torch.testing.assert_close(s.process(logits), torch.tensor([2.0, -1.0, 0.5, -1.0, -3.0]))
    top_k = RequestSampler(SamplingParams(temperature=1.0, top_k=2), [], 5).probs(logits)
    assert (top_k > 0).tolist() == [True, False, False, True, False]
    top_p = RequestSampler(SamplingParams(temperature=1.0, top_p=0.6), [], 5).probs(logits)
    assert (top_p > 0).tolist() == [True, False, False, False, False]  # p(0) = 0.61 already reaches 0.6
    min_p = RequestSampler(SamplingParams(temperature=1.0, min_p=0.2), [], 5).probs(logits)
    assert (min_p > 0).tolist() == [True, False, True, True, False]
    greedy = RequestSampler(SamplingParams(), [], 5)
    assert greedy.sample(logits) == 0


def test_stop_ids_strings_eos_and_length(tiny: LongCatForCausalLM) -> None:
    (prompt,) = _prompts((30,), seed=7)
    free = Engine(tiny).generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    stop_tok = free[5]
    first = free.index(stop_tok)
    eng = Engine(tiny, eos_token_id=None)
    rid = eng.add_request(prompt, SamplingParams(max_new_tokens=12, stop_token_ids=[stop_tok]))
    events = list(eng.stream())
    assert events[-1].request_id == rid and events[-1].finish_reason == "stop"
    assert events[-1].stop_reason == stop_tok and events[-1].token_ids == free[: first + 1]
    # EOS = that token: same stop unless ignore_eos
    out = Engine(tiny, eos_token_id=stop_tok).generate([prompt], SamplingParams(max_new_tokens=12))[0]
    assert out == free[: first + 1]
    # stop strings through a detokenizer
    detok = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    eng = Engine(tiny, detokenize=detok, eos_token_id=None)
    eng.add_request(prompt, SamplingParams(max_new_tokens=12, stop=[f"<{free[3]}><{free[4]}>"]))
    last = list(eng.stream())[-1]
    assert last.token_ids == free[:5] and last.stop_reason == f"<{free[3]}><{free[4]}>"
    # length
    eng = Engine(tiny, eos_token_id=None)
    eng.add_request(prompt, SamplingParams(max_new_tokens=3))
    last = list(eng.stream())[-1]
    assert last.finish_reason == "length" and last.token_ids == free[:3]


def test_speculative_respects_stops(tiny: LongCatForCausalLM) -> None:
    (prompt,) = _prompts((30,), seed=7)
    free = Engine(tiny).generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    eng = Engine(tiny, speculative=True, eos_token_id=None)
    got = eng.generate([prompt], SamplingParams(max_new_tokens=7))[0]
    assert got == free[:7]


def test_streaming_events_abort_and_zero_tokens(tiny: LongCatForCausalLM) -> None:
    prompts = _prompts((10, 20, 15), seed=8)
    eng = Engine(tiny, max_batch_size=3)
    seen: dict[str, list[int]] = {}
    cb = lambda ev: seen.setdefault(ev.request_id, []).extend(ev.new_token_ids)  # noqa: E731
    a = eng.add_request(prompts[0], SamplingParams(max_new_tokens=6, ignore_eos=True), on_output=cb)
    b = eng.add_request(prompts[1], SamplingParams(max_new_tokens=50, ignore_eos=True), request_id="b")
    z = eng.add_request(prompts[2], SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError):
        eng.add_request(prompts[2], request_id="b")
    finals = {}
    steps = 0
    for ev in eng.stream():
        steps += 1
        if ev.request_id == b and len(ev.token_ids) >= 3 and not ev.finished:
            assert eng.abort(b)
        if ev.finished:
            finals[ev.request_id] = ev
    assert finals[a].finish_reason == "length" and seen[a] == finals[a].token_ids and len(seen[a]) == 6
    assert finals[b].finish_reason == "abort" and len(finals[b].token_ids) == 3
    assert finals[z].finish_reason == "length" and finals[z].token_ids == []
    assert not eng.abort(b) and not eng.has_unfinished()
    assert eng.runner.cache.num_held_blocks == 0


def test_generate_api_shapes(tiny: LongCatForCausalLM) -> None:
    ids = torch.tensor(_prompts((9, 9), seed=9))
    out = tiny.generate(ids, max_new_tokens=5, ignore_eos=True)
    assert out.shape == (2, 14) and torch.equal(out[:, :9], ids)
    lists = tiny.generate(ids.tolist(), max_new_tokens=5, ignore_eos=True)
    assert out[:, 9:].tolist() == lists
    assert tiny.generate(ids[0], max_new_tokens=5, ignore_eos=True).tolist() == out[0].tolist()
    with pytest.raises(TypeError):
        tiny.generate(ids, max_new_tokens=2, bogus=1)


def test_request_validation(tiny: LongCatForCausalLM) -> None:
    eng = Engine(tiny)
    with pytest.raises(ValueError):
        eng.add_request([])
    with pytest.raises(ValueError):
        eng.add_request([1, 99999])
    with pytest.raises(ValueError):
        eng.add_request([1, 2], SamplingParams(stop=["x"]))  # no detokenize callback
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


# --------------------------------------------------------------------------- hardening (issue 20)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 1e-45},
        {"temperature": 5e-324},
        {"temperature": 1e-40},
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 1.0, "repetition_penalty": 1e-300},
        {"temperature": 1e-45, "repetition_penalty": 1e-300, "top_p": 1e-300},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_extreme_sampling_values_never_make_nan(kw: dict) -> None:
    """Values that passed validation and used to give NaN probabilities: a temperature below 1e-5 is
    greedy, top_p 1e-300 keeps the top token (greedy), repetition_penalty 1e-300 gives finite logits."""
    logits = torch.tensor([2.0, -1.0, 0.5, 1.0, -3.0])
    s = RequestSampler(SamplingParams(**kw), [0, 1, 3], 5)
    probs = s.probs(logits)
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-6
    assert all(0 <= s.sample(logits) < 5 for _ in range(20))
    if kw.get("temperature", 1.0) < 1e-5 or "top_p" in kw:  # the limits are greedy
        assert s.sample(logits) == int(s.process(logits).argmax())


def test_logit_bias_steers_greedy_and_sampling() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 1.0, -3.0])
    assert RequestSampler(SamplingParams(logit_bias={0: -100.0}), [], 5).sample(logits) == 3
    assert RequestSampler(SamplingParams(logit_bias={4: 100.0}), [], 5).sample(logits) == 4
    sampled = RequestSampler(SamplingParams(temperature=1.0, logit_bias={1: 100.0}, seed=3), [], 5)
    assert {sampled.sample(logits) for _ in range(20)} == {1}
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: float("nan")})


class _PoisonedEngine(Engine):
    """The real engine with a fault injector: a request whose seed is POISON raises while sampling, and a
    forward over a segment that contains token POISON_TOKEN raises (as a kernel failure would)."""

    POISON, POISON_TOKEN = 666, 7

    def add_request(self, prompt_ids, params=None, request_id=None, on_output=None) -> str:
        rid = super().add_request(prompt_ids, params, request_id, on_output)
        if params is not None and params.seed == self.POISON:

            def boom(logits: torch.Tensor) -> int:
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

            self.requests[rid].sampler.sample = boom  # type: ignore[method-assign]
        return rid

    def __init__(self, model, **kw) -> None:
        super().__init__(model, **kw)
        forward = self.runner.forward

        def guarded(segs):
            if any(self.POISON_TOKEN in s.tokens.tolist() for s in segs):
                raise RuntimeError("injected kernel failure")
            return forward(segs)

        self.runner.forward = guarded  # type: ignore[method-assign]


@pytest.mark.parametrize("speculative", [False, True])
def test_one_failing_request_fails_alone(tiny: LongCatForCausalLM, speculative: bool) -> None:
    """A request that fails while sampling or in the forward ends with finish_reason "error" and a
    message; the other requests of the same batches finish exactly as they would alone."""
    prompts = [p for p in _prompts((12, 30, 9, 21)) if 7 not in p]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    want = Engine(tiny, speculative=speculative).generate(prompts, params)
    eng = _PoisonedEngine(tiny, max_batch_size=8, block_size=16, speculative=speculative)
    good = [eng.add_request(p, params) for p in prompts]
    bad_sample = eng.add_request(prompts[0], SamplingParams(max_new_tokens=6, seed=_PoisonedEngine.POISON))
    bad_forward = eng.add_request([5, 7, 9], params)
    finished = {ev.request_id: ev for ev in eng.stream() if ev.finished}
    assert [finished[r].token_ids for r in good] == want
    for rid in (bad_sample, bad_forward):
        assert finished[rid].finish_reason == "error" and finished[rid].error
    assert "nan" in finished[bad_sample].error and "kernel" in finished[bad_forward].error
    assert eng.runner.cache.num_held_blocks == 0  # everything released (free or only cached)


@pytest.mark.parametrize(("interleave", "plateau"), [(True, False), (False, False), (True, True)])
def test_engine_attention_matches_the_spec_reference(interleave: bool, plateau: bool) -> None:
    """Prefill and cached sparse decode: every attention output the engine computes equals tests/lsa_reference.py
    (indexer RoPE layout, forced tokens, tie rule, cross-layer reuse) on the attention inputs of the sequence."""
    model = reference_model(interleave, plateau)
    cfg = model.config
    prompt = _prompts((150,))[0]
    seen, handles = capture_attention(model)
    out = generate(model, [prompt], max_new_tokens=24, eos_token_id=None)[0]
    engine_outs = {key: torch.cat(calls, dim=1)[0] for (key, kind), calls in seen.items() if kind == "out"}
    seen.clear()
    with torch.no_grad():  # the same sequence through the model: the attention inputs for the reference
        model(torch.tensor([prompt + out[:-1]]))
    for h in handles:
        h.remove()
    xs = {key: calls[0][0] for (key, kind), calls in seen.items() if kind == "x"}
    t = len(prompt) + len(out) - 1
    assert all(o.shape[0] == t for o in engine_outs.values())
    compared = assert_attention_matches(model, xs, engine_outs, cfg)
    assert compared > 0.9 * cfg.num_layers * (t - cfg.index_topk)


def test_grammar_mask_survives_extreme_penalties() -> None:
    """A masked logit is -inf; a repetition penalty of 1e-300 (0 in fp32) must not turn it into NaN."""

    class OnlySome:  # the constraint protocol the sampler reads: an allowed-token mask
        active = True

        def mask(self) -> torch.Tensor:
            allowed = torch.zeros(50, dtype=torch.bool)
            allowed[[3, 7, 9]] = True
            return allowed

    s = RequestSampler(SamplingParams(temperature=1.0, repetition_penalty=1e-300), [3, 7, 1], 50)
    s.constraint = OnlySome()
    probs = s.probs(torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3)
    assert torch.isfinite(probs).all() and set(probs.nonzero().flatten().tolist()) <= {3, 7, 9}
