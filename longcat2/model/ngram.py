"""N-gram ("over-embedding") input embedding of LongCat-Flash-Lite and LongCat-2.0.

Design choices:
- T = oe_split_num · (oe_neighbor_num − 1) hashed tables of width d = H / T. Table i serves order
  n = 2 + i // oe_split_num with modulus M_i = m + 2i + 1 (m = floor(oe_vocab_size_ratio · V)); the
  n-gram id is the polynomial hash Σ_{j<n} tok[t−j] · (V^j mod M_i) mod M_i, in int64 (no overflow for the
  released sizes: each term < V · M_i < 2^42). The splits of one order differ only in the modulus.
- Context never crosses an earlier EOS: tokens before the current segment count as id 0 (so does the
  missing context at the start of a sequence). The EOS itself belongs to the segment it ends.
- `history` carries the n−1 tokens before the current chunk (decode steps, chunked prefill); -1 marks "no
  token" and behaves like the sequence start.
- Fusion is a config switch: "mean" = (word + Σ p_i) / (1 + T) (Flash-Lite's released code and the
  reference engines' LongCat-2.0 rule: SGLang, vLLM, FluentLLM), "residual" = word + Σ p_i / (1 + T) (one
  unverified community port; the embedded default model was trained with it and says so in config.json).
"""

from __future__ import annotations

import torch
from torch import nn

from longcat2.config import ModelConfig


class NgramEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.n_max = cfg.oe_neighbor_num
        self.splits = cfg.oe_split_num
        self.num_tables = cfg.ngram_num_tables
        self.eos_token_id = cfg.eos_token_id
        self.fusion = cfg.ngram_fusion
        m, d, h = cfg.ngram_base_rows, cfg.ngram_table_dim, cfg.hidden_size
        self.embedders = nn.ModuleList([nn.Embedding(m + 2 * i + 1, d) for i in range(self.num_tables)])
        self.post_projs = nn.ModuleList([nn.Linear(d, h, bias=False) for _ in range(self.num_tables)])
        # Hash constants are plain CPU tensors (not buffers) so meta-device construction + checkpoint
        # materialisation never leaves them uninitialised; they move to the input's device on use.
        moduli = [m + 2 * i + 1 for i in range(self.num_tables)]
        orders = [2 + i // self.splits for i in range(self.num_tables)]
        # coef[i][j] = V^j mod M_i for j < order_i, else 0  (j indexes tok[t-j])
        coef = [
            [pow(self.vocab_size, j, moduli[i]) if j < orders[i] else 0 for j in range(self.n_max)]
            for i in range(self.num_tables)
        ]
        self._moduli = torch.tensor(moduli, dtype=torch.int64, device="cpu")
        self._coef = torch.tensor(coef, dtype=torch.int64, device="cpu").reshape(self.num_tables, self.n_max)

    def ngram_ids(self, input_ids: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T], history [B, <= n-1] (-1 = none) → ids [B, T, num_tables] (int64)."""
        b, t = input_ids.shape
        ctx = self.n_max - 1
        if history is None:
            history = input_ids.new_full((b, ctx), -1)
        history = history[:, -ctx:] if ctx else history[:, :0]
        if history.shape[1] < ctx:
            pad = input_ids.new_full((b, ctx - history.shape[1]), -1)
            history = torch.cat([pad, history], dim=1)
        full = torch.cat([history.to(input_ids.dtype), input_ids], dim=1)  # [B, ctx + T]
        is_eos = (
            (full == self.eos_token_id)
            if self.eos_token_id is not None
            else torch.zeros_like(full, dtype=torch.bool)
        )
        seg = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS belongs to the segment it ends
        present = full >= 0
        # windows[:, t, j] = full position of tok[t - j]
        pos = (
            torch.arange(t, device=input_ids.device)[:, None]
            + ctx
            - torch.arange(self.n_max, device=input_ids.device)
        )
        toks = full[:, pos]  # [B, T, n_max]
        same_seg = seg[:, pos] == seg[:, ctx:, None]
        toks = torch.where(same_seg & present[:, pos], toks, torch.zeros_like(toks)).long()
        # ids[b, t, i] = Σ_j toks[b, t, j] · coef[i, j]  mod M_i
        coef, moduli = self._coef.to(toks.device), self._moduli.to(toks.device)
        terms = toks[:, :, None, :] * coef  # [B, T, tables, n_max]
        return terms.sum(-1) % moduli

    def forward(
        self, input_ids: torch.Tensor, word: torch.Tensor, history: torch.Tensor | None = None
    ) -> torch.Tensor:
        """word [B, T, H] = the word embedding of input_ids → fused embedding [B, T, H]."""
        ids = self.ngram_ids(input_ids, history)
        total = None
        for i, (emb, proj) in enumerate(zip(self.embedders, self.post_projs)):
            p = proj(emb(ids[..., i]))
            total = p if total is None else total + p
        denom = 1.0 + self.num_tables
        if self.fusion == "mean":
            return (word + total) / denom
        return word + total / denom
