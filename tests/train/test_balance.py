"""Zero-expert budget control (bias update), routing statistics, balance loss, z-loss."""

from __future__ import annotations

import pytest
import torch

from longcat2.config import ModelConfig
from longcat2.model import LongCatForCausalLM
from longcat2.train.balance import (
    BudgetController,
    RoutingStats,
    default_target,
    device_balance_loss,
    hidden_z_loss,
    moe_layers,
)


def _model():
    cfg = ModelConfig.from_preset("tiny", mtp_num_layers=0)
    return cfg, LongCatForCausalLM(cfg).eval()


@pytest.mark.parametrize("target", [1.0, 2.6])
def test_bias_update_steers_ffn_experts_per_token_to_target(target):
    cfg, model = _model()
    moes = moe_layers(model)
    stats = RoutingStats.for_model(moes)
    ctl = BudgetController(target=target, rate=0.5)
    x = torch.randint(0, cfg.vocab_size, (4, 48))
    measured = []
    with torch.no_grad():
        for _ in range(40):
            stats.reset()
            model(x)
            stats.record(moes)
            measured.append(stats.ffn_per_token().clone())
            ctl.update(moes, stats)
    start, end = measured[0], torch.stack(measured[-5:]).mean(0)
    # every layer moved toward the target and ends near it
    assert ((end - target).abs() < (start - target).abs()).all(), (start, end)
    assert ((end - target).abs() < 0.25).all(), end
    for m in moes:  # zero-expert biases are never touched
        assert (m.router.e_score_correction_bias[cfg.n_routed_experts :] == 0).all()


def test_bias_update_formula():
    cfg, model = _model()
    moes = moe_layers(model)
    stats = RoutingStats.for_model(moes)
    n, k = cfg.n_routed_experts, cfg.moe_topk
    stats.counts[:, :n] = torch.arange(n, dtype=torch.float64)  # T_i
    stats.tokens = 10
    BudgetController(target=2.0, rate=0.3).update(moes, stats)
    expect = 0.3 * ((2.0 / k) / n - torch.arange(n, dtype=torch.float64) / (k * 10))
    torch.testing.assert_close(
        moes[0].router.e_score_correction_bias[:n].double(), expect, rtol=1e-6, atol=1e-7
    )


def test_routing_stats_summary():
    cfg, model = _model()
    moes = moe_layers(model)
    stats = RoutingStats.for_model(moes)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 32)))
    stats.record(moes)
    s = stats.summary()
    assert stats.tokens == 64
    assert stats.counts.sum() == 64 * cfg.moe_topk * cfg.num_layers
    assert 0 <= s["ffn_experts_per_token"] <= cfg.moe_topk
    assert len(s["ffn_experts_per_layer"]) == cfg.num_layers
    assert 0 < s["router_entropy"] <= torch.log(torch.tensor(12.0)).item() + 1e-6
    assert sum(s["expert_load"]) == pytest.approx(1.0, abs=1e-3)
    assert s["expert_load_max"] >= 1.0 >= s["expert_load_min"]
    assert default_target(12, 768) == 8.0 and default_target(3, 8) == 2.0


def test_device_balance_loss_reaches_router_and_is_minimal_when_even():
    cfg, model = _model()
    model.train()
    moes = moe_layers(model)
    model(torch.randint(0, cfg.vocab_size, (2, 32)))
    loss = device_balance_loss(moes, n_groups=2)
    loss.backward()
    assert model.model.layers[0].mlp.router.classifier.weight.grad.abs().sum() > 0
    # perfectly even routing and uniform probabilities over G groups give 1 (the DeepSeek normalisation)
    m = moes[0]
    e = m.router.num_experts
    m.last_probs = torch.full((e * 4, e), 1.0 / e)
    m.last_topk = torch.arange(e * 4 * cfg.moe_topk).reshape(e * 4, cfg.moe_topk) % e
    one = device_balance_loss([m], n_groups=2)
    assert float(one) == pytest.approx(1.0, abs=1e-5)


def test_hidden_z_loss():
    h = torch.zeros(2, 3, 8)
    assert float(hidden_z_loss(h)) == pytest.approx(torch.log(torch.tensor(8.0)).item() ** 2, rel=1e-5)
    big = torch.zeros(1, 1, 8)
    big[..., 0] = 50.0
    assert hidden_z_loss(big) > 2000
