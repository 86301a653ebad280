"""Config-only arithmetic: parameter counts, FLOPs per token, cache bytes, decode bytes per step.

Everything here is a pure function of a `ModelConfig` (no torch), so `longcat2 info` and the planner share
one implementation and tests can compare it with the instantiated model for the tiny presets.
"""

from __future__ import annotations

from typing import Any

from longcat2.config import ModelConfig


# ---------------------------------------------------------------------- parameters
def mla_params(cfg: ModelConfig) -> int:
    """One MLA sublayer: q_a, q_a_layernorm, q_b, kv_a_with_mqa, kv_a_layernorm, kv_b, o_proj."""
    h, H, ql, kl = cfg.num_attention_heads, cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank
    return (
        ql * H + ql + h * cfg.qk_head_dim * ql
        + (kl + cfg.qk_rope_head_dim) * H + kl
        + h * (cfg.qk_nope_head_dim + cfg.v_head_dim) * kl
        + H * h * cfg.v_head_dim
    )  # fmt: skip


def indexer_params(cfg: ModelConfig) -> int:
    """One LSA indexer: wq_b, wk, k_norm (+bias for layernorm), weights_proj; 0 when LSA is off."""
    if not cfg.use_lsa:
        return 0
    n, d, H = cfg.index_n_heads, cfg.index_head_dim, cfg.hidden_size
    norm = d * (2 if cfg.index_k_norm_type == "layernorm" else 1)
    return n * d * cfg.q_lora_rank + d * H + norm + n * H


def swiglu_params(cfg: ModelConfig, inner: int) -> int:
    return 3 * cfg.hidden_size * inner


def router_params(cfg: ModelConfig) -> int:
    n = cfg.n_routed_experts + cfg.zero_expert_num
    return n * cfg.hidden_size + (n if cfg.router_bias else 0)


def expert_params(cfg: ModelConfig) -> int:
    """One routed FFN expert (zero experts have none)."""
    return swiglu_params(cfg, cfg.expert_ffn_hidden_size)


def ngram_table_params(cfg: ModelConfig) -> int:
    t, m = cfg.ngram_num_tables, cfg.ngram_base_rows
    return cfg.ngram_table_dim * sum(m + 2 * i + 1 for i in range(t))


def ngram_proj_params(cfg: ModelConfig) -> int:
    return cfg.ngram_num_tables * cfg.ngram_table_dim * cfg.hidden_size


def mtp_params(cfg: ModelConfig) -> int:
    """The MTP head: one embedding and final norm, plus per physical module enorm, hnorm, eh_proj, two norms,
    an MLA (with an indexer under LSA) and a dense SwiGLU; lm_head is shared with the trunk."""
    if cfg.num_mtp_modules == 0:
        return 0
    H = cfg.hidden_size
    module = (
        4 * H + 2 * H * H + mla_params(cfg) + indexer_params(cfg) + swiglu_params(cfg, cfg.ffn_hidden_size)
    )
    return cfg.vocab_size * H + H + cfg.num_mtp_modules * module


def default_experts_per_token(cfg: ModelConfig) -> float:
    """K_e default: 2/3 of moe_topk (8 of 12, spec §6: the published ~48 B / ~27 B averages)."""
    return cfg.moe_topk * 2 / 3


def count_parameters(cfg: ModelConfig, experts_per_token: float | None = None) -> dict[str, Any]:
    """Parameter counts with the spec §6 conventions.

    total: trunk without MTP. active_min: total − routed experts − embed_tokens rows − n-gram tables (lm_head and
    n-gram projections are active); active_max: + moe_topk FFN experts per layer; active_avg: + `experts_per_token`
    (K_e, the expected FFN, i.e. non-zero, experts a token hits per layer). mtp: all physical MTP modules.
    """
    H, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    if experts_per_token is None:
        experts_per_token = default_experts_per_token(cfg)
    parts = {
        "embed_tokens": V * H,
        "lm_head": 0 if cfg.tie_word_embeddings else V * H,
        "final_norm": H,
        "attention": 2 * L * mla_params(cfg),
        "indexer": indexer_passes(cfg) * indexer_params(cfg),  # owners: sublayers i with i % cli_factor == 0
        "dense_ffn": 2 * L * swiglu_params(cfg, cfg.ffn_hidden_size),
        "layer_norms": 4 * L * H,
        "router": L * router_params(cfg),
        "routed_experts": L * cfg.n_routed_experts * expert_params(cfg),
        "ngram_tables": ngram_table_params(cfg),
        "ngram_proj": ngram_proj_params(cfg),
    }
    total = sum(parts.values())
    per_expert_all_layers = L * expert_params(cfg)
    active_min = total - parts["routed_experts"] - parts["ngram_tables"]
    active_min -= 0 if cfg.tie_word_embeddings else parts["embed_tokens"]
    return {
        "total": total,
        "active_min": active_min,
        "active_avg": active_min + round(experts_per_token * per_expert_all_layers),
        "active_max": active_min + cfg.moe_topk * per_expert_all_layers,
        "experts_per_token": experts_per_token,
        "per_expert_all_layers": per_expert_all_layers,
        "mtp": mtp_params(cfg),
        "breakdown": parts,
    }


