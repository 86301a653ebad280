"""LongCat Sparse Attention (LSA): the lightning indexer, top-k selection with forced tokens, sparse MLA.

Design choices:
- Indexer score (DSA formula): I[t, s] = Σ_j w[t, j] · ReLU(q[t, j] · k[s]), w = weights_proj(x) ·
  n_heads^-0.5 · head_dim^-0.5, q from the MLA query latent (`wq_b` on q_a_layernorm output), one shared key
  per token (`wk` on the attention input, then `k_norm`). RoPE on the first `qk_rope_head_dim` dims,
  interleaved for LongCat, half-split for the DeepSeek configuration (`indexer_rope_interleave`).
- Streaming-aware indexing (SI): the first `index_init_tokens` and the last `index_local_tokens` positions
  (ending at the query) get +inf before top-k, so they sit *inside* the `index_topk` budget. The DeepSeek
  configuration is the same code with both counts at 0.
- Deterministic tie rule: among equal scores at the top-k boundary the *larger* position wins (ReLU makes
  exact-zero plateaus common). Selected indices come out sorted ascending; unused slots are -1.
- Memory: scores are computed for `index_query_chunk` queries at a time ([B, chunk, S] fp32), never [T, T]
  for long T; sparse attention gathers only the selected latents per query chunk.
- Sparse attention runs MLA in absorbed (MQA) form: queries are projected into the kv_lora latent space with
  the K half of `kv_b_proj`, scored against the gathered latent + rope key, and the attended latent is
  mapped out with the V half. Mathematically equal to expanded MLA; selected latents are never expanded per
  head. Training calls it directly; the engine runs the same computation on its paged pool
  (`engine.kernels.gather_attention`), between the same `MLA.absorb` / `MLA.unabsorb`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcat2.config import ModelConfig
from longcat2.model.layers import INDEXER_NORM_EPS, RMSNorm, apply_rope


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.interleave = cfg.indexer_rope_interleave
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        if cfg.index_k_norm_type == "rms":
            self.k_norm: nn.Module = RMSNorm(self.head_dim, eps=INDEXER_NORM_EPS)
        else:
            self.k_norm = nn.LayerNorm(self.head_dim, eps=INDEXER_NORM_EPS)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.weight_scale = self.n_heads**-0.5 * self.head_dim**-0.5

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rope_dim], x[..., self.rope_dim :]
        return torch.cat([apply_rope(rot, cos, sin, self.interleave), rest], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, H] → indexer keys [B, S, head_dim]."""
        return self._rope(self.k_norm(self.wk(x)), cos, sin)

    def queries(
        self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ q [B, T, n_heads, head_dim], head weights [B, T, n_heads] (fp32, scales folded in)."""
        b, t, _ = x.shape
        q = self.wq_b(q_latent).view(b, t, self.n_heads, self.head_dim)
        q = self._rope(q, cos, sin)
        w = self.weights_proj(x).float() * self.weight_scale
        return q, w


def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [B, T, h, d], w [B, T, h], k [B, S, d] → I [B, T, S] fp32 = Σ_h w · ReLU(q_h · k)."""
    dots = torch.einsum("bthd,bsd->bths", q.float(), k.float())  # [B, T, h, S]
    return torch.einsum("bth,bths->bts", w, F.relu(dots))


def force_and_mask(
    scores: torch.Tensor, q_pos: torch.Tensor, init_tokens: int, local_tokens: int
) -> torch.Tensor:
    """scores [B, T, S] for keys at positions 0..S-1 and queries at q_pos [B, T] (or [T]):
    future keys → -inf; sink (s < init) and local (q - local < s <= q) keys → +inf."""
    s_pos = torch.arange(scores.shape[-1], device=scores.device)
    qp = q_pos if q_pos.dim() == 2 else q_pos.unsqueeze(0)
    qp = qp[..., None]  # [B|1, T, 1]
    future = s_pos > qp
    forced = (s_pos < init_tokens) | (s_pos > qp - local_tokens)
    scores = scores.masked_fill(forced & ~future, float("inf"))
    return scores.masked_fill(future, float("-inf"))


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic top-k over the last dim: ties at the boundary go to the larger position.
    Returns indices [..., k] sorted ascending, -1 where fewer than k keys are visible (score -inf)."""
    s = scores.shape[-1]
    if k >= s:
        idx = torch.arange(s, device=scores.device).expand(*scores.shape[:-1], s)
        return idx.masked_fill(scores == float("-inf"), -1)
    kth = scores.topk(k, dim=-1).values[..., -1:]  # [..., 1]
    greater = scores > kth
    equal = scores == kth
    need = k - greater.sum(-1, keepdim=True)
    rank_from_right = equal.flip(-1).cumsum(-1).flip(-1)  # how many ties sit at or after each position
    chosen = greater | (equal & (rank_from_right <= need))
    pos = torch.arange(s, device=scores.device).expand_as(scores)
    idx = pos.masked_fill(~chosen, s).topk(k, dim=-1, largest=False).values  # ascending positions
    valid = torch.gather(scores, -1, idx.clamp(max=s - 1)) != float("-inf")
    return idx.masked_fill(~valid | (idx >= s), -1)


def lsa_select(
    indexer: Indexer,
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    q_pos: torch.Tensor,
    cfg: ModelConfig,
) -> torch.Tensor:
    """Top-k indices [B, T, index_topk] for queries q/w against indexer keys [B, S, d], chunked over T."""
    t = q.shape[1]
    chunk = cfg.index_query_chunk
    qp = q_pos if q_pos.dim() == 2 else q_pos.unsqueeze(0).expand(q.shape[0], -1)
    out = []
    for start in range(0, t, chunk):
        sl = slice(start, min(start + chunk, t))
        sc = index_scores(q[:, sl], w[:, sl], keys)  # [B, C, S]
        sc = force_and_mask(sc, qp[:, sl], cfg.index_init_tokens, cfg.index_local_tokens)
        out.append(select_topk(sc, cfg.index_topk))
    return torch.cat(out, dim=1)


def sparse_mla_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    max_elems: int = 1 << 24,
) -> torch.Tensor:
    """Absorbed-MLA attention over selected keys.

    q_latent [B, T, h, c] (q_nope already multiplied by W_uk), q_rope [B, T, h, r],
    kv_latent [B, S, c], k_rope [B, S, r], indices [B, T, k] (-1 = unused slot).
    Returns the attended latent [B, T, h, c] (multiply by W_uv for values). Queries are processed in chunks
    so the gathered latents stay under `max_elems` elements.
    """
    b, t, h, c = q_latent.shape
    k = indices.shape[-1]
    r = k_rope.shape[-1]
    chunk = max(1, max_elems // max(1, b * k * (c + r + h)))
    batch = torch.arange(b, device=indices.device)[:, None, None]
    outs = []
    for start in range(0, t, chunk):
        sl = slice(start, min(start + chunk, t))
        idx = indices[:, sl]  # [B, C, k]
        valid = idx >= 0
        safe = idx.clamp(min=0)
        lat = kv_latent[batch, safe]  # [B, C, k, c]
        rop = k_rope[batch, safe]  # [B, C, k, r]
        scores = torch.einsum("bthc,btkc->bthk", q_latent[:, sl], lat)
        scores = scores + torch.einsum("bthr,btkr->bthk", q_rope[:, sl], rop)
        scores = (scores.float() * scale).masked_fill(~valid[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(lat.dtype)
        outs.append(torch.einsum("bthk,btkc->bthc", probs, lat))
    return torch.cat(outs, dim=1)
