"""MLA's absorbed form: kv_b_proj's halves as views under autograd, cached contiguous copies in inference."""

import pytest
import torch

from longcat2.config import ModelConfig
from longcat2.model.attention import MLA


def _reference(mla: MLA, q_nope: torch.Tensor, o_latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """absorb / unabsorb written out from the weight itself: [T, h, nope] → [T, h, c], [T, h, c] → [T, h*v]."""
    w = mla.kv_b_proj.weight.detach().float().view(mla.num_heads, mla.nope + mla.v_dim, mla.kv_lora_rank)
    lat = torch.einsum("thn,hnc->thc", q_nope.float(), w[:, : mla.nope])
    val = torch.einsum("thc,hvc->thv", o_latent.float(), w[:, mla.nope :]).flatten(-2)
    return lat, val


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absorbed_weights_are_cached_in_inference_and_follow_weight_updates(dtype):
    mla = MLA(ModelConfig.from_preset("tiny"), has_indexer=False).to(dtype)
    h, c = mla.num_heads, mla.kv_lora_rank
    q_nope, o_latent = torch.randn(5, h, mla.nope, dtype=dtype), torch.randn(5, h, c, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        lat, val = mla.absorb(q_nope), mla.unabsorb(o_latent)
        w_uk, w_uv_t = mla._absorbed_weights()
        assert w_uk.is_contiguous() and w_uv_t.is_contiguous()
        assert mla._absorbed_weights()[0] is w_uk  # made once, not per call
        ref_lat, ref_val = _reference(mla, q_nope, o_latent)
        torch.testing.assert_close(lat.float(), ref_lat, rtol=tol, atol=tol)
        torch.testing.assert_close(val.float(), ref_val, rtol=tol, atol=tol)
        # an in-place weight update (a checkpoint load, an optimizer step) must not leave stale copies
        mla.load_state_dict({k: v * -2 for k, v in mla.state_dict().items()})
        ref_lat, ref_val = _reference(mla, q_nope, o_latent)
        torch.testing.assert_close(mla.absorb(q_nope).float(), ref_lat, rtol=tol, atol=tol)
        torch.testing.assert_close(mla.unabsorb(o_latent).float(), ref_val, rtol=tol, atol=tol)
    with torch.inference_mode():  # the engine's mode
        torch.testing.assert_close(mla.absorb(q_nope).float(), ref_lat, rtol=tol, atol=tol)
        # a new weight object (as tensor parallelism or a dtype cast installs) is never served stale copies
        mla.kv_b_proj.weight = torch.nn.Parameter(mla.kv_b_proj.weight.detach() * 3, requires_grad=False)
        ref_lat, _ = _reference(mla, q_nope, o_latent)
        torch.testing.assert_close(mla.absorb(q_nope).float(), ref_lat, rtol=tol, atol=tol)


def test_absorbed_form_trains_kv_b_proj():
    mla = MLA(ModelConfig.from_preset("tiny"), has_indexer=False)
    h = mla.num_heads
    with torch.no_grad():
        mla.absorb(torch.randn(2, h, mla.nope))  # an inference call first leaves a cached copy behind
    q_nope, o_latent = torch.randn(3, h, mla.nope), torch.randn(3, h, mla.kv_lora_rank)
    (mla.absorb(q_nope).square().sum() + mla.unabsorb(o_latent).square().sum()).backward()
    grad = mla.kv_b_proj.weight.grad.view(h, mla.nope + mla.v_dim, -1)
    assert grad[:, : mla.nope].abs().sum() > 0 and grad[:, mla.nope :].abs().sum() > 0
