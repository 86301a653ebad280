"""Muon / AdamW / schedules."""

from __future__ import annotations

import math

import pytest
import torch

from longcat2.config import ModelConfig
from longcat2.model import LongCatForCausalLM
from longcat2.train.optim import MuonAdamW, Schedule, classify, newton_schulz, param_groups_for


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_newton_schulz_orthogonalises(shape):
    g = torch.randn(*shape, dtype=torch.float64)
    o = newton_schulz(g, steps=5)
    s = torch.linalg.svdvals(o)
    # the quintic coefficients trade exactness for speed: singular values land in ~[0.7, 1.2]; a square
    # Gaussian matrix has a few near-zero singular values that 5 steps cannot lift (as in Muon)
    assert s.max() < 1.25, s
    assert (s > 0.6).float().mean() >= (0.95 if shape[0] == shape[1] else 1.0), s
    # and it points where U Vᵀ points
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    cos = (o * polar).sum() / (o.norm() * polar.norm())
    assert cos > 0.95


def test_newton_schulz_is_per_expert_on_stacks():
    stack = torch.randn(4, 16, 32)
    batched = newton_schulz(stack)
    each = torch.stack([newton_schulz(m) for m in stack])
    torch.testing.assert_close(batched, each, rtol=1e-5, atol=1e-6)
    # scaling one expert's gradient must not change another's update (no cross-expert normalisation)
    stack2 = stack.clone()
    stack2[0] *= 100
    torch.testing.assert_close(newton_schulz(stack2)[1:], batched[1:], rtol=1e-5, atol=1e-6)


def test_muon_step_is_orthogonal_with_moonlight_scale():
    w = torch.nn.Parameter(torch.zeros(32, 64))
    opt = MuonAdamW([dict(params=[w], muon=True, lr=0.1, weight_decay=0.0)], momentum=0.0, nesterov=False)
    w.grad = torch.randn(32, 64)
    opt.step()
    upd = -w.detach() / (0.1 * 0.2 * math.sqrt(64))
    s = torch.linalg.svdvals(upd)
    assert s.min() > 0.6 and s.max() < 1.25


def test_param_groups():
    model = LongCatForCausalLM(ModelConfig.from_preset("tiny"))
    kinds = {n: classify(n, p) for n, p in model.named_parameters()}
    assert kinds["model.layers.0.mlp.experts.gate_proj"] == "muon"  # [E, out, in] stack
    assert kinds["model.layers.0.self_attn.0.q_a_proj.weight"] == "muon"
    assert kinds["model.layers.0.mlp.router.classifier.weight"] == "adamw"
    assert kinds["lm_head.weight"] == "adamw"
    assert kinds["model.embed_tokens.weight"] == "adamw_no_decay"
    assert kinds["model.ngram_embeddings.embedders.0.weight"] == "adamw_no_decay"
    assert kinds["model.norm.weight"] == "adamw_no_decay"
    groups = param_groups_for(model, lr=1e-3)
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))
    assert all(len(g["params"]) for g in groups)
    assert not any(g["muon"] for g in param_groups_for(model, lr=1e-3, use_muon=False))


def test_optimizer_fits_a_tiny_regression():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32, bias=False), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    groups = [
        dict(params=[net[0].weight], muon=True, lr=0.02, base_lr=0.02, weight_decay=0.0),
        dict(params=list(net[2].parameters()), muon=False, lr=0.02, base_lr=0.02, weight_decay=0.0),
    ]
    opt = MuonAdamW(groups)
    x = torch.randn(256, 8)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh()
    first = None
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(net(x), y)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.2 * first
    # state survives a state_dict round trip
    opt2 = MuonAdamW(groups)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(
        opt2.state[net[0].weight]["momentum_buffer"], opt.state[net[0].weight]["momentum_buffer"]
    )


def test_schedules():
    cos = Schedule(100, warmup_steps=10, kind="cosine", min_lr_ratio=0.1)
    assert cos.factor(0) == pytest.approx(0.1) and cos.factor(9) == pytest.approx(1.0)
    assert cos.factor(10) == pytest.approx(1.0)
    assert cos.factor(99) == pytest.approx(0.1, abs=1e-3)
    assert all(cos.factor(i) >= cos.factor(i + 1) for i in range(10, 99))
    wsd = Schedule(100, warmup_steps=10, kind="wsd", min_lr_ratio=0.0, decay_frac=0.2)
    assert wsd.factor(50) == 1.0 and wsd.factor(79) == 1.0
    assert wsd.factor(80) < 1.0 and wsd.factor(99) == pytest.approx(0.0)
    assert Schedule(10, kind="constant").factor(7) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        Schedule(10, kind="linear")
