"""MoE: grouped experts vs a per-token reference, zero experts, router semantics, grouped_mm vs segments."""

import torch
import torch.nn.functional as F

from longcat2.config import ModelConfig
from longcat2.model import moe as moe_mod
from longcat2.model.moe import MoE


def _moe(**kw):
    cfg = ModelConfig.from_preset("tiny", **kw)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        m.router.e_score_correction_bias.copy_(torch.randn_like(m.router.e_score_correction_bias) * 0.05)
    return cfg, m


def _reference(cfg, m, x):
    """Token by token, expert by expert, straight from spec §2.5."""
    out = torch.zeros_like(x)
    probs = (x.float() @ m.router.classifier.weight.float().t()).softmax(-1)
    choice = probs + m.router.e_score_correction_bias
    for n in range(x.shape[0]):
        for e in choice[n].topk(cfg.moe_topk).indices.tolist():
            g = probs[n, e] * cfg.routed_scaling_factor
            if e >= cfg.n_routed_experts:
                out[n] += g * x[n]
            else:
                ex = m.experts
                h = F.silu(ex.gate_proj[e] @ x[n]) * (ex.up_proj[e] @ x[n])
                out[n] += g * (ex.down_proj[e] @ h)
    return out


def test_grouped_moe_matches_per_token_reference():
    cfg, m = _moe()
    x = torch.randn(3, 11, cfg.hidden_size)
    got = m(x)
    ref = _reference(cfg, m, x.reshape(-1, cfg.hidden_size)).view_as(x)
    assert torch.allclose(got, ref, atol=1e-5)
    assert m.last_topk.shape == (33, cfg.moe_topk)


def test_all_zero_experts_return_scaled_identity():
    cfg, m = _moe()
    with torch.no_grad():
        m.router.e_score_correction_bias[cfg.n_routed_experts :] = 1e3  # every pick is a zero expert
    x = torch.randn(5, cfg.hidden_size)
    probs = (x @ m.router.classifier.weight.t()).softmax(-1)
    gate = probs[:, cfg.n_routed_experts :].topk(cfg.moe_topk).values.sum(-1, keepdim=True)
    assert torch.allclose(m(x), gate * cfg.routed_scaling_factor * x, atol=1e-6)


def test_grouped_mm_and_segment_paths_agree_including_empty_experts():
    cfg, m = _moe()
    x = torch.randn(7, cfg.hidden_size, requires_grad=True)
    counts = torch.tensor([3, 0, 0, 4, 0, 0, 0, 0])  # experts with no tokens
    w = m.experts.gate_proj
    fast = moe_mod.linear_by_expert(x, w, counts)
    slow = moe_mod._segment_linear(x, w, counts.tolist())
    assert torch.allclose(fast, slow, atol=1e-6)
    fast.sum().backward()  # stride-0 upstream gradient must work
    g_fast = x.grad.clone()
    x.grad = None
    slow.sum().backward()
    assert torch.allclose(g_fast, x.grad, atol=1e-6)


def test_bf16_moe_runs_and_tracks_fp32():
    cfg, m = _moe()
    x = torch.randn(16, cfg.hidden_size)
    ref = m(x)
    got = m.to(torch.bfloat16)(x.bfloat16()).float()
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
