"""Constrained decoding in the engine: llguidance masks computed in one batch equal the per-request masks,
and a constrained request (greedy, sampled, next to unconstrained ones, in a speculative engine) can only
produce what its grammar allows, then EOS — from a random model that would otherwise write anything."""

from __future__ import annotations

import json

import pytest
import torch

from longcat2 import ModelConfig
from longcat2.engine import Engine, SamplingParams
from longcat2.engine.grammar import GrammarError, Grammars, fill_masks
from longcat2.engine.sampling import RequestSampler
from longcat2.model.longcat import LongCatForCausalLM
from longcat2.serve.core import DEFAULT_MODEL_DIR
from longcat2.tokenizer import load_tokenizer

pytest.importorskip("llguidance")
SCHEMA = {
    "type": "object",
    "properties": {"a": {"enum": [1, 2, 3]}, "b": {"type": "boolean"}},
    "required": ["a", "b"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_MODEL_DIR)  # the shipped tokenizer (the embedded model's)


@pytest.fixture(scope="module")
def grammars(tok) -> Grammars:
    return Grammars(tok.backend.to_str(), 4096, tok.eos_id)


@pytest.fixture(scope="module")
def model() -> LongCatForCausalLM:
    torch.manual_seed(0)
    return LongCatForCausalLM(ModelConfig.from_preset("tiny", vocab_size=4096, initializer_range=0.1)).eval()


def test_batched_masks_equal_single_masks(grammars, tok):
    lark = ['start: "yes" | "no"\n', f"start: %json {json.dumps(SCHEMA)}\n", 'start: /[0-9]+/ "!"\n']
    samplers = [RequestSampler(SamplingParams(grammar=grammars.compile(g)), [1], 4096) for g in lark]
    samplers[2].observe(tok.encode("12")[0])  # a matcher mid-way
    plain = RequestSampler(SamplingParams(), [1], 4096)
    fill_masks([*samplers, plain])
    assert plain.allowed is None
    for s in samplers:
        assert torch.equal(s.allowed, s.constraint.mask())
        assert 0 < int(s.allowed.sum()) < 4096
    yes = tok.encode("yes")[0]
    assert bool(samplers[0].allowed[yes]) and not bool(samplers[0].allowed[tok.encode("maybe")[0]])
    logits = torch.zeros(4096)
    logits[tok.encode("maybe")[0]] = 100.0
    logits[yes] = 1.0
    assert int(samplers[0].process(logits).argmax()) == yes  # the mask wins over the logits


def test_bad_grammar_is_a_clear_error(grammars):
    with pytest.raises(GrammarError):
        grammars.compile("start: undefined_rule\n")


@pytest.mark.parametrize("speculative", [False, True])
def test_constrained_requests_follow_their_grammar(model, grammars, tok, speculative):
    eng = Engine(
        model, max_batch_size=8, speculative=speculative, detokenize=tok.decode, eos_token_id=tok.eos_id
    )
    prompts = [tok.encode(p) for p in ("Reply in JSON:", "x = ", "def f():", "JSON please")]
    params = [
        SamplingParams(max_new_tokens=40, grammar=grammars.compile(f"start: %json {json.dumps(SCHEMA)}\n")),
        SamplingParams(max_new_tokens=20),  # unconstrained, same batch
        SamplingParams(
            max_new_tokens=40, temperature=1.0, seed=3, grammar=grammars.compile('start: "ok" | "fine"\n')
        ),
        SamplingParams(
            max_new_tokens=40,
            temperature=1.0,
            seed=5,
            grammar=grammars.compile(f"start: %json {json.dumps(SCHEMA)}\n"),
        ),
    ]
    outs = eng.generate(prompts, params)
    for i in (0, 3):
        assert outs[i][-1] == tok.eos_id, tok.decode(outs[i])
        doc = json.loads(tok.decode(outs[i][:-1]))
        assert doc["a"] in (1, 2, 3) and isinstance(doc["b"], bool) and set(doc) == {"a", "b"}
    assert tok.decode(outs[2][:-1]) in ("ok", "fine") and outs[2][-1] == tok.eos_id
    assert len(outs[1]) == 20  # the random model rambles where it is not constrained
