"""Task generators: deterministic from the seed, answers recoverable from the prompt, masks on answers only."""

import numpy as np
import pytest
import torch

from longcat2.evals.longctx import evaluate_longctx, exact_match, predict_answers
from longcat2.evals.tasks import TASKS, TaskVocab, make_examples

V = TaskVocab()


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_and_sized(task):
    a = make_examples(task, 5, 300, seed=7)
    b = make_examples(task, 5, 300, seed=7)
    c = make_examples(task, 5, 300, seed=8)
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b))
    assert not all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, c))
    for e in a:
        assert abs(len(e.tokens) - 300) <= 2
        assert e.tokens.max() < V.size and e.tokens.min() >= 1
        spans = np.zeros(len(e.tokens), dtype=bool)
        for s, t in e.answers:
            spans[s:t] = True
        assert np.array_equal(spans, e.loss_mask)  # loss only on answers


def _recover(task, e):
    """Solve the example from its prompt alone (proves the answer is recoverable)."""
    m = V.markers
    toks = e.tokens.tolist()
    if task == "passkey":
        k = toks.index(m["KEY"])
        return [toks[k + 1 : k + 6]]
    if task == "niah":
        q = toks[len(toks) - 5]  # [QUERY key ANSWER] + 3 value tokens
        i = [j for j in range(len(toks) - 1) if toks[j] == m["NEEDLE"] and toks[j + 1] == q][0]
        return [toks[i + 3 : i + 6]]
    if task == "mqar":
        qpos = toks.index(m["QUERY"])
        table = {toks[j]: toks[j + 1] for j in range(qpos) if V.key0 <= toks[j] < V.value0}
        return [[table[toks[s - 1]]] for s, _ in e.answers]
    if task == "vt":
        assign = {toks[j - 1]: toks[j + 1] for j in range(len(toks) - 4) if toks[j] == m["ASSIGN"]}
        x = toks[-3]
        while x in assign:
            x = assign[x]
        return [[x]]


@pytest.mark.parametrize("task", TASKS)
def test_answer_is_recoverable_from_prompt(task):
    for e in make_examples(task, 20, 400, seed=3):
        assert _recover(task, e) == [e.tokens[s:t].tolist() for s, t in e.answers]


def test_depth_places_the_needle():
    for depth in (0.0, 0.5, 1.0):
        e = make_examples("passkey", 1, 1000, seed=1, depths=[depth])[0]
        pos = e.tokens.tolist().index(V.markers["KEY"]) / len(e.tokens)
        assert abs(pos - depth) < 0.05


def test_scoring_counts_exact_matches():
    ex = make_examples("mqar", 3, 80, seed=2)
    truth = [{t: int(e.tokens[t]) for t in range(1, len(e.tokens))} for e in ex]
    assert [exact_match(e, p) for e, p in zip(ex, truth)] == [1.0, 1.0, 1.0]
    shifted = [{t: v + 1 for t, v in p.items()} for p in truth]
    assert [exact_match(e, p) for e, p in zip(ex, shifted)] == [0.0, 0.0, 0.0]
    one_wrong = dict(truth[0])
    a, _ = ex[0].answers[0]
    one_wrong[a] += 1
    assert exact_match(ex[0], one_wrong) == 1 - 1 / len(ex[0].answers)


def test_engine_predictions_equal_the_full_forward_argmax():
    """The engine's prefill + cached (sparse, context > index_topk) decode predicts, at every answer
    position, the argmax of the model's plain full forward."""
    from longcat2.config import ModelConfig
    from longcat2.model.longcat import LongCatForCausalLM

    torch.manual_seed(0)
    model = LongCatForCausalLM(
        ModelConfig.from_preset("tiny", mtp_num_layers=0, initializer_range=0.1)
    ).eval()
    ex = make_examples("mqar", 3, 200, seed=5) + make_examples("passkey", 2, 150, seed=6)
    preds = predict_answers(model, ex, batch_size=2, prefill_chunk=64)
    for e, p in zip(ex, preds):
        with torch.no_grad():
            full = model(torch.from_numpy(e.tokens)[None])[0].argmax(-1)  # full[t] predicts token t+1
        first = e.answers[0][0]
        assert sorted(p) == list(range(first, len(e.tokens)))
        assert p == {t: int(full[t - 1]) for t in p}


def test_evaluate_grid_places_every_cell():
    """An oracle that knows only the length-64 cells' examples: that row scores 1, the other 0, mean 0.5."""
    lengths, depths, per_cell, seed = [64, 128], [0.0, 0.5, 1.0], 2, 1234
    known = [
        e
        for di, depth in enumerate(depths)
        for e in make_examples("passkey", per_cell, 64, seed + di, [depth])  # the cells' examples (li = 0)
    ]
    truth = {e.tokens.tobytes(): {t: int(e.tokens[t]) for t in range(1, len(e.tokens))} for e in known}

    def oracle(examples):  # the true tokens for the examples it knows, a wrong token elsewhere
        return [truth.get(e.tokens.tobytes(), {t: -1 for t, _ in e.answers}) for e in examples]

    model = torch.nn.Linear(1, 1)  # not called: the predictions come from the oracle
    res = evaluate_longctx(model, "passkey", lengths, depths=3, per_cell=per_cell, seed=seed, predict=oracle)
    assert res["depths"] == depths
    assert res["accuracy"] == {
        "64": {"0.0": 1.0, "0.5": 1.0, "1.0": 1.0},
        "128": {"0.0": 0.0, "0.5": 0.0, "1.0": 0.0},
    }
    assert res["mean"] == 0.5


def test_evaluate_grid_with_a_real_model():
    from longcat2.config import ModelConfig
    from longcat2.model.longcat import LongCatForCausalLM

    model = LongCatForCausalLM(ModelConfig.from_preset("tiny", mtp_num_layers=0)).eval()
    res = evaluate_longctx(model, "passkey", [64, 128], depths=3, per_cell=2)
    assert set(res["accuracy"]) == {"64", "128"} and len(res["accuracy"]["64"]) == 3
    cells = [v for row in res["accuracy"].values() for v in row.values()]
    assert all(v in (0.0, 0.5, 1.0) for v in cells)  # 2 examples per cell
    assert res["mean"] == sum(cells) / len(cells)