# ---------------------------------------------------------------------- caches
def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """MLA latent cache of the 2L trunk sublayers (MTP excluded). dtype_bytes=1 is the FlashMLA FP8 layout:
    kv_lora e4m3 + one fp32 scale per 128 + BF16 rope part (656 B per sublayer for 512+64)."""
    kl, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    per = (kl + r) * dtype_bytes if dtype_bytes >= 2 else kl + 4 * (-(-kl // 128)) + 2 * r
    return cfg.num_attention_sublayers * per


def indexer_passes(cfg: ModelConfig) -> int:
    """Indexer passes (and indexer key caches) per token in the trunk: 2L / cli_factor."""
    return cfg.num_attention_sublayers // cfg.cli_factor if cfg.use_lsa else 0


def indexer_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 1) -> int:
    """Indexer key cache; dtype_bytes=1 adds one fp32 scale per key (SGLang FP8: 132 B for d=128)."""
    d = cfg.index_head_dim
    per = d * dtype_bytes + (4 if dtype_bytes == 1 else 0)
    return indexer_passes(cfg) * per


def hi_summary_bytes_per_token(cfg: ModelConfig) -> float:
    """HI page summaries (one bf16 mean key per lsa_hi_block_size tokens per indexer pass); 0 with HI off."""
    if not (cfg.use_lsa and cfg.lsa_hi):
        return 0.0
    return indexer_passes(cfg) * cfg.index_head_dim * 2 / cfg.lsa_hi_block_size


def mtp_cache_bytes_per_token(cfg: ModelConfig, kv_bytes: int = 2, index_bytes: int = 1) -> int:
    """Caches of the physical MTP modules (one MLA each, plus an indexer with LSA)."""
    kv = kv_cache_bytes_per_token(cfg, kv_bytes) // cfg.num_attention_sublayers
    idx = (
        (indexer_cache_bytes_per_token(cfg, index_bytes) // max(indexer_passes(cfg), 1)) if cfg.use_lsa else 0
    )
    return cfg.num_mtp_modules * (kv + idx)


def decode_bytes_per_step(
    cfg: ModelConfig, context: int, kv_bytes: int = 2, index_bytes: int = 1
) -> dict[str, float]:
    """Attention-cache bytes one sequence reads per decode step (sparse_attention.md §5.2 formula).

    dense = 2L·ctx·b_kv; sparse = 2L·min(ctx, k)·b_kv + passes·ctx·b_idx (dense when LSA is off).
    With HI on (`cfg.lsa_hi`) and ctx > lsa_hi_min_len the indexer term is passes·(ctx/B·b_sum +
    min(ctx, M·P)·b_idx): the page summaries (bf16 sub-block means) plus the kept pages' keys.
    """
    b_kv = kv_cache_bytes_per_token(cfg, kv_bytes) / cfg.num_attention_sublayers
    n = cfg.num_attention_sublayers
    dense = n * context * b_kv
    if not cfg.use_lsa:
        return {
            "dense": dense,
            "sparse_main": dense,
            "indexer": 0.0,
            "sparse": dense,
            "ratio": 1.0,
            "share": 0.0,
        }
    main = n * min(context, cfg.index_topk) * b_kv
    idx = float(indexer_cache_bytes_per_token(cfg, index_bytes) * context)
    if cfg.lsa_hi and context > max(cfg.lsa_hi_min_len, cfg.index_topk):
        kept = min(context, cfg.lsa_hi_top_pages * cfg.lsa_hi_page_size)
        idx = hi_summary_bytes_per_token(cfg) * context + float(
            indexer_cache_bytes_per_token(cfg, index_bytes) * kept
        )
    sparse = main + idx
    return {"dense": dense, "sparse_main": main, "indexer": idx, "sparse": sparse, "ratio": dense / sparse,
            "share": idx / sparse, "hi": bool(cfg.lsa_hi and context > max(cfg.lsa_hi_min_len, cfg.index_topk))}  # fmt: skip


# ---------------------------------------------------------------------- FLOPs
def _mean_causal(seq: int, cap: int | None = None) -> float:
    """Mean over query positions t=1..seq of min(t, cap) (keys attended under a causal mask)."""
    if cap is None or seq <= cap:
        return (seq + 1) / 2
    return (cap * (cap + 1) / 2 + (seq - cap) * cap) / seq


def flops_per_token(
    cfg: ModelConfig,
    seq_len: int,
    experts_per_token: float | None = None,
    sparse: bool | None = None,
    mtp: bool = True,
) -> dict[str, float]:
    """Forward FLOPs per token (2 per multiply-add) at training/prefill sequence length `seq_len`.

    GEMMs: every weight a token touches (K_e routed experts, lm_head, n-gram projections, router, indexer
    projections once per indexer pass). Attention core: 2·h·(qk_dim + v_dim) per attended key, keys = mean causal
    context, capped at index_topk when `sparse` (default: sparse iff LSA is on). Indexer scoring: 2·n_I·(d_I + 1)
    per key over the full causal context (the quadratic part), 2L/cli_factor passes. MTP (when `mtp`):
    mtp_num_layers draft steps, each eh_proj + MLA + dense FFN + shared lm_head; all steps share one indexer pass
    when dsa_mtp_cli. Backward = 2 × forward.
    """
    sparse = cfg.use_lsa if sparse is None else (sparse and cfg.use_lsa)
    if experts_per_token is None:
        experts_per_token = default_experts_per_token(cfg)
    H, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    h = cfg.num_attention_heads
    mla_lin = mla_params(cfg) - cfg.q_lora_rank - cfg.kv_lora_rank
    per_key = 2 * h * (cfg.qk_head_dim + cfg.v_head_dim)
    ctx_attn = _mean_causal(seq_len, cfg.index_topk if sparse else None)
    ctx_full = _mean_causal(seq_len)
    idx_lin = 0
    if cfg.use_lsa:
        n, d = cfg.index_n_heads, cfg.index_head_dim
        idx_lin = n * d * cfg.q_lora_rank + d * H + n * H
    idx_key = 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) if cfg.use_lsa else 0
    passes = indexer_passes(cfg)
    out = {
        "attention_proj": 2.0 * 2 * L * mla_lin,
        "attention_core": 2 * L * per_key * ctx_attn,
        "indexer_proj": 2.0 * passes * idx_lin,
        "indexer_scoring": passes * idx_key * ctx_full,
        "dense_ffn": 2.0 * 2 * L * swiglu_params(cfg, cfg.ffn_hidden_size),
        "router": 2.0 * L * (cfg.n_routed_experts + cfg.zero_expert_num) * H,
        "experts": 2.0 * L * experts_per_token * expert_params(cfg),
        "ngram_proj": 2.0 * ngram_proj_params(cfg),
        "lm_head": 2.0 * V * H,
    }
    out["trunk"] = sum(out.values())
    mtp_f = 0.0
    if mtp and cfg.mtp_num_layers > 0:
        steps = cfg.mtp_num_layers
        step = (
            2.0 * (2 * H * H + mla_lin + swiglu_params(cfg, cfg.ffn_hidden_size) + V * H) + per_key * ctx_attn
        )
        idx_steps = (1 if cfg.dsa_mtp_cli else steps) if cfg.use_lsa else 0
        mtp_f = steps * step + idx_steps * (2.0 * idx_lin + idx_key * ctx_full)
    out["mtp"] = mtp_f
    out["forward"] = out["trunk"] + mtp_f
    out["backward"] = 2 * out["forward"]
    out["train"] = 3 * out["forward"]
    return out
