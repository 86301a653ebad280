"""LSA semantics: dense equivalence, causality, forced tokens, cross-layer reuse, ties, the spec reference
(tests/lsa_reference.py), DeepSeek-V3.2 indexer and sparse-attention parity."""

import pytest
import torch
from lsa_reference import assert_attention_matches, capture_attention, indexer_scores, reference_model
from lsa_reference import select as reference_select

from longcat2.config import ModelConfig
from longcat2.model.attention import MLA
from longcat2.model.layers import RotaryEmbedding
from longcat2.model.longcat import LongCatForCausalLM
from longcat2.model.lsa import force_and_mask, index_scores, lsa_select, select_topk


def _mla(cfg, t):
    mla = MLA(cfg, has_indexer=True)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.ones_(p)
    rope = RotaryEmbedding(cfg)
    pos = torch.arange(t)
    cos, sin = rope(pos)
    return mla, cos, sin, pos


def test_sparse_with_all_keys_equals_dense_forward_and_backward():
    cfg = ModelConfig.from_preset("tiny")
    t = 40
    mla, cos, sin, pos = _mla(cfg, t)
    x = torch.randn(2, t, cfg.hidden_size, requires_grad=True)
    all_keys = select_topk(force_and_mask(torch.zeros(2, t, t), pos, 0, 0), k=t)  # every visible key
    outs, grads = [], []
    for path in ("dense", "sparse"):
        mla.zero_grad()
        x.grad = None
        p = mla.project(x, cos, sin)
        o = (
            mla.dense(p, p.kv_latent, p.k_rope, pos)
            if path == "dense"
            else mla.sparse(p, p.kv_latent, p.k_rope, all_keys)
        )
        (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
        outs.append(o.detach())
        grads.append([x.grad.clone()] + [q.grad.clone() for q in (mla.q_b_proj.weight, mla.kv_b_proj.weight)])
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for g_dense, g_sparse in zip(*grads):
        assert torch.allclose(g_dense, g_sparse, atol=1e-4, rtol=1e-3)


def test_model_is_dense_while_the_context_fits_in_top_k():
    cfg = ModelConfig.from_preset("tiny")
    model = LongCatForCausalLM(cfg).eval()
    ids = torch.randint(4, cfg.vocab_size, (1, cfg.index_topk))
    big = LongCatForCausalLM(cfg.replace(index_topk=4096)).eval()
    big.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(ids), big(ids))  # T <= index_topk: no selection at all


def test_selection_is_causal_forced_and_complete():
    cfg = ModelConfig.from_preset("tiny")  # top-k 64 = 4 sink + 16 local + 44 dynamic
    t = 300
    mla, cos, sin, pos = _mla(cfg, t)
    x = torch.randn(1, t, cfg.hidden_size)
    p = mla.project(x, cos, sin)
    idx = mla.select(x, p, cos, sin, pos)[0]  # [T, k]
    assert idx.shape == (t, cfg.index_topk)
    for q in range(t):
        row = idx[q]
        chosen = row[row >= 0]
        assert chosen.max() <= q  # no future key
        assert len(set(chosen.tolist())) == len(chosen)  # no duplicates
        if q + 1 <= cfg.index_topk:
            assert chosen.tolist() == list(range(q + 1))  # short rows see everything
        else:
            assert len(chosen) == cfg.index_topk
            forced = set(range(cfg.index_init_tokens)) | set(range(q - cfg.index_local_tokens + 1, q + 1))
            assert forced <= set(chosen.tolist())
        assert torch.all(chosen[1:] > chosen[:-1])  # ascending order


def test_sublayer_1_reuses_sublayer_0_indices():
    cfg = ModelConfig.from_preset("tiny")
    model = LongCatForCausalLM(cfg).eval()
    seen = {}

    def grab(name):
        def hook(module, args, output):
            seen[name] = (args[4] if len(args) > 4 else None, output[1])

        return hook

    layer = model.model.layers[1]
    layer.self_attn[0].register_forward_hook(grab("owner"))
    layer.self_attn[1].register_forward_hook(grab("reuser"))
    assert layer.self_attn[1].indexer is None and layer.self_attn[0].indexer is not None
    with torch.no_grad():
        model(torch.randint(4, cfg.vocab_size, (1, 150)))
    owner_out = seen["owner"][1]
    assert owner_out is not None and owner_out.shape == (1, 150, cfg.index_topk)
    assert torch.equal(seen["reuser"][0], owner_out)


