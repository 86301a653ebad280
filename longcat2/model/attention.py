"""Multi-head Latent Attention (MLA) with LongCat's LoRA scaling, dense or LSA-sparse, with or without a cache.

Design choices:
- One forward for training, evaluation and the inference engine. `forward(..., cache=None)` is full causal
  attention over the given tokens. With a `cache` (an `AttentionCache`, built per step by the engine: the
  step's positions, cache slots, which rows belong to which sequence) the layer does its own math
  (projection, indexer keys and queries, o_proj) and hands the cache-facing parts to the cache: store the
  new latent (c_kv, k_rope) and indexer key, select top-k over the cached index keys, attend over the
  cached latents. The cache stays a kernel provider; the model never expands per-head K/V for the sparse
  path and the engine never re-types layer math.
- Projection (`project`) and attention (`attend`: dense or sparse core) are separate; the absorbed-form
  pieces (`absorb`: q_nope → latent queries with the K half of kv_b_proj, `unabsorb`: attended latent →
  values with the V half, `expand`: latents → per-head K/V) are public so cached attention reuses them.
- α_q = sqrt(H / q_lora_rank) scales the whole query (nope and rope parts); α_kv = sqrt(H / kv_lora_rank)
  scales the normalised kv latent only (what is cached); k_rope is not scaled.
- Dense path = expanded K/V through `kv_b_proj` and SDPA (the transformers formulation; used whenever every
  query sees <= index_topk keys, or when the layer has no LSA). Sparse path = absorbed MQA form over the
  selected indices (see lsa.py). With top-k >= visible length the two agree to rounding.
- The sublayer that owns an indexer returns its top-k indices; the next sublayer receives them (CLI). With
  `reuse=True` an owner skips its own selection and uses the indices it is given (MTP steps > 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from longcat2.config import ModelConfig
from longcat2.model.layers import RMSNorm, apply_rope
from longcat2.model.lsa import Indexer, lsa_select, sparse_mla_attention


@dataclass
class MLAProjection:
    q_nope: torch.Tensor  # [B, T, h, nope]
    q_rope: torch.Tensor  # [B, T, h, r] (rotated)
    kv_latent: torch.Tensor  # [B, T, c] (normed, × α_kv)
    k_rope: torch.Tensor  # [B, T, r] (rotated)
    q_lora: torch.Tensor  # [B, T, q_lora_rank] (q_a_layernorm output, unscaled; the indexer query input)


class AttentionCache(Protocol):
    """The engine's side of cached attention: one object per forward step, whose rows ([1, N]) may belong
    to several sequences. The selection `select` returns is opaque to the model: the owner sublayer returns
    it and the next sublayer hands it back to `attend` (cross-layer indexing), like the no-cache indices."""

    def store(
        self, mla: MLA, kv_latent: torch.Tensor, k_rope: torch.Tensor, index_keys: torch.Tensor | None
    ) -> None:
        """Write the step's latents [1, N, c], rope keys [1, N, r] (and indexer keys [1, N, d])."""

    def select(self, mla: MLA, q: torch.Tensor, w: torch.Tensor) -> Any:
        """Top-k over the cached indexer keys for queries q [1, N, h, d] with head weights w [1, N, h]."""

    def attend(self, mla: MLA, p: MLAProjection, selection: Any) -> torch.Tensor:
        """Causal attention of the step's queries over the cached latents → [1, N, h*v] (before o_proj)."""


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, has_indexer: bool) -> None:
        super().__init__()
        self.cfg = cfg
        h, H = cfg.num_attention_heads, cfg.hidden_size
        self.num_heads = h
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=cfg.lora_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=cfg.lora_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, H, bias=False)
        self.indexer = Indexer(cfg) if has_indexer else None
        self.q_scale = (H / cfg.q_lora_rank) ** 0.5 if cfg.mla_scale_q_lora else 1.0
        self.kv_scale = (H / cfg.kv_lora_rank) ** 0.5 if cfg.mla_scale_kv_lora else 1.0
        self.softmax_scale = cfg.softmax_scale
        self.sparse_enabled = True  # False: always dense (the LSA recipe's dense stages and A/B runs)

    # ------------------------------------------------------------------ projections
    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> MLAProjection:
        b, t, _ = x.shape
        q_lora = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_lora).view(b, t, self.num_heads, self.nope + self.rope) * self.q_scale
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)
        kv_latent, k_rope = kv.split([self.kv_lora_rank, self.rope], dim=-1)
        kv_latent = self.kv_a_layernorm(kv_latent) * self.kv_scale
        # the rope key rotates as one more head of the query: one rotation (ops, not FLOPs, cost a decode step)
        rot = apply_rope(torch.cat([q_rope, k_rope.unsqueeze(2)], dim=2), cos, sin, interleave=True)
        return MLAProjection(
            q_nope=q_nope,
            q_rope=rot[:, :, : self.num_heads],
            kv_latent=kv_latent,
            k_rope=rot[:, :, self.num_heads],
            q_lora=q_lora,
        )

    # ------------------------------------------------------------------ absorbed / expanded forms
    def _kv_b(self) -> torch.Tensor:
        """kv_b_proj's weight per head: [h, nope + v, c] (rows :nope = W_uk, nope: = W_uv)."""
        return self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk [h, nope, c], W_uv^T [h, c, v]): kv_b_proj's halves as the absorbed form's batched GEMMs read
        them. Views of the weight when autograd needs them (training); otherwise contiguous copies, made once
        per weight version: strided batch operands are copied by bf16 batched GEMMs on every call on CPU
        (oneDNN; measured 2.5 of a 5.6 ms bf16 decode step of a 2-layer model), which fp32 BLAS is not.
        The copies hold one more kv_b_proj per sublayer in memory (0.04 % of LongCat-2.0's weights)."""
        w = self.kv_b_proj.weight
        autograd = torch.is_grad_enabled() and w.requires_grad
        if autograd or type(w.data) is not torch.Tensor:  # (a DTensor shard: views as well)
            kv_b = self._kv_b()
            return kv_b[:, : self.nope], kv_b[:, self.nope :].transpose(1, 2)
        version = None if w.is_inference() else w._version  # (inference tensors keep no version counter)
        # the weight itself (held, so its memory cannot be reused by a new weight) and its version
        key = (version, w.data_ptr(), self.num_heads)
        cached = getattr(self, "_absorbed_cache", None)
        if cached is None or cached[0] is not w or cached[1] != key:
            kv_b = self._kv_b()
            with torch.no_grad():
                w_uk = kv_b[:, : self.nope].contiguous()
                w_uv_t = kv_b[:, self.nope :].transpose(1, 2).contiguous()
            cached = (w, key, w_uk, w_uv_t)
            self._absorbed_cache = cached
        return cached[2], cached[3]

    def absorb(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [..., T, h, nope] → latent queries q_nope · W_uk [..., T, h, c] (one GEMM per head)."""
        w_uk = self._absorbed_weights()[0]  # [h, nope, c]
        return torch.matmul(q_nope.transpose(-3, -2), w_uk).transpose(-3, -2)

    def unabsorb(self, o_latent: torch.Tensor) -> torch.Tensor:
        """Attended latents [..., T, h, c] → values [..., T, h*v] (the V half of kv_b_proj)."""
        w_uv_t = self._absorbed_weights()[1]  # [h, c, v]
        if o_latent.dtype != w_uv_t.dtype:
            o_latent = o_latent.to(w_uv_t.dtype)
        out = torch.matmul(o_latent.transpose(-3, -2), w_uv_t)  # [..., h, T, v]
        return out.transpose(-3, -2).flatten(-2)

    def expand(self, kv_latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [..., S, c], rope keys [..., S, r] → per-head K [..., S, h, nope+r], V [..., S, h, v]."""
        kv = self.kv_b_proj(kv_latent).unflatten(-1, (self.num_heads, self.nope + self.v_dim))
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(-2).expand(*k_nope.shape[:-1], -1)], dim=-1)
        return k, v

    # ------------------------------------------------------------------ attention cores (no cache)
    def dense(
        self, p: MLAProjection, kv_latent: torch.Tensor, k_rope: torch.Tensor, q_pos: torch.Tensor
    ) -> torch.Tensor:
        """Causal attention of the queries in p against all keys (positions 0..S-1). → [B, T, h*v]."""
        b, t = p.q_nope.shape[:2]
        s = kv_latent.shape[1]
        k, v = self.expand(kv_latent, k_rope)
        q = torch.cat([p.q_nope, p.q_rope], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, T|S, d]
        if t == s:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            qp = q_pos if q_pos.dim() == 2 else q_pos.unsqueeze(0)
            mask = torch.arange(s, device=q.device) <= qp[..., None]  # [B|1, T, S]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.softmax_scale)
        return out.transpose(1, 2).reshape(b, t, self.num_heads * self.v_dim)

    def sparse(
        self, p: MLAProjection, kv_latent: torch.Tensor, k_rope: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """Attention over the selected keys only (absorbed form). → [B, T, h*v]."""
        o_latent = sparse_mla_attention(
            self.absorb(p.q_nope), p.q_rope, kv_latent, k_rope, indices, self.softmax_scale
        )
        return self.unabsorb(o_latent)

    def attend(
        self,
        p: MLAProjection,
        kv_latent: torch.Tensor,
        k_rope: torch.Tensor,
        positions: torch.Tensor,
        indices: torch.Tensor | None,
    ) -> torch.Tensor:
        """Dense causal attention when `indices` is None, else sparse over them. → [B, T, h*v]."""
        if indices is None:
            return self.dense(p, kv_latent, k_rope, positions)
        return self.sparse(p, kv_latent, k_rope, indices)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        indices: Any = None,
        reuse: bool = False,
        cache: AttentionCache | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """x [B, T, H] at `positions` [T]. Without `cache` the keys are the same T tokens (a fresh sequence);
        with it, every row attends over what its sequence has cached. `indices`: the owner sublayer's
        selection (CLI); `reuse`: an owner takes `indices` instead of running its indexer.
        Returns (out [B, T, H], indices)."""
        p = self.project(x, cos, sin)
        select = self.indexer is not None and not reuse
        if cache is not None:
            keys = self.indexer.keys(x, cos, sin) if self.indexer is not None else None
            cache.store(self, p.kv_latent, p.k_rope, keys)
            if select:
                indices = None
                if self.sparse_enabled:
                    q, w = self.indexer.queries(x, p.q_lora, cos, sin)
                    indices = cache.select(self, q, w)
            return self.o_proj(cache.attend(self, p, indices)), indices
        if select:
            indices = self.select(x, p, cos, sin, positions)
        return self.o_proj(self.attend(p, p.kv_latent, p.k_rope, positions, indices)), indices

    def select(
        self,
        x: torch.Tensor,
        p: MLAProjection,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor | None:
        """Run the indexer; None when every query sees <= index_topk keys (exact dense attention)."""
        assert self.indexer is not None
        max_visible = int(positions.max().item()) + 1
        if max_visible <= self.cfg.index_topk or not self.sparse_enabled:
            return None
        keys = self.indexer.keys(x, cos, sin)
        q, w = self.indexer.queries(x, p.q_lora, cos, sin)
        with torch.no_grad():
            return lsa_select(self.indexer, q.detach(), w.detach(), keys.detach(), positions, self.cfg)


def set_sparse_attention(model: nn.Module, enabled: bool) -> None:
    """Switch LSA selection on or off in every MLA sublayer (off = exact dense attention at any length)."""
    for module in model.modules():
        if isinstance(module, MLA):
            module.sparse_enabled = enabled
