"""Model shapes the benchmarks share (plain dicts: importable without torch or longcat2, so a benchmark can
hand them to any checkout, as bench/compare_revisions.py does)."""

# tiny-flash's shape, scaled up so that matmuls, not Python, dominate a training step
# (LongCat-Flash proportions: expert_ffn = hidden/4, ffn = 2*hidden, zero experts = routed/2, fine-grained top-k)
TRAIN_MODEL = dict(
    vocab_size=8192, hidden_size=512, num_layers=2, num_attention_heads=8, ffn_hidden_size=1024,
    expert_ffn_hidden_size=128, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, n_routed_experts=64, zero_expert_num=32, moe_topk=8, routed_scaling_factor=2.0,
    rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096, oe_split_num=0, index_n_heads=0,
    mtp_num_layers=0, hf_format="longcat_flash", torch_dtype="float32",
)  # fmt: skip

# a small LongCat-Flash (overrides of the tiny-flash preset): 4 layers (8 MLA sublayers), d=512, 16 routed +
# 8 zero experts (top-4), ~33M params
SMALL_FLASH = dict(
    vocab_size=8192, hidden_size=512, num_layers=4, num_attention_heads=8, ffn_hidden_size=1024,
    expert_ffn_hidden_size=256, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, n_routed_experts=16, zero_expert_num=8, moe_topk=4, max_position_embeddings=8192,
)  # fmt: skip
