"""N-gram hashing against hand-computed ids, EOS reset, history continuation, fusion rules."""

import math

import pytest
import torch

from longcat2.config import ModelConfig
from longcat2.model.ngram import NgramEmbedding

V, EOS = 512, 2


def _cfg(**kw):
    return ModelConfig.from_preset("tiny", **kw)  # oe_neighbor_num 3, oe_split_num 2 → 4 tables


def _hand_ids(tokens, cfg):
    """Independent re-statement of spec §2.1 with Python integers."""
    m = math.floor(cfg.oe_vocab_size_ratio * cfg.vocab_size)
    out = []
    for t in range(len(tokens)):
        row = []
        for n in range(2, cfg.oe_neighbor_num + 1):
            for k in range(cfg.oe_split_num):
                i = (n - 2) * cfg.oe_split_num + k
                mod = m + 2 * i + 1
                total = 0
                for j in range(n):
                    pos = t - j
                    crosses_eos = any(tokens[p] == EOS for p in range(max(pos, 0), t))
                    tok = tokens[pos] if pos >= 0 and not crosses_eos else 0
                    total += tok * (cfg.vocab_size**j % mod)
                row.append(total % mod)
        out.append(row)
    return out


def test_hash_matches_hand_computed_ids_with_eos_reset():
    cfg = _cfg()
    emb = NgramEmbedding(cfg)
    tokens = [5, 17, 300, EOS, 9, 44, 511, 0, EOS, EOS, 77]
    got = emb.ngram_ids(torch.tensor([tokens]))[0].tolist()
    assert got == _hand_ids(tokens, cfg)
    # spot-check one value fully by hand: position 2, bigram table 0 (mod m+1): 300 + 17·V
    m = math.floor(cfg.oe_vocab_size_ratio * V)
    assert got[2][0] == (300 + 17 * (V % (m + 1))) % (m + 1)
    # right after an EOS the context is empty: token 9 at position 4 hashes as (9, 0, ...)
    assert got[4][0] == 9 % (m + 1)


def test_released_2_0_sizes_do_not_overflow():
    cfg = ModelConfig.from_preset("longcat-2.0")
    with torch.device("meta"):
        emb = NgramEmbedding(cfg)
    big = torch.tensor([[cfg.vocab_size - 1] * 6])
    ids = emb.ngram_ids(big)
    assert (ids >= 0).all() and (ids < emb._moduli).all()
    assert [e.num_embeddings for e in emb.embedders][:2] == [16476897 + 1, 16476897 + 3]


def test_history_continues_across_chunks():
    cfg = _cfg()
    emb = NgramEmbedding(cfg)
    tokens = torch.tensor([[5, 17, EOS, 300, 9, 44, 511, 8, 1]])
    full = emb.ngram_ids(tokens)
    for cut in range(1, tokens.shape[1]):
        head, tail = tokens[:, :cut], tokens[:, cut:]
        hist = head[:, -(cfg.oe_neighbor_num - 1) :]
        assert torch.equal(torch.cat([emb.ngram_ids(head), emb.ngram_ids(tail, hist)], 1), full)


@pytest.mark.parametrize("fusion", ["mean", "residual"])
def test_fusion_rules(fusion):
    cfg = _cfg(ngram_fusion=fusion)
    emb = NgramEmbedding(cfg)
    ids = torch.randint(4, V, (1, 6))
    word = torch.randn(1, 6, cfg.hidden_size)
    ngram_ids = emb.ngram_ids(ids)
    total = sum(p(e(ngram_ids[..., i])) for i, (e, p) in enumerate(zip(emb.embedders, emb.post_projs)))
    t = cfg.ngram_num_tables
    want = (word + total) / (1 + t) if fusion == "mean" else word + total / (1 + t)
    assert torch.allclose(emb(ids, word), want, atol=1e-6)
