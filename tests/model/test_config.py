import json
from pathlib import Path

import pytest

from longcat2.config import PRESETS, ConfigError, ModelConfig

# The released LongCat-2.0 config.json layout (LongcatCausalLM, model_type null, int routed_scaling_factor).
RELEASED_2_0 = {
    "architectures": ["LongcatCausalLM"],
    "model_type": None,
    "vocab_size": 163840,
    "hidden_size": 8192,
    "num_layers": 38,
    "num_attention_heads": 64,
    "ffn_hidden_size": 12288,
    "expert_ffn_hidden_size": 2048,
    "attention_method": "MLA",
    "use_mla": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "mla_scale_q_lora": True,
    "mla_scale_kv_lora": True,
    "rope_theta": 1000000,
    "rope_scaling": {
        "rope_type": "deepseek_yarn",
        "factor": 120,
        "original_max_position_embeddings": 8192,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1,
        "mscale_all_dim": 1,
    },
    "max_position_embeddings": 262144,
    "n_routed_experts": 768,
    "zero_expert_num": 128,
    "zero_expert_type": "identity",
    "moe_topk": 12,
    "routed_scaling_factor": 9,
    "norm_topk_prob": False,
    "router_bias": False,
    "moe_impl": "mix",
    "moe_switch_token_num": 1024,
    "oe_vocab_size_ratio": 100.567,
    "oe_neighbor_num": 5,
    "oe_split_num": 4,
    "index_n_heads": 32,
    "index_head_dim": 128,
    "index_topk": 2048,
    "index_init_tokens": 16,
    "index_local_tokens": 1024,
    "index_k_norm_type": "rms",
    "cli_factor": 2,
    "dsa_mtp_cli": True,
    "mtp_num_layers": 3,
    "mtp_replicate_modules": True,
    "mtp_disable_over_tokenizer": True,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

FLASH_LITE = {
    "architectures": ["LongcatFlashNgramForCausalLM"],
    "model_type": "longcat_flash_ngram",
    "vocab_size": 131072,
    "hidden_size": 3072,
    "num_layers": 14,
    "num_attention_heads": 32,
    "ffn_hidden_size": 6144,
    "expert_ffn_hidden_size": 1024,
    "n_routed_experts": 256,
    "zero_expert_num": 128,
    "moe_topk": 12,
    "routed_scaling_factor": 6.0,
    "ngram_vocab_size_ratio": 78,
    "emb_neighbor_num": 4,
    "emb_split_num": 4,
    "rope_theta": 5000000.0,
    "max_position_embeddings": 327680,
}


def test_every_preset_validates_and_round_trips_through_hf_json():
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg, name


def test_released_2_0_config_reads_as_the_preset():
    cfg = ModelConfig.from_hf(RELEASED_2_0)
    assert cfg.hf_format == "longcat"
    assert cfg.routed_scaling_factor == 9.0 and isinstance(cfg.routed_scaling_factor, float)
    assert cfg.rope_scaling["rope_type"] == "deepseek_yarn"
    assert cfg == ModelConfig.from_preset("longcat-2.0").replace(torch_dtype=cfg.torch_dtype)
    assert abs(cfg.softmax_scale - 0.15781) < 1e-5  # spec §1.2
    out = cfg.to_hf()
    assert out["architectures"] == ["LongcatCausalLM"] and out["model_type"] is None
    assert out["routed_scaling_factor"] == 9 and isinstance(out["routed_scaling_factor"], int)


def test_flash_lite_config_maps_ngram_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FLASH_LITE))
    cfg = ModelConfig.from_hf(tmp_path)
    assert (cfg.oe_vocab_size_ratio, cfg.oe_neighbor_num, cfg.oe_split_num) == (78.0, 4, 4)
    assert cfg.ngram_fusion == "mean" and cfg.ngram_base_rows == 78 * 131072 and not cfg.use_lsa
    assert cfg.to_hf()["emb_split_num"] == 4


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(index_init_tokens=1000, index_local_tokens=1100), "index_init_tokens + index_local_tokens"),
        (dict(moe_topk=0), "moe_topk"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(oe_split_num=3), "oe_split_num"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(cli_factor=3), "cli_factor"),
        (dict(eos_token_id=10**7), "eos_token_id"),
        (dict(lsa_hi_top_pages=12), "lsa_hi_top_pages"),
        (dict(lsa_hi_page_size=100), "lsa_hi_page_size"),
        (dict(lsa_hi_min_len=0), "lsa_hi_min_len"),
    ],
)
def test_bad_values_name_the_key(change, key):
    with pytest.raises(ConfigError, match=key.replace("+", r"\+")):
        ModelConfig.from_preset("longcat-2.0", **change)


