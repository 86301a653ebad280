"""The LongCat decoder: ScMoE dual-sublayer layers, the model, the LM head and the MTP head.

One layer (shortcut-connected MoE; the MoE reads post_attention_layernorm.0's output and is added last):

    a0  = h + Attn0(RMSNorm_in0(h))        # LSA index owner
    x0  = RMSNorm_post0(a0)
    moe = MoE(x0)
    m0  = a0 + MLP0(x0)
    a1  = m0 + Attn1(RMSNorm_in1(m0))      # reuses sublayer 0's top-k (cross-layer indexing)
    h'  = a1 + MLP1(RMSNorm_post1(a1)) + moe

Design choices:
- Single-device code; parallelism (FSDP2, EP) is applied from outside. Module and parameter names are the
  released checkpoint's (self_attn.{0,1}, mlps.{0,1}, mlp.router.classifier, ...), except that routed experts
  are stacked [E, out, in]; `longcat2.hf_checkpoint` maps per-expert keys.
- MTP: one physical block (mtp_replicate_modules) applied for `mtp_num_layers` steps. Step k combines the
  previous depth's hidden state at t with the embedding of token t+k (eh_proj over [enorm(emb); hnorm(h)]),
  runs a dense decoder sublayer (MLA + SwiGLU), and predicts token t+k+1 through the shared lm_head. With
  LSA the first step's index pass is shared by the later steps (`dsa_mtp_cli`).
- One code path: the inference engine runs these same modules, passing its per-step attention cache
  (`attention.AttentionCache`) down to the MLA sublayers; without a cache the model attends causally over
  the given tokens (training, evaluation).
- `forward(input_ids)` returns logits [B, T, V]; `forward(..., return_dict=True)` returns a LongCatOutput with
  the final hidden states and MTP logits for training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longcat2.config import ModelConfig
from longcat2.model.attention import MLA, AttentionCache
from longcat2.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from longcat2.model.moe import MoE
from longcat2.model.ngram import NgramEmbedding


@dataclass
class LongCatOutput:
    logits: torch.Tensor  # [B, T, V]
    hidden: torch.Tensor  # [B, T, H] last layer output before the final norm
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # step k: [B, T-k, V], predicts t+k+1


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H = cfg.hidden_size
        owners = [cfg.use_lsa and i % cfg.cli_factor == 0 for i in (0, 1)]
        self.self_attn = nn.ModuleList([MLA(cfg, has_indexer=owners[i]) for i in (0, 1)])
        self.mlps = nn.ModuleList([SwiGLU(H, cfg.ffn_hidden_size) for _ in (0, 1)])
        self.input_layernorm = nn.ModuleList([RMSNorm(H, cfg.rms_norm_eps) for _ in (0, 1)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(H, cfg.rms_norm_eps) for _ in (0, 1)])
        self.mlp = MoE(cfg)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: AttentionCache | None = None,
    ) -> torch.Tensor:
        attn0, indices = self.self_attn[0](self.input_layernorm[0](h), cos, sin, positions, cache=cache)
        a0 = h + attn0
        x0 = self.post_attention_layernorm[0](a0)
        moe = self.mlp(x0)
        m0 = a0 + self.mlps[0](x0)
        attn1, _ = self.self_attn[1](self.input_layernorm[1](m0), cos, sin, positions, indices, cache=cache)
        a1 = m0 + attn1
        return a1 + self.mlps[1](self.post_attention_layernorm[1](a1)) + moe


class _NormWrap(nn.Module):
    """Holds an RMSNorm as `.m` (the released MTP keys are `enorm.m.weight` / `hnorm.m.weight`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.m = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class _MTPFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)


class MTPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H = cfg.hidden_size
        self.enorm = _NormWrap(H, cfg.rms_norm_eps)
        self.hnorm = _NormWrap(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, has_indexer=cfg.use_lsa)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.transformer_layer = _MTPFeedForward(cfg)

    def forward(
        self,
        emb: torch.Tensor,
        h_prev: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        indices: Any,
        reuse: bool,
        cache: AttentionCache | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """emb [B, T, H] (token t+k), h_prev [B, T, H] → (h [B, T, H], the attention's indices)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        a, idx = self.self_attn(self.input_layernorm(x), cos, sin, positions, indices, reuse, cache)
        x = x + a
        return x + self.transformer_layer.mlp(self.post_attention_layernorm(x)), idx


class MTPHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.steps = cfg.mtp_num_layers
        self.share_index = cfg.dsa_mtp_cli
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([MTPLayer(cfg) for _ in range(cfg.num_mtp_modules)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        lm_head: nn.Module,
    ) -> list[torch.Tensor]:
        """Training-time MTP: step k (1-based) returns logits [B, T-k, V] predicting token t+k+1."""
        t = input_ids.shape[1]
        h, indices, logits = hidden, None, []
        for k in range(1, self.steps + 1):
            n = t - k
            if n <= 0:
                break
            layer = self.layers[0 if len(self.layers) == 1 else k - 1]
            emb = self.embed_tokens(input_ids[:, k:])  # token t+k for position t
            idx = indices[:, :n] if indices is not None else None
            reuse = self.share_index and k > 1
            h, new_idx = layer(emb, h[:, :n], cos[..., :n, :], sin[..., :n, :], positions[:n], idx, reuse)
            if k == 1:
                indices = new_idx
            logits.append(lm_head(self.norm(h)))
        return logits


class LongCatModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.ngram_embeddings = NgramEmbedding(cfg) if cfg.use_ngram else None
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.mtp = MTPHead(cfg) if cfg.mtp_num_layers > 0 else None
        self.gradient_checkpointing = False

    def embed(self, input_ids: torch.Tensor, ngram_history: torch.Tensor | None = None) -> torch.Tensor:
        word = self.embed_tokens(input_ids)
        if self.ngram_embeddings is None:
            return word
        return self.ngram_embeddings(input_ids, word, ngram_history)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids [B, T] (or `inputs_embeds` [B, T, H]) → hidden [B, T, H] (pre-norm), cos, sin,
        positions. `cache`: the engine's per-step attention cache (see attention.py)."""
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)
        cos, sin = self.rotary_emb(positions, h.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, positions, use_reentrant=False)
            else:
                h = layer(h, cos, sin, positions, cache)
        return h, cos, sin, positions


class LongCatForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LongCatModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".m.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        for mod in self.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        return_dict: bool = False,
        with_mtp: bool = False,
    ) -> torch.Tensor | LongCatOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [batch, seq], got {tuple(input_ids.shape)}")
        hidden, cos, sin, positions = self.model(input_ids, positions)
        logits = self.lm_head(self.model.norm(hidden))
        if not return_dict:
            return logits
        mtp_logits: list[torch.Tensor] = []
        if with_mtp and self.model.mtp is not None:
            mtp_logits = self.model.mtp(input_ids, hidden, cos, sin, positions, self.lm_head)
        return LongCatOutput(logits=logits, hidden=hidden, mtp_logits=mtp_logits)

    # ------------------------------------------------------------------ conveniences
    def generate(
        self,
        input_ids: torch.Tensor | list,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        speculative: bool = False,
        **kwargs,
    ) -> torch.Tensor | list:
        """Generate with the inference engine (paged latent cache, sparse decode); temperature 0 = greedy.

        input_ids [B, T] → [B, T + new] (prompt + output, pad-filled); a list of token-id lists (any lengths)
        → the generated ids per prompt. Keywords: top_k, top_p, min_p, repetition_penalty,
        presence_penalty, frequency_penalty, seed, stop_token_ids, ignore_eos, num_draft_tokens, stream
        (a callback per engine event); see `longcat2.engine.generate`."""
        from longcat2.engine import generate

        return generate(
            self,
            input_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            speculative=speculative,
            **kwargs,
        )

    def num_parameters(self, include_mtp: bool = False) -> int:
        return sum(
            p.numel() for n, p in self.named_parameters() if include_mtp or not n.startswith("model.mtp.")
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        strict: bool = True,
    ) -> LongCatForCausalLM:
        from longcat2.hf_checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, strict=strict)

    def save_pretrained(self, path: str | Path, **kwargs) -> Path:
        from longcat2.hf_checkpoint import save_pretrained

        return save_pretrained(self, path, **kwargs)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross entropy; logits [B, T, V] already aligned with labels [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index)
