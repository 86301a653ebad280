"""Model-level behaviour: parity with transformers' LongcatFlash, published parameter counts, MTP, gradients."""

import pytest
import torch
from hf_reference import random_longcat_flash

from longcat2.commands import model_stats
from longcat2.config import ModelConfig
from longcat2.model.longcat import LongCatForCausalLM

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def _hf_pair(rope_scaling):
    _, cfg, hf = random_longcat_flash(rope_scaling)
    ours = LongCatForCausalLM(cfg).eval()
    state = {}
    e, i = cfg.n_routed_experts, cfg.expert_ffn_hidden_size
    for k, v in hf.state_dict().items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            state[base + "gate_proj"], state[base + "up_proj"] = v[:e, :i], v[:e, i:]
        else:
            state[k] = v
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert unexpected == [] and all(k.startswith("model.mtp.") for k in missing)
    return cfg, hf, ours


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["plain-rope", "deepseek-yarn"])
def test_logits_match_transformers_longcat_flash(rope_scaling):
    cfg, hf, ours = _hf_pair(rope_scaling)
    ids = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape == (2, 37, cfg.vocab_size)
    assert (got - ref).abs().max().item() < 1e-4


def test_correction_bias_changes_selection_not_gates():
    cfg, hf, ours = _hf_pair(None)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        base = ours(ids)
        for layer in ours.model.layers:
            layer.mlp.router.e_score_correction_bias.add_(10.0)  # uniform shift: same selection
        assert torch.allclose(ours(ids), base)
        layer = ours.model.layers[0]
        layer.mlp.router.e_score_correction_bias[cfg.n_routed_experts :] += 100.0  # force zero experts
        assert not torch.allclose(ours(ids), base)


@pytest.mark.parametrize(
    "preset, total, lo, hi",
    [
        ("longcat-2.0", 1638.6e9, 33.4e9, 56.4e9),
        ("longcat-flash", 560.7e9, 18.7e9, 31.4e9),
        ("longcat-flash-lite", 68.56e9, 2.93e9, 4.52e9),
    ],
)
def test_published_parameter_counts_from_a_meta_model(preset, total, lo, hi):
    s = model_stats(ModelConfig.from_preset(preset))
    assert abs(s["total_params"] / total - 1) < 0.001
    assert abs(s["active_params_min"] / lo - 1) < 0.002
    assert abs(s["active_params_max"] / hi - 1) < 0.002
    if preset == "longcat-2.0":
        assert s["kv_cache_bytes_per_token"] == 87552  # 76 sublayers × 576 × 2 B


@pytest.mark.parametrize("preset", ["tiny", "tiny-flash", "tiny-flash-lite"])
def test_tiny_presets_forward_backward_with_mtp(preset):
    cfg = ModelConfig.from_preset(preset)
    model = LongCatForCausalLM(cfg)
    t = 96  # > index_topk of `tiny`: the sparse path is active
    ids = torch.randint(4, cfg.vocab_size, (2, t))
    out = model(ids, return_dict=True, with_mtp=True)
    assert out.logits.shape == (2, t, cfg.vocab_size)
    assert [m.shape[1] for m in out.mtp_logits] == [t - k for k in range(1, cfg.mtp_num_layers + 1)]
    loss = out.logits.float().logsumexp(-1).mean() + sum(
        m.float().logsumexp(-1).mean() for m in out.mtp_logits
    )
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and ".indexer." not in n]
    assert (
        no_grad == []
    )  # the indexer learns only from its own KL loss (LSA recipe), everything else gets LM grad
    assert torch.isfinite(out.logits).all()


def test_forward_is_deterministic_and_causal():
    cfg = ModelConfig.from_preset("tiny")
    model = LongCatForCausalLM(cfg).eval()
    ids = torch.randint(4, cfg.vocab_size, (1, 120))
    with torch.no_grad():
        a, b = model(ids), model(ids)
        assert torch.equal(a, b)
        changed = ids.clone()
        changed[0, 100:] = (changed[0, 100:] + 7) % cfg.vocab_size
        c = model(changed)
    assert torch.allclose(a[0, :100], c[0, :100], atol=1e-5)  # later tokens never affect earlier logits
    assert not torch.allclose(a[0, 100:], c[0, 100:])


def test_bad_input_shape_is_named():
    model = LongCatForCausalLM(ModelConfig.from_preset("tiny-flash"))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
