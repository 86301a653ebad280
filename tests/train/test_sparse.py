"""LSA training losses: gradient routing, proper targets, selected-set restriction, warm-up raises recall."""

import pytest
import torch

from longcat2.config import ModelConfig
from longcat2.model.longcat import LongCatForCausalLM
from longcat2.model.lsa import index_scores
from longcat2.train.sparse import IndexerDistiller, attention_distribution


def _model(**kw):
    cfg = ModelConfig.from_preset("tiny", mtp_num_layers=0, **kw)
    return cfg, LongCatForCausalLM(cfg)


def test_target_is_a_causal_distribution():
    cfg, model = _model()
    mla = model.model.layers[0].self_attn[0]
    t = 50
    pos = torch.arange(t)
    cos, sin = model.model.rotary_emb(pos)
    p = attention_distribution(mla, torch.randn(2, t, cfg.hidden_size), cos, sin, pos, slice(0, t))
    assert torch.allclose(p.sum(-1), torch.ones(2, t), atol=1e-5)
    assert (p >= 0).all() and (p.triu(1) == 0).all()


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_gradient_routing_indexer_only_from_kl_rest_only_from_lm(mode):
    cfg, model = _model()
    dist = IndexerDistiller(model)
    ids = torch.randint(4, cfg.vocab_size, (2, 120))  # > top-k 64: the sparse path is active
    logits = model(ids)
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    kl = dist.loss(mode).loss
    indexer = {n for n, _ in model.named_parameters() if ".indexer." in n}
    lm_grads = torch.autograd.grad(lm, list(model.parameters()), allow_unused=True)
    kl_grads = torch.autograd.grad(kl, list(model.parameters()), allow_unused=True)
    for (name, _), g_lm, g_kl in zip(model.named_parameters(), lm_grads, kl_grads):
        if name in indexer:
            assert g_lm is None or g_lm.abs().sum() == 0, name
            assert g_kl is not None and g_kl.abs().sum() > 0, name
        else:
            assert g_kl is None or g_kl.abs().sum() == 0, name


def _selected_set_kl(target: torch.Tensor, logits: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Σ_rows KL(p|S ‖ softmax(I|S)) with p renormalised on S, written out row by row (the DSA sparse-stage loss)."""
    total = torch.zeros((), dtype=torch.float64)
    for b in range(sel.shape[0]):
        for t in range(sel.shape[1]):
            s = sel[b, t][sel[b, t] >= 0]
            p = target[b, t, s].double()
            p = p / p.sum()
            log_q = torch.log_softmax(logits[b, t, s].double(), dim=0)
            total = total + (p * (p.log() - log_q)).sum()
    return total


def test_sparse_kl_is_restricted_to_the_selected_set():
    torch.manual_seed(0)
    cfg, model = _model()
    dist = IndexerDistiller(model, cross_layer_target=False)
    b, t = 2, 150  # > top-k 64: the selected set is a strict subset of the causal row
    with torch.no_grad():
        model(torch.randint(4, cfg.vocab_size, (b, t)))
    caps = {id(o): dist._captured[id(o)] for o, _ in dist.pairs}
    loss = dist.loss("sparse").loss
    expected = torch.zeros((), dtype=torch.float64)
    for owner, _ in dist.pairs:
        cap = caps[id(owner)]
        assert cap.indices is not None and (cap.indices[:, -1] >= 0).sum() == b * cfg.index_topk
        target = attention_distribution(owner, cap.x, cap.cos, cap.sin, cap.positions, slice(0, t))
        with torch.no_grad():
            q_lora = owner.project(cap.x, cap.cos, cap.sin).q_lora
            q, w = owner.indexer.queries(cap.x, q_lora, cap.cos, cap.sin)
            logits = index_scores(q, w, owner.indexer.keys(cap.x, cap.cos, cap.sin))  # [B, T, T]
        # The selected set holds at most index_topk of the visible keys, and the target puts mass outside it,
        # so renormalising over the whole row instead of S would give a different (and not a KL) value.
        outside = 1 - target.gather(-1, cap.indices.clamp(min=0)).masked_fill(cap.indices < 0, 0).sum(-1)
        assert outside[:, cfg.index_topk :].min() > 1e-3
        expected = expected + _selected_set_kl(target, logits, cap.indices) / (b * t)
    assert torch.allclose(loss.double(), expected, rtol=1e-4, atol=1e-6), (float(loss), float(expected))


def test_dense_warmup_raises_indexer_recall():
    torch.manual_seed(0)
    cfg, model = _model(index_topk=32, index_init_tokens=2, index_local_tokens=6)
    with torch.no_grad():  # a peaked (trained-looking) attention to distil; 0.02-std init is near uniform
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".indexer." not in name:
                p.normal_(0, 0.15)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if ".indexer." in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    dist = IndexerDistiller(model)
    ids = torch.randint(4, cfg.vocab_size, (4, 128))
    recalls, ceilings = [], []
    for _ in range(30):
        with torch.no_grad():
            model(ids)
        out = dist.loss("dense")
        recalls.append(sum(out.recall) / len(out.recall))
        # the ceiling (the most any top-k keys can hold) bounds the recall
        assert all(r <= c + 1e-5 for r, c in zip(out.recall, out.recall_ceiling))
        ceilings.append(out.recall_ceiling)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert recalls[-1] > recalls[0] + 0.05, recalls
    assert max(ceilings[0]) < 1.0  # rows see more keys than the budget: even the best top-k misses mass
