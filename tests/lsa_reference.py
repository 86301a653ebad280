"""An independent LongCat LSA reference, written from the spec (longcat_spec.md §2.3–2.4, sparse_attention.md §2).

The reference shares no code with `longcat2.model`: it reads only the checkpoint's parameter names (a sublayer's
`state_dict`) and the config values (`reference_model` builds the model under test; `capture_attention` hooks it). Everything runs in float64, one query row at a time where the rule is per row:

- Indexer: q^I = wq_b(c_q) (c_q = the q_a_layernorm output), k^I = k_norm(wk(x)), RoPE on the first
  qk_rope_head_dim dims of both, interleaved pairs (x0, x1), (x2, x3), … when `indexer_rope_interleave`, else
  half-split pairs (x_i, x_{i+r/2}); w = weights_proj(x) · n_heads^-0.5 · head_dim^-0.5;
  I[t, s] = Σ_j w[t, j] · ReLU(q^I[t, j] · k^I[s]).
- Selection: a row that sees <= index_topk keys takes them all; otherwise the sink (s < index_init_tokens) and
  local (t − index_local_tokens < s <= t) keys are kept and the rest of the budget goes to the highest scores,
  equal scores to the later position.
- MLA (expanded form) over a key set: α_q = √(H/q_lora_rank) on the whole query, α_kv = √(H/kv_lora_rank) on the
  normalised kv latent, interleaved RoPE on q_rope/k_rope, softmax scale qk_head_dim^-0.5 (configs here have no
  YaRN). Returns the attention output before o_proj, [T, heads · v_head_dim].
- Cross-layer reuse: the sublayer after an owner attends over the owner's sets (the caller passes them).

Scores that differ from a set's boundary by less than rounding can flip between implementations, so
`select` also reports the rows whose selection is fragile (a near tie at the boundary, or a head dot product
within rounding of ReLU's kink); callers compare every other row exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longcat2.config import ModelConfig
from longcat2.model.longcat import LongCatForCausalLM


def _lora_eps(cfg: ModelConfig) -> float:
    """MLA's q_a/kv_a norm eps: `mla_norm_eps`, or `rms_norm_eps` when it is null (the 2.0 family)."""
    return cfg.rms_norm_eps if cfg.mla_norm_eps is None else cfg.mla_norm_eps


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def rope(x: torch.Tensor, theta: float, interleave: bool) -> torch.Tensor:
    """Rotate x [T, r] or [T, heads, r] (row t at position t); pairs interleaved or half-split, same layout out."""
    t, r = x.shape[0], x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)  # [r/2]
    angle = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq  # [T, r/2]
    if x.dim() == 3:
        angle = angle[:, None, :]
    cos, sin = angle.cos(), angle.sin()
    a, b = (x[..., 0::2], x[..., 1::2]) if interleave else (x[..., : r // 2], x[..., r // 2 :])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if interleave:
        return torch.stack([ra, rb], dim=-1).flatten(-2)
    return torch.cat([ra, rb], dim=-1)


def _params(sublayer_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in sublayer_state.items()}


def _q_latent(p: dict[str, torch.Tensor], x: torch.Tensor, cfg) -> torch.Tensor:
    return _rms_norm(x @ p["q_a_proj.weight"].T, p["q_a_layernorm.weight"], _lora_eps(cfg))


@dataclass
class IndexerDetail:
    scores: torch.Tensor  # [T, T] I[t, s] (future keys included, unmasked)
    dots: torch.Tensor  # [T, heads, T] q^I · k^I
    q: torch.Tensor | None = None  # [T, heads, d] indexer queries
    k: torch.Tensor | None = None  # [T, d] indexer keys
    w: torch.Tensor | None = None  # [T, heads] head weights


def indexer_scores(sublayer_state: dict[str, torch.Tensor], x: torch.Tensor, cfg) -> IndexerDetail:
    """x [T, H] (the owner's attention input) → the lightning-indexer scores of every (query, key) pair."""
    p, x = _params(sublayer_state), x.double()
    t, n, d, r = x.shape[0], cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
    q = (_q_latent(p, x, cfg) @ p["indexer.wq_b.weight"].T).view(t, n, d)
    k = x @ p["indexer.wk.weight"].T
    if cfg.index_k_norm_type == "rms":
        k = _rms_norm(k, p["indexer.k_norm.weight"], 1e-6)
    else:
        k = _layer_norm(k, p["indexer.k_norm.weight"], p["indexer.k_norm.bias"], 1e-6)
    q = torch.cat([rope(q[..., :r], cfg.rope_theta, cfg.indexer_rope_interleave), q[..., r:]], dim=-1)
    k = torch.cat([rope(k[..., :r], cfg.rope_theta, cfg.indexer_rope_interleave), k[..., r:]], dim=-1)
    w = (x @ p["indexer.weights_proj.weight"].T) * n**-0.5 * d**-0.5  # [T, n]
    dots = torch.einsum("tjd,sd->tjs", q, k)
    return IndexerDetail(scores=torch.einsum("tj,tjs->ts", w, dots.clamp(min=0)), dots=dots, q=q, k=k, w=w)


def select_hi(detail: IndexerDetail, cfg) -> tuple[list[list[int]], list[bool]]:
    """Hierarchical indexing (longcat_spec.md "Settled by the reference engines", LSA report), per query row t
    that sees more than max(lsa_hi_min_len, index_topk) keys; other rows as `select`. Pages of P tokens, each
    summarised by the means of its B-token sub-blocks; a page lying wholly in the dynamic region
    [init, t - local] scores max over its sub-block means of Σ_j w_j ReLU(q_j · mean); the sink pages and
    every page reaching the local window are kept, and the best other pages fill the `lsa_hi_top_pages`
    budget (equal scores: the later page); the dynamic tokens of the kept pages then compete as in `select`.
    Fragile: a near tie at the page boundary or at the token boundary."""
    sets, fragile = select(detail, cfg)
    topk, init, local = cfg.index_topk, cfg.index_init_tokens, cfg.index_local_tokens
    page, sub = cfg.lsa_hi_page_size, cfg.lsa_hi_block_size
    for t in range(detail.scores.shape[0]):
        if not (cfg.lsa_hi and t + 1 > max(cfg.lsa_hi_min_len, topk)):
            continue
        last_page = t // page
        forced_pages = {p for p in range(last_page + 1) if p * page < init or (p + 1) * page - 1 > t - local}
        cands = [p for p in range(last_page + 1) if p not in forced_pages]
        budget = cfg.lsa_hi_top_pages - len(forced_pages)
        score = {}
        for p in cands:
            means = [
                detail.k[b * sub : (b + 1) * sub].mean(0)
                for b in range(p * page // sub, (p + 1) * page // sub)
            ]
            score[p] = max(float(detail.w[t] @ (detail.q[t] @ m).clamp(min=0)) for m in means)
        ranked = sorted(cands, key=lambda p: (score[p], p), reverse=True)
        kept = forced_pages | set(ranked[:budget])
        page_fragile = budget < len(ranked) and abs(
            score[ranked[budget - 1]] - score[ranked[budget]]
        ) <= 1e-4 * (abs(score[ranked[0]]) + 1e-12)
        forced = {s for s in range(t + 1) if s < init or s > t - local}
        rest = [s for s in range(t + 1) if s not in forced and s // page in kept]
        row = detail.scores[t]
        ranked_tok = sorted(rest, key=lambda s: (float(row[s]), s), reverse=True)
        chosen = ranked_tok[: topk - len(forced)]
        sets[t] = sorted(forced | set(chosen))
        boundary = float(row[chosen[-1]])
        tol = 1e-4 * float(row[: t + 1].abs().max()) + 1e-12
        near = [s for s in rest if abs(float(row[s]) - boundary) <= tol]
        fragile[t] = page_fragile or (len(near) > 1 and any(float(row[s]) != boundary for s in near))
    return sets, fragile


def select(
    detail: IndexerDetail, cfg, rel_tol: float = 1e-4, tie_rule: bool = True
) -> tuple[list[list[int]], list[bool]]:
    """Per query row t: the selected key positions (ascending) and whether the choice is fragile.
    tie_rule=False: exact ties at the boundary are fragile too (for an implementation without the tie rule)."""
    topk, init, local = cfg.index_topk, cfg.index_init_tokens, cfg.index_local_tokens
    sets, fragile = [], []
    for t in range(detail.scores.shape[0]):
        if t + 1 <= topk:
            sets.append(list(range(t + 1)))
            fragile.append(False)
            continue
        forced = {s for s in range(t + 1) if s < init or s > t - local}
        rest = [s for s in range(t + 1) if s not in forced]
        row = detail.scores[t]
        ranked = sorted(rest, key=lambda s: (float(row[s]), s), reverse=True)  # ties: later position first
        chosen = ranked[: topk - len(forced)]
        sets.append(sorted(forced | set(chosen)))
        boundary = float(row[chosen[-1]])
        tol = rel_tol * float(row[: t + 1].abs().max()) + 1e-12
        dot_tol = rel_tol * float(detail.dots[t, :, : t + 1].abs().max()) + 1e-12
        near = [s for s in rest if abs(float(row[s]) - boundary) <= tol]
        kink = [
            s
            for s in near
            if bool(((detail.dots[t, :, s].abs() < dot_tol) & (detail.dots[t, :, s] != 0)).any())
        ]
        inexact = [s for s in near if float(row[s]) != boundary]
        fragile.append(len(near) > 1 and bool(kink or inexact or not tie_rule))
    return sets, fragile


def mla_over_sets(sublayer_state: dict[str, torch.Tensor], x: torch.Tensor, sets: list[list[int]], cfg):
    """x [T, H] → attention output before o_proj [T, heads · v_head_dim], row t attending over keys sets[t]."""
    p, x = _params(sublayer_state), x.double()
    t, h = x.shape[0], cfg.num_attention_heads
    nope, r, v_dim, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    alpha_q = math.sqrt(cfg.hidden_size / cfg.q_lora_rank) if cfg.mla_scale_q_lora else 1.0
    alpha_kv = math.sqrt(cfg.hidden_size / cfg.kv_lora_rank) if cfg.mla_scale_kv_lora else 1.0
    q = (_q_latent(p, x, cfg) @ p["q_b_proj.weight"].T).view(t, h, nope + r) * alpha_q
    kv = x @ p["kv_a_proj_with_mqa.weight"].T
    latent = _rms_norm(kv[:, :c], p["kv_a_layernorm.weight"], _lora_eps(cfg)) * alpha_kv
    k_nope, v = (latent @ p["kv_b_proj.weight"].T).view(t, h, nope + v_dim).split([nope, v_dim], dim=-1)
    q_rope, k_rope = rope(q[..., nope:], cfg.rope_theta, True), rope(kv[:, c:], cfg.rope_theta, True)
    scores = torch.einsum("thn,shn->hts", q[..., :nope], k_nope) + torch.einsum("thr,sr->hts", q_rope, k_rope)
    allowed = torch.zeros(t, t, dtype=torch.bool)
    for row, keys in enumerate(sets):
        allowed[row, keys] = True
    probs = (scores * (nope + r) ** -0.5).masked_fill(~allowed, float("-inf")).softmax(-1)  # [h, T, S]
    return torch.einsum("hts,shv->thv", probs, v).reshape(t, h * v_dim)


def reference_model(interleave: bool, plateau: bool = False) -> LongCatForCausalLM:
    """The tiny LongCat-2.0 preset without YaRN or MTP (what the reference covers), peaked enough that top-k
    matters. plateau: every indexer score is exactly 0, so the selection is the forced tokens + the tie rule."""
    cfg = ModelConfig.from_preset(
        "tiny", rope_scaling=None, mtp_num_layers=0, initializer_range=0.1, indexer_rope_interleave=interleave
    )
    torch.manual_seed(0)
    model = LongCatForCausalLM(cfg).eval()
    if plateau:
        for layer in model.model.layers:
            torch.nn.init.zeros_(layer.self_attn[0].indexer.wq_b.weight)
    return model


def capture_attention(model) -> tuple[dict, list]:
    """Hooks on every attention sublayer of model.model.layers: its input x (when the sublayer module is called,
    as the model's forward does) and its o_proj input (the attention output; any caller, e.g. the engine),
    appended per call under ((layer, sublayer), "x" | "out"). Returns (captured, handles)."""
    seen: dict = {}
    handles = []
    for li, layer in enumerate(model.model.layers):
        for j, attn in enumerate(layer.self_attn):
            key = (li, j)

            def take_x(module, args, kwargs, key=key):
                seen.setdefault((key, "x"), []).append((args[0] if args else kwargs["x"]).detach())

            def take_out(module, args, key=key):
                seen.setdefault((key, "out"), []).append(args[0].detach())

            handles.append(attn.register_forward_pre_hook(take_x, with_kwargs=True))
            handles.append(attn.o_proj.register_forward_pre_hook(take_out))
    return seen, handles


def assert_attention_matches(model, xs: dict, outs: dict, cfg, atol: float = 1e-4, selector=None) -> int:
    """For every layer: reference selection from the owner's input xs[(l, 0)] [T, H], owner and reuser outputs
    over those sets; compare with outs[(l, j)] [T, heads · v] on every non-fragile row. Returns the number of
    rows compared that attend over a strict subset of their visible keys."""
    sparse_rows = 0
    for li, layer in enumerate(model.model.layers):
        owner, reuser = layer.self_attn[0], layer.self_attn[1]
        assert reuser.indexer is None and owner.indexer is not None
        sets, fragile = (selector or select)(indexer_scores(owner.state_dict(), xs[li, 0], cfg), cfg)
        keep = ~torch.tensor(fragile)
        assert keep.float().mean() > 0.9, f"layer {li}: too many fragile rows ({sum(fragile)})"
        for j, attn in ((0, owner), (1, reuser)):
            ref = mla_over_sets(attn.state_dict(), xs[li, j], sets, cfg)
            got = outs[li, j].double()
            err = (got - ref).abs().amax(-1)  # [T]
            bad = torch.nonzero(keep & (err > atol * (1 + ref.abs().amax(-1)))).flatten().tolist()
            assert not bad, (
                f"layer {li} sublayer {j}: rows {bad[:10]} differ (max err {float(err[bad].max()):.3g})"
            )
        sparse_rows += int(keep[cfg.index_topk :].sum())
    return sparse_rows
