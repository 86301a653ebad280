"""LSA training losses: indexer distillation (dense warm-up and sparse stage), cross-layer targets, recall.

Design choices:
- Forward hooks on the MLA sublayers capture each attention input (after input_layernorm), the RoPE tables,
  positions and the selected indices; the model code stays untouched and single-purpose.
- Target p(t, ·) = main attention probabilities summed over heads and L1-normalised over the causal row,
  recomputed without gradient from the captured input. For a cross-layer owner (cli_factor 2) the target is
  the mean of the owner's and the reusing sublayer's distributions, so one index serves both (IndexCache's
  averaged target). `cross_layer_target=False` distils the owner's distribution alone (ablation).
- The indexer sees detached inputs (hidden state and query latent), so the KL trains only indexer parameters
  and the LM loss trains only the rest (top-k has no gradient anyway).
- Dense warm-up: KL(p ‖ softmax(I)) over the whole causal row. Sparse stage: both distributions restricted
  to (and renormalised on) the selected set S_t. Rows are processed in query chunks: memory O(chunk · T).
- Recall (logged) = Σ_{s∈S_t} p(t, s): the dense attention mass the selected set captures, averaged over
  rows that see more keys than index_topk (other rows are exactly dense, recall 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from longcat2.model.attention import MLA
from longcat2.model.lsa import force_and_mask, index_scores, select_topk


@dataclass
class _Capture:
    x: torch.Tensor  # [B, T, H] attention input
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor  # [T]
    indices: torch.Tensor | None  # [B, T, k] selected by the owner (None = dense)


@dataclass
class IndexerLossOutput:
    loss: torch.Tensor  # summed over owner layers, mean over rows
    recall: list[float] = field(default_factory=list)  # per owner layer
    kl: list[float] = field(default_factory=list)  # per owner layer
    # per owner layer: the most any index_topk keys can capture (top-k of the target itself) = recall's
    # upper bound; recall / ceiling separates a weak indexer from diffuse attention
    recall_ceiling: list[float] = field(default_factory=list)


def attention_distribution(
    mla: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, rows: slice
) -> torch.Tensor:
    """Head-summed, L1-normalised causal attention probabilities of queries `rows` → [B, C, T] (no grad)."""
    with torch.no_grad():
        p = mla.project(x, cos, sin)
        b, t = x.shape[:2]
        s = torch.arange(t, device=x.device)
        q_lat = mla.absorb(p.q_nope[:, rows])  # [B, C, h, c]
        scores = torch.einsum("bthc,bsc->bhts", q_lat, p.kv_latent)
        scores = scores + torch.einsum("bthr,bsr->bhts", p.q_rope[:, rows], p.k_rope)
        future = s[None, :] > positions[rows][:, None]  # [C, T]
        probs = (scores.float() * mla.softmax_scale).masked_fill(future, float("-inf")).softmax(-1)
        summed = probs.sum(1)  # [B, C, T]
        return summed / summed.sum(-1, keepdim=True)


class IndexerDistiller:
    """Attach to a LongCatForCausalLM; after each forward, `loss(mode)` returns the indexer KL and recall."""

    def __init__(self, model: nn.Module, cross_layer_target: bool = True, chunk: int = 128) -> None:
        self.cross_layer_target = cross_layer_target
        self.chunk = chunk
        self.pairs: list[tuple[MLA, MLA | None]] = []
        self._captured: dict[int, _Capture] = {}
        self._handles = []
        for layer in model.model.layers:
            attns = list(layer.self_attn)
            for i, attn in enumerate(attns):
                if attn.indexer is not None:
                    reuser = attns[i + 1] if i + 1 < len(attns) and attns[i + 1].indexer is None else None
                    self.pairs.append((attn, reuser))
        for owner, reuser in self.pairs:
            for mod in (owner, reuser):
                if mod is not None:
                    self._handles.append(mod.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, args: tuple, output: tuple) -> None:
        x, cos, sin, positions = args[:4]
        self._captured[id(module)] = _Capture(x.detach(), cos, sin, positions, output[1])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def loss(self, mode: str = "dense") -> IndexerLossOutput:
        """mode: "dense" (warm-up: KL over the causal row) or "sparse" (KL on the selected set)."""
        if mode not in ("dense", "sparse"):
            raise ValueError(f"mode: expected 'dense' or 'sparse', got {mode!r}")
        total = None
        out = IndexerLossOutput(loss=torch.zeros(()))
        for owner, reuser in self.pairs:
            cap = self._captured.get(id(owner))
            if cap is None:
                raise RuntimeError("IndexerDistiller.loss: run a forward pass of the model first")
            rcap = self._captured.get(id(reuser)) if reuser is not None and self.cross_layer_target else None
            kl, recall, ceiling = self._layer_loss(owner, cap, reuser, rcap, mode)
            total = kl if total is None else total + kl
            out.kl.append(float(kl.detach()))
            out.recall.append(recall)
            out.recall_ceiling.append(ceiling)
        out.loss = total if total is not None else out.loss
        self._captured.clear()
        return out

    def _layer_loss(
        self, owner: MLA, cap: _Capture, reuser: MLA | None, rcap: _Capture | None, mode: str
    ) -> tuple[torch.Tensor, float, float]:
        cfg = owner.cfg
        indexer = owner.indexer
        assert indexer is not None
        x = cap.x
        b, t = x.shape[:2]
        with torch.no_grad():
            q_lora = owner.project(x, cap.cos, cap.sin).q_lora
        keys = indexer.keys(x, cap.cos, cap.sin)  # inputs detached: grads reach indexer params only
        q, w = indexer.queries(x, q_lora, cap.cos, cap.sin)
        kl_sum = x.new_zeros((), dtype=torch.float32)
        recall_sum, ceiling_sum, recall_rows = 0.0, 0.0, 0
        for start in range(0, t, self.chunk):
            rows = slice(start, min(start + self.chunk, t))
            target = attention_distribution(owner, x, cap.cos, cap.sin, cap.positions, rows)
            if rcap is not None and reuser is not None:
                target = 0.5 * (
                    target + attention_distribution(reuser, rcap.x, rcap.cos, rcap.sin, rcap.positions, rows)
                )
            logits = index_scores(q[:, rows], w[:, rows], keys)  # [B, C, T], grad → indexer
            future = torch.arange(t, device=x.device)[None, :] > cap.positions[rows][:, None]
            logits = logits.masked_fill(future, float("-inf"))
            if mode == "sparse" and cap.indices is not None:
                sel = cap.indices[:, rows]  # [B, C, k]
            else:
                with torch.no_grad():
                    forced = force_and_mask(
                        logits.detach(), cap.positions[rows], cfg.index_init_tokens, cfg.index_local_tokens
                    )
                    sel = select_topk(forced, cfg.index_topk)
            valid = sel >= 0
            safe = sel.clamp(min=0)
            p_sel = target.gather(-1, safe).masked_fill(~valid, 0.0)
            visible = cap.positions[rows] + 1  # [C]
            long_rows = visible > cfg.index_topk
            if bool(long_rows.any()):
                recall_sum += float(p_sel.sum(-1)[:, long_rows].sum())
                best = target[:, long_rows].topk(cfg.index_topk, dim=-1).values.sum(-1)  # [B, long rows]
                ceiling_sum += float(best.sum())
                recall_rows += int(long_rows.sum()) * b
            if mode == "sparse" and cap.indices is not None:
                p = p_sel / p_sel.sum(-1, keepdim=True).clamp_min(1e-12)
                log_q = logits.gather(-1, safe).masked_fill(~valid, float("-inf")).log_softmax(-1)
            else:
                p = target
                log_q = logits.log_softmax(-1)
            plogp = torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p))
            cross = torch.where(p > 0, p * log_q, torch.zeros_like(p))
            kl_sum = kl_sum + (plogp - cross).sum()
        if not recall_rows:
            return kl_sum / (b * t), 1.0, 1.0
        return kl_sum / (b * t), recall_sum / recall_rows, ceiling_sum / recall_rows