def test_tie_rule_prefers_later_positions_and_is_deterministic():
    scores = torch.zeros(1, 1, 10)  # a ReLU plateau: every key scores 0
    scores[0, 0, 2] = 1.0
    idx = select_topk(scores, 4)
    assert idx.tolist() == [[[2, 7, 8, 9]]]
    assert all(torch.equal(select_topk(scores, 4), idx) for _ in range(5))


def test_chunked_selection_equals_one_shot():
    cfg = ModelConfig.from_preset("tiny")
    t = 200
    mla, cos, sin, pos = _mla(cfg, t)
    x = torch.randn(2, t, cfg.hidden_size)
    p = mla.project(x, cos, sin)
    q, w = mla.indexer.queries(x, p.q_lora, cos, sin)
    keys = mla.indexer.keys(x, cos, sin)
    a = lsa_select(mla.indexer, q, w, keys, pos, cfg.replace(index_query_chunk=7))
    b = lsa_select(mla.indexer, q, w, keys, pos, cfg.replace(index_query_chunk=4096))
    assert torch.equal(a, b)


def _deepseek_v32_configs(**overrides):
    """Our config in the DeepSeek-V3.2 form (LayerNorm key norm, half-split indexer RoPE, no forced tokens, no
    YaRN) and the matching transformers DeepseekV32Config; returns (cfg, hf_cfg, modeling_deepseek_v32)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as ds

    cfg = ModelConfig.from_preset(
        "tiny",
        index_k_norm_type="layernorm",
        indexer_rope_interleave=False,
        index_init_tokens=0,
        index_local_tokens=0,
        rope_scaling=None,
        mla_norm_eps=1e-6,  # transformers' DeepSeek-V3.2 q_a/kv_a RMSNorm eps
        **overrides,
    )
    hf_cfg = transformers.DeepseekV32Config(
        hidden_size=cfg.hidden_size,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        v_head_dim=cfg.v_head_dim,
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    hf_cfg._attn_implementation = "eager"
    return cfg, hf_cfg, ds


def test_indexer_matches_transformers_deepseek_v32_indexer():
    cfg, hf_cfg, ds = _deepseek_v32_configs()
    hf_idx = ds.DeepseekV32Indexer(hf_cfg, 0).eval()
    t = 90
    mla, cos, sin, pos = _mla(cfg, t)
    with torch.no_grad():
        for name in ("wq_b", "wk", "weights_proj"):
            getattr(hf_idx, name).weight.copy_(getattr(mla.indexer, name).weight)
        hf_idx.k_norm.weight.copy_(torch.rand(cfg.index_head_dim) + 0.5)
        hf_idx.k_norm.bias.copy_(torch.randn(cfg.index_head_dim) * 0.1)
        mla.indexer.k_norm.load_state_dict(hf_idx.k_norm.state_dict())
    x = torch.randn(1, t, cfg.hidden_size)
    q_lora = torch.randn(1, t, cfg.q_lora_rank)
    hf_cos, hf_sin = ds.DeepseekV32RotaryEmbedding(hf_cfg)(x, pos[None])
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        q, w = mla.indexer.queries(x, q_lora, cos, sin)
        ours = force_and_mask(index_scores(q, w, mla.indexer.keys(x, cos, sin)), pos, 0, 0)[0]
        hf_rank = hf_idx(x, q_lora, (hf_cos, hf_sin), mask, pos[None]).long()[0]  # top-k by HF score
    k = cfg.index_topk
    for row in range(k, t):  # rows with more visible keys than k
        s = ours[row]
        kth = s.topk(k).values[-1]
        margin = (s - kth).abs() > 1e-5 * s.abs().max()  # away from the selection boundary
        ours_set = set(select_topk(s[None], k)[0].tolist())
        hf_set = set(hf_rank[row].tolist())
        clear = set(torch.nonzero(margin).flatten().tolist())
        assert ours_set & clear == hf_set & clear


@pytest.mark.parametrize(("interleave", "plateau"), [(True, False), (False, False), (True, True)])
def test_model_matches_the_spec_reference(interleave: bool, plateau: bool):
    """Indexer RoPE layout, forced sink/local tokens, the tie rule and cross-layer reuse, against
    tests/lsa_reference.py (written from the spec; shares no code with the model)."""
    model = reference_model(interleave, plateau)
    cfg = model.config
    seen, handles = capture_attention(model)
    t = 200
    with torch.no_grad():
        model(torch.randint(4, cfg.vocab_size, (1, t)))
    for h in handles:
        h.remove()
    xs = {key: calls[0][0] for (key, kind), calls in seen.items() if kind == "x"}
    outs = {key: calls[0][0] for (key, kind), calls in seen.items() if kind == "out"}
    compared = assert_attention_matches(model, xs, outs, cfg)
    assert compared > 0.9 * cfg.num_layers * (t - cfg.index_topk)


def test_reference_indexer_layouts_differ():
    """The two RoPE layouts give different selections on the same weights (so the test above can tell them
    apart), and the plateau case selects the sink plus the latest keys."""
    model = reference_model(True)
    cfg = model.config
    owner = model.model.layers[0].self_attn[0]
    x = torch.randn(150, cfg.hidden_size)
    inter, _ = reference_select(indexer_scores(owner.state_dict(), x, cfg), cfg)
    half, _ = reference_select(
        indexer_scores(owner.state_dict(), x, cfg.replace(indexer_rope_interleave=False)), cfg
    )
    assert sum(a != b for a, b in zip(inter, half)) > 0.5 * (150 - cfg.index_topk)
    torch.nn.init.zeros_(owner.indexer.wq_b.weight)
    flat, _ = reference_select(indexer_scores(owner.state_dict(), x, cfg), cfg)
    window = cfg.index_topk - cfg.index_init_tokens
    assert flat[149] == list(range(cfg.index_init_tokens)) + list(range(150 - window, 150))


def test_sparse_mla_matches_transformers_deepseek_v32_attention():
    """Top-k < T: our MLA with its indexer in the DeepSeek configuration (no LoRA scaling, LayerNorm key norm,
    half-split indexer RoPE, no forced tokens) equals transformers' DeepseekV32Attention on every row whose
    selection has no near tie (transformers' top-k has no tie rule)."""
    cfg, hf_cfg, ds = _deepseek_v32_configs(
        mla_scale_q_lora=False,
        mla_scale_kv_lora=False,
        index_n_heads=16,  # fewer ReLU plateaus (exact ties) than the tiny preset's 4 heads
    )
    t = 120
    mla, cos, sin, pos = _mla(cfg, t)
    with torch.no_grad():
        for p in mla.parameters():
            p.mul_(0.5)
        mla.indexer.k_norm.bias.normal_(0, 0.1)
    hf_attn = ds.DeepseekV32Attention(hf_cfg, 0).eval()
    missing, unexpected = hf_attn.load_state_dict(mla.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    x = torch.randn(1, t, cfg.hidden_size)
    hf_cos, hf_sin = ds.DeepseekV32RotaryEmbedding(hf_cfg)(x, pos[None])
    causal = torch.zeros(t, t).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))[
        None, None
    ]
    with torch.no_grad():
        ours, indices = mla(x, cos, sin, pos)
        theirs = hf_attn(x, (hf_cos, hf_sin), causal, position_ids=pos[None])[0]
    assert indices is not None  # the sparse path ran
    sets, fragile = reference_select(indexer_scores(mla.state_dict(), x[0], cfg), cfg, tie_rule=False)
    for row in range(t):
        assert indices[0, row][indices[0, row] >= 0].tolist() == sets[row] or fragile[row], row
    keep = ~torch.tensor(fragile)
    assert int(keep[cfg.index_topk :].sum()) > 0.9 * (t - cfg.index_topk)
    err = (ours[0] - theirs[0]).abs().amax(-1)
    assert float(err[keep].max()) < 1e-4 * (1 + float(theirs.abs().max())), float(err[keep].max())