def test_bad_hf_json_names_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf({k: v for k, v in RELEASED_2_0.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="num_layers: expected an integer"):
        ModelConfig.from_hf({**RELEASED_2_0, "num_layers": "38"})
    with pytest.raises(ConfigError, match="architectures"):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 8})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_preset("longcat-3")


def test_lora_norm_eps_is_a_config_switch_that_round_trips():
    cfg = ModelConfig.from_preset("tiny", mla_norm_eps=1e-5)
    assert ModelConfig.from_hf(cfg.to_hf()).mla_norm_eps == 1e-5
    from longcat2.model.attention import MLA

    assert MLA(cfg, has_indexer=False).q_a_layernorm.eps == 1e-5


def test_2_0_defaults_follow_the_reference_engines(tmp_path):
    """A LongcatCausalLM config.json without the switches: N-gram mean fusion and MLA norm eps =
    rms_norm_eps (SGLang's longcat_flash_pro); Flash keeps transformers' 1e-6."""
    from longcat2.model.attention import MLA

    released = {k: v for k, v in RELEASED_2_0.items() if k not in ("ngram_fusion", "mla_norm_eps")}
    cfg = ModelConfig.from_hf(released)
    assert cfg.ngram_fusion == "mean"
    assert cfg.mla_norm_eps is None and cfg.lora_norm_eps == cfg.rms_norm_eps == 1e-5
    assert "mla_norm_eps" not in cfg.to_hf()  # not a released key: written only as an override
    assert ModelConfig.from_hf({**released, "rms_norm_eps": 1e-6}).lora_norm_eps == 1e-6
    for preset in ("longcat-2.0", "tiny"):
        p = ModelConfig.from_preset(preset)
        assert p.ngram_fusion == "mean" and p.lora_norm_eps == p.rms_norm_eps
    tiny = ModelConfig.from_preset("tiny")
    mla = MLA(tiny, has_indexer=False)
    assert mla.q_a_layernorm.eps == mla.kv_a_layernorm.eps == tiny.rms_norm_eps == 1e-5
    for preset in ("longcat-flash", "longcat-flash-lite", "tiny-flash", "tiny-flash-lite"):
        flash = ModelConfig.from_preset(preset)
        assert flash.lora_norm_eps == 1e-6
        assert ModelConfig.from_hf(flash.to_hf()).lora_norm_eps == 1e-6
    assert ModelConfig.from_hf({**released, "ngram_fusion": "residual"}).ngram_fusion == "residual"


def test_embedded_model_keeps_the_rules_it_was_trained_with():
    import longcat2

    DEFAULT_MODEL_DIR = Path(longcat2.__file__).parent / "assets" / "default-model"
    raw = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert raw["ngram_fusion"] == "residual" and raw["mla_norm_eps"] == 1e-6
    cfg = ModelConfig.from_hf(DEFAULT_MODEL_DIR)
    assert cfg.ngram_fusion == "residual" and cfg.lora_norm_eps == 1e-6


def test_hierarchical_indexing_is_off_for_released_configs_and_round_trips(tmp_path):
    released = ModelConfig.from_hf(RELEASED_2_0)
    assert not released.lsa_hi
    assert (released.lsa_hi_page_size, released.lsa_hi_block_size) == (128, 8)  # the LSA report's pages
    assert (released.lsa_hi_top_pages, released.lsa_hi_min_len) == (1024, 262144)
    assert not any(k.startswith("lsa_hi") for k in released.to_hf())  # released files stay as released
    on = released.replace(lsa_hi=True, lsa_hi_top_pages=512)
    out = on.to_hf()
    assert {k: v for k, v in out.items() if k.startswith("lsa_hi")} == {
        "lsa_hi": True,
        "lsa_hi_top_pages": 512,
    }
    (tmp_path / "config.json").write_text(json.dumps(out))
    assert ModelConfig.from_hf(tmp_path) == on
