"""ModelConfig: one dataclass for every LongCat family member, presets, and the released config.json formats.

Design choices:
- Field names are the released `config.json` keys (`hidden_size`, `n_routed_experts`, `zero_expert_num`,
  `index_topk`, `oe_*`, ...), so `from_hf` is mostly a rename-free copy and `to_hf` writes them back.
- LongCat-2.0, LongCat-Flash and LongCat-Flash-Lite are the same code: the N-gram embedding is off when
  `oe_split_num == 0`, LSA is off when `index_n_heads == 0`, MTP is off when `mtp_num_layers == 0`.
- `hf_format` remembers which released format a config came from (or should be written as):
  `longcat` (LongcatCausalLM, `model_type` null, `oe_*`/`index_*` keys), `longcat_flash`
  (LongcatFlashForCausalLM) or `longcat_flash_ngram` (LongcatFlashNgramForCausalLM, `ngram_*`/`emb_*` keys).
- Validation raises ConfigError naming the offending key, so a bad config.json fails at load time,
  not deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value is missing, has the wrong type, or contradicts another value; the message names the key."""


HF_FORMATS = ("longcat", "longcat_flash", "longcat_flash_ngram")
NGRAM_FUSIONS = ("mean", "residual")  # mean: (word + Σp)/(1+T) (Flash-Lite, 2.0); residual: word + Σp/(1+T)
INDEX_K_NORMS = ("rms", "layernorm")


@dataclass
class ModelConfig:
    # trunk
    vocab_size: int = 163840
    hidden_size: int = 8192
    num_layers: int = 38  # logical layers; each holds two MLA sublayers
    num_attention_heads: int = 64
    ffn_hidden_size: int = 12288  # dense SwiGLU, two per layer
    expert_ffn_hidden_size: int = 2048
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 3
    initializer_range: float = 0.02
    # MLA
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_scale_q_lora: bool = True
    mla_scale_kv_lora: bool = True
    # eps of q_a_layernorm / kv_a_layernorm. None: rms_norm_eps, as SGLang's LongCat-2.0 model builds them
    # (the 2.0 family); the Flash presets set transformers' hard-coded 1e-6. Not a released config key.
    mla_norm_eps: float | None = None
    # RoPE
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "rope_type": "deepseek_yarn",
            "factor": 120.0,
            "original_max_position_embeddings": 8192,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    max_position_embeddings: int = 262144
    # MoE
    n_routed_experts: int = 768
    zero_expert_num: int = 128
    zero_expert_type: str = "identity"
    moe_topk: int = 12
    routed_scaling_factor: float = 9.0
    norm_topk_prob: bool = False
    router_bias: bool = False
    # N-gram ("over-embedding"): off when oe_split_num == 0
    oe_vocab_size_ratio: float = 100.567
    oe_neighbor_num: int = 5
    oe_split_num: int = 4
    ngram_fusion: str = "mean"  # the reference engines' 2.0 rule (SGLang, vLLM, FluentLLM)
    # LSA indexer: off when index_n_heads == 0
    index_n_heads: int = 32
    index_head_dim: int = 128
    index_topk: int = 2048
    index_init_tokens: int = 16
    index_local_tokens: int = 1024
    index_k_norm_type: str = "rms"
    indexer_rope_interleave: bool = True
    cli_factor: int = 2
    dsa_mtp_cli: bool = True
    index_query_chunk: int = 256  # queries scored per chunk in prefill/training (memory bound, not maths)
    # Hierarchical indexing (HI; inference only, training-free, same indexer weights; LSA report defaults):
    # pages of lsa_hi_page_size tokens summarised by lsa_hi_block_size-token means of the index keys; a
    # query keeps its lsa_hi_top_pages best pages (sink and local pages forced, inside that budget) and
    # runs the token top-k over them, once it sees more than lsa_hi_min_len keys. Not released keys: off
    # unless asked (written to config.json only when they differ from these defaults).
    lsa_hi: bool = False
    lsa_hi_page_size: int = 128
    lsa_hi_block_size: int = 8
    lsa_hi_top_pages: int = 1024
    lsa_hi_min_len: int = 262144
    # MTP
    mtp_num_layers: int = 3  # draft steps
    mtp_replicate_modules: bool = True  # one physical block reused for every step
    mtp_disable_over_tokenizer: bool = True
    # bookkeeping
    hf_format: str = "longcat"
    torch_dtype: str = "bfloat16"

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_attention_sublayers(self) -> int:
        return 2 * self.num_layers

    @property
    def use_ngram(self) -> bool:
        return self.oe_split_num > 0

    @property
    def use_lsa(self) -> bool:
        return self.index_n_heads > 0

    @property
    def ngram_num_tables(self) -> int:
        return self.oe_split_num * (self.oe_neighbor_num - 1) if self.use_ngram else 0

    @property
    def ngram_table_dim(self) -> int:
        return self.hidden_size // self.ngram_num_tables if self.use_ngram else 0

    @property
    def ngram_base_rows(self) -> int:
        """m = floor(oe_vocab_size_ratio * vocab_size); table i has m + 2i + 1 rows."""
        return int(math.floor(self.oe_vocab_size_ratio * self.vocab_size)) if self.use_ngram else 0

    @property
    def num_mtp_modules(self) -> int:
        if self.mtp_num_layers == 0:
            return 0
        return 1 if self.mtp_replicate_modules else self.mtp_num_layers

    @property
    def yarn(self) -> dict[str, Any] | None:
        rs = self.rope_scaling
        if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
            return None
        return rs

    @property
    def lora_norm_eps(self) -> float:
        """The eps of MLA's q_a/kv_a RMSNorms: `mla_norm_eps`, or `rms_norm_eps` when that is None."""
        return self.rms_norm_eps if self.mla_norm_eps is None else self.mla_norm_eps

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under DeepSeek-YaRN."""
        scale = self.qk_head_dim**-0.5
        rs = self.yarn
        if rs and rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale = scale * m * m
        return scale

    # ------------------------------------------------------------------ validation
    def validate(self) -> ModelConfig:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {msg}")

        positive = [
            "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
            "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "max_position_embeddings",
        ]  # fmt: skip
        for key in positive:
            v = getattr(self, key)
            need(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                key,
                f"must be a positive int, got {v!r}",
            )
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even, got {self.qk_rope_head_dim}")
        need(
            self.hidden_act == "silu",
            "hidden_act",
            f"only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}",
        )
        need(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        need(
            self.mla_norm_eps is None or self.mla_norm_eps > 0,
            "mla_norm_eps",
            f"must be > 0 or null (= rms_norm_eps), got {self.mla_norm_eps}",
        )
        need(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        # MoE
        need(self.n_routed_experts >= 0, "n_routed_experts", f"must be >= 0, got {self.n_routed_experts}")
        need(self.zero_expert_num >= 0, "zero_expert_num", f"must be >= 0, got {self.zero_expert_num}")
        need(
            self.zero_expert_type == "identity",
            "zero_expert_type",
            f"only 'identity' is supported, got {self.zero_expert_type!r}",
        )
        n_exp = self.n_routed_experts + self.zero_expert_num
        need(n_exp > 0, "n_routed_experts", "n_routed_experts + zero_expert_num must be > 0")
        need(
            0 < self.moe_topk <= n_exp,
            "moe_topk",
            f"must be in 1..n_routed_experts+zero_expert_num ({n_exp}), got {self.moe_topk}",
        )
        need(self.expert_ffn_hidden_size > 0, "expert_ffn_hidden_size", "must be > 0")
        need(not self.norm_topk_prob, "norm_topk_prob", "LongCat routers do not renormalise; must be false")
        # RoPE scaling
        rs = self.yarn
        if rs is not None:
            rtype = rs.get("rope_type", rs.get("type"))
            need(
                rtype in ("deepseek_yarn", "yarn"),
                "rope_scaling.rope_type",
                f"supported: 'deepseek_yarn' / 'yarn', got {rtype!r}",
            )
            for k in ("factor", "original_max_position_embeddings"):
                need(k in rs, f"rope_scaling.{k}", "is required for YaRN")
            need(float(rs["factor"]) >= 1.0, "rope_scaling.factor", f"must be >= 1, got {rs['factor']}")
        # N-gram
        if self.use_ngram:
            need(self.oe_neighbor_num >= 2, "oe_neighbor_num", f"must be >= 2, got {self.oe_neighbor_num}")
            t = self.ngram_num_tables
            need(
                self.hidden_size % t == 0,
                "oe_split_num",
                f"hidden_size ({self.hidden_size}) must be divisible by oe_split_num*(oe_neighbor_num-1) ({t})",
            )
            need(self.oe_vocab_size_ratio > 0, "oe_vocab_size_ratio", "must be > 0")
            need(
                self.ngram_fusion in NGRAM_FUSIONS,
                "ngram_fusion",
                f"one of {NGRAM_FUSIONS}, got {self.ngram_fusion!r}",
            )
        # LSA
        if self.use_lsa:
            need(self.index_head_dim > 0, "index_head_dim", "must be > 0")
            need(
                self.index_head_dim >= self.qk_rope_head_dim,
                "index_head_dim",
                f"must be >= qk_rope_head_dim ({self.qk_rope_head_dim}), got {self.index_head_dim}",
            )
            need(self.index_topk > 0, "index_topk", f"must be > 0, got {self.index_topk}")
            need(self.index_init_tokens >= 0, "index_init_tokens", "must be >= 0")
            need(self.index_local_tokens >= 0, "index_local_tokens", "must be >= 0")
            need(
                self.index_init_tokens + self.index_local_tokens <= self.index_topk,
                "index_init_tokens",
                f"index_init_tokens + index_local_tokens must be <= index_topk "
                f"({self.index_init_tokens} + {self.index_local_tokens} > {self.index_topk})",
            )
            need(self.index_k_norm_type in INDEX_K_NORMS, "index_k_norm_type", f"one of {INDEX_K_NORMS}")
            need(
                self.cli_factor in (1, 2),
                "cli_factor",
                f"must be 1 (no sharing) or 2 (paired), got {self.cli_factor}",
            )
            need(self.index_query_chunk > 0, "index_query_chunk", "must be > 0")
            self._validate_hi(need)
        need(self.mtp_num_layers >= 0, "mtp_num_layers", "must be >= 0")
        need(self.hf_format in HF_FORMATS, "hf_format", f"one of {HF_FORMATS}, got {self.hf_format!r}")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, key)
            need(v is None or 0 <= v < self.vocab_size, key, f"must be in [0, vocab_size), got {v}")
        return self

    def hi_forced_pages_max(self) -> int:
        """Most pages HI forces for one query: the sink page(s) plus every page the local window touches."""
        p = self.lsa_hi_page_size
        return -(-self.index_init_tokens // p) + -(-self.index_local_tokens // p) + 1

    def _validate_hi(self, need: Any) -> None:
        for key in ("lsa_hi_page_size", "lsa_hi_block_size", "lsa_hi_top_pages", "lsa_hi_min_len"):
            v = getattr(self, key)
            need(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                key,
                f"must be a positive int, got {v!r}",
            )
        need(isinstance(self.lsa_hi, bool), "lsa_hi", f"must be true or false, got {self.lsa_hi!r}")
        need(
            self.lsa_hi_page_size % self.lsa_hi_block_size == 0,
            "lsa_hi_page_size",
            f"must be a multiple of lsa_hi_block_size ({self.lsa_hi_block_size}), got {self.lsa_hi_page_size}",
        )
        free = self.lsa_hi_top_pages - self.hi_forced_pages_max()
        kd = self.index_topk - self.index_init_tokens - self.index_local_tokens
        need(
            free > 0 and free * self.lsa_hi_page_size >= kd,
            "lsa_hi_top_pages",
            f"{self.lsa_hi_top_pages} pages leave {max(free, 0)} after the up to {self.hi_forced_pages_max()} "
            f"forced sink/local pages; they must hold the {kd} dynamically selected tokens",
        )

    def __post_init__(self) -> None:
        self.validate()

    def replace(self, **changes: Any) -> ModelConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0]}: not a ModelConfig field")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict[str, Any]) -> ModelConfig:
        """Read a released config.json (file, folder containing one, or dict)."""
        if isinstance(path_or_dict, dict):
            raw = dict(path_or_dict)
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            if not p.exists():
                raise ConfigError(f"config.json: no such file {p}")
            try:
                raw = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"config.json: not valid JSON ({p}: {e})") from e
            if not isinstance(raw, dict):
                raise ConfigError(f"config.json: expected a JSON object, got a JSON {_json_kind(raw)} ({p})")
        return cls(**_hf_to_fields(raw))

    def to_hf(self) -> dict[str, Any]:
        """The config.json for `hf_format` (what the released checkpoints and transformers read)."""
        return _fields_to_hf(self)


def parse_override(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' (VALUE parsed as JSON when it is JSON, else a string) → (key, value); for CLI flags."""
    import argparse

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------------- presets

_LONGCAT_2 = dict()  # the dataclass defaults are LongCat-2.0

_FLASH = dict(
    vocab_size=131072, hidden_size=6144, num_layers=28, num_attention_heads=64, ffn_hidden_size=12288,
    expert_ffn_hidden_size=2048, n_routed_experts=512, zero_expert_num=256, moe_topk=12,
    routed_scaling_factor=6.0, rope_theta=10_000_000.0, rope_scaling=None, max_position_embeddings=131072,
    oe_split_num=0, index_n_heads=0, mtp_num_layers=1, mla_norm_eps=1e-6, hf_format="longcat_flash",
)  # fmt: skip

_FLASH_LITE = dict(
    vocab_size=131072, hidden_size=3072, num_layers=14, num_attention_heads=32, ffn_hidden_size=6144,
    expert_ffn_hidden_size=1024, n_routed_experts=256, zero_expert_num=128, moe_topk=12,
    routed_scaling_factor=6.0, rope_theta=5_000_000.0,
    rope_scaling={"rope_type": "yarn", "factor": 10.0, "original_max_position_embeddings": 32768,
                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    max_position_embeddings=327680, oe_vocab_size_ratio=78.0, oe_neighbor_num=4, oe_split_num=4,
    ngram_fusion="mean", index_n_heads=0, mtp_num_layers=1, mla_norm_eps=1e-6, hf_format="longcat_flash_ngram",
)  # fmt: skip

# Tiny debug presets: same code paths, toy sizes; each runs a forward in well under a second on one core.
_TINY_COMMON = dict(
    vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
    expert_ffn_hidden_size=32, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, zero_expert_num=4, moe_topk=3, max_position_embeddings=4096,
    bos_token_id=1, eos_token_id=2, pad_token_id=3, torch_dtype="float32",
)  # fmt: skip

_TINY = dict(
    _TINY_COMMON, routed_scaling_factor=2.0, rope_theta=10000.0,
    rope_scaling={"rope_type": "deepseek_yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    oe_vocab_size_ratio=7.31, oe_neighbor_num=3, oe_split_num=2, ngram_fusion="mean",
    index_n_heads=4, index_head_dim=16, index_topk=64, index_init_tokens=4, index_local_tokens=16,
    mtp_num_layers=3, hf_format="longcat",
)  # fmt: skip

_TINY_FLASH = dict(
    _TINY_COMMON, routed_scaling_factor=2.0, rope_theta=10000.0, rope_scaling=None, oe_split_num=0,
    index_n_heads=0, mtp_num_layers=1, mla_norm_eps=1e-6, hf_format="longcat_flash",
)  # fmt: skip

_TINY_FLASH_LITE = dict(
    _TINY_COMMON, routed_scaling_factor=2.0, rope_theta=10000.0,
    rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048,
                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    hidden_size=48, oe_vocab_size_ratio=5.13, oe_neighbor_num=4, oe_split_num=2, ngram_fusion="mean", index_n_heads=0,
    mtp_num_layers=1, mla_norm_eps=1e-6, hf_format="longcat_flash_ngram",
)  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    "longcat-2.0": _LONGCAT_2,
    "longcat-flash": _FLASH,
    "longcat-flash-lite": _FLASH_LITE,
    "tiny": _TINY,
    "tiny-flash": _TINY_FLASH,
    "tiny-flash-lite": _TINY_FLASH_LITE,
}


# ---------------------------------------------------------------------- HF key mapping

_ARCH = {
    "longcat": "LongcatCausalLM",
    "longcat_flash": "LongcatFlashForCausalLM",
    "longcat_flash_ngram": "LongcatFlashNgramForCausalLM",
}
# Keys we read verbatim (same name in config.json and in ModelConfig).
_VERBATIM = [
    "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "expert_ffn_hidden_size",
    "hidden_act", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "mla_scale_q_lora", "mla_scale_kv_lora", "rope_theta", "max_position_embeddings", "n_routed_experts",
    "zero_expert_num", "zero_expert_type", "moe_topk", "routed_scaling_factor", "norm_topk_prob", "router_bias",
    "oe_vocab_size_ratio", "oe_neighbor_num", "oe_split_num", "index_n_heads", "index_head_dim", "index_topk",
    "index_init_tokens", "index_local_tokens", "index_k_norm_type", "indexer_rope_interleave", "cli_factor",
    "dsa_mtp_cli", "mtp_num_layers", "mtp_replicate_modules", "mtp_disable_over_tokenizer", "ngram_fusion",
    "mla_norm_eps", "lsa_hi", "lsa_hi_page_size", "lsa_hi_block_size", "lsa_hi_top_pages", "lsa_hi_min_len",
    "torch_dtype",
]  # fmt: skip
HI_KEYS = ("lsa_hi", "lsa_hi_page_size", "lsa_hi_block_size", "lsa_hi_top_pages", "lsa_hi_min_len")
INFERENCE_KEYS = (*HI_KEYS, "index_query_chunk")  # what `--override` may change on a loaded model


def with_inference_overrides(
    cfg: ModelConfig, overrides: dict[str, Any] | list[tuple[str, Any]] | None
) -> ModelConfig:
    """`cfg` with inference-only fields replaced (HI settings; weights and shapes are untouched), validated.
    Raises ConfigError naming a key that is not one of INFERENCE_KEYS."""
    changes = dict(overrides or {})
    for key in changes:
        if key not in INFERENCE_KEYS:
            raise ConfigError(
                f"{key}: not an inference-time setting; --override takes {', '.join(INFERENCE_KEYS)}"
            )
    return cfg.replace(**changes) if changes else cfg


_INT_KEYS = {f.name for f in dataclasses.fields(ModelConfig) if f.type in ("int", "int | None")}
_FLOAT_KEYS = {f.name for f in dataclasses.fields(ModelConfig) if f.type in ("float", "float | None")}
_NOT_NULL = {
    **{f.name: "an integer" for f in dataclasses.fields(ModelConfig) if f.type == "int"},
    **{f.name: "a number" for f in dataclasses.fields(ModelConfig) if f.type == "float"},
}


def _json_kind(v: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def _detect_format(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    mt = raw.get("model_type")
    if "LongcatFlashNgramForCausalLM" in archs or mt == "longcat_flash_ngram":
        return "longcat_flash_ngram"
    if "LongcatCausalLM" in archs or any(k.startswith(("oe_", "index_")) for k in raw):
        return "longcat"
    if "LongcatFlashForCausalLM" in archs or mt == "longcat_flash":
        return "longcat_flash"
    raise ConfigError(
        f"architectures: not a LongCat config (architectures={archs!r}, model_type={mt!r}); expected one of "
        f"{sorted(_ARCH.values())}"
    )


def _hf_to_fields(raw: dict[str, Any]) -> dict[str, Any]:
    fmt = _detect_format(raw)
    # Missing keys fall back to the format's family defaults, not to LongCat-2.0's.
    base = {"longcat": _LONGCAT_2, "longcat_flash": _FLASH, "longcat_flash_ngram": _FLASH_LITE}[fmt]
    out: dict[str, Any] = {**base, "hf_format": fmt}
    if "num_layers" not in raw and "num_hidden_layers" in raw:
        raw["num_layers"] = raw["num_hidden_layers"] // 2 if fmt != "longcat" else raw["num_hidden_layers"]
    if fmt == "longcat_flash_ngram":
        for src, dst in (
            ("ngram_vocab_size_ratio", "oe_vocab_size_ratio"),
            ("emb_neighbor_num", "oe_neighbor_num"),
            ("emb_split_num", "oe_split_num"),
        ):
            if src in raw:
                out[dst] = raw[src]
    for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads"):
        if key not in raw:
            raise ConfigError(f"{key}: required key missing from config.json")
    nullable = ("bos_token_id", "eos_token_id", "pad_token_id")
    for key in _VERBATIM:  # null where a number is needed is an error, not "use the default"
        if raw.get(key, 0) is None and key in _NOT_NULL:
            raise ConfigError(f"{key}: null in config.json; expected {_NOT_NULL[key]}")
    for key in _VERBATIM:
        if key in raw and (raw[key] is not None or key in nullable):
            out[key] = raw[key]
    if isinstance(out.get("eos_token_id"), list):
        out["eos_token_id"] = out["eos_token_id"][0]
    # transformers 5.x writes rope_parameters (incl. rope_theta); released checkpoints write rope_scaling.
    rope = raw.get("rope_scaling")
    if rope is None and isinstance(raw.get("rope_parameters"), dict):
        rp = dict(raw["rope_parameters"])
        if "rope_theta" in rp:
            out["rope_theta"] = rp.pop("rope_theta")
        rope = rp if rp.get("rope_type", "default") != "default" else None
    if "rope_scaling" in raw or "rope_parameters" in raw:
        out["rope_scaling"] = dict(rope) if rope else None
    if out.get("rope_scaling") and "type" in out["rope_scaling"] and "rope_type" not in out["rope_scaling"]:
        out["rope_scaling"]["rope_type"] = out["rope_scaling"].pop("type")
    if fmt != "longcat":
        out["index_n_heads"] = 0
    if fmt == "longcat_flash":
        out["oe_split_num"] = 0
    if raw.get("num_nextn_predict_layers") is not None and "mtp_num_layers" not in raw:
        out["mtp_num_layers"] = raw["num_nextn_predict_layers"]
    # type coercion with named errors (e.g. routed_scaling_factor is an int 9 in the 2.0 JSON)
    for key, v in list(out.items()):
        if key in _FLOAT_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
        elif key in _FLOAT_KEYS and v is not None and not isinstance(v, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {v!r}")
        elif key in _INT_KEYS and v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
                raise ConfigError(f"{key}: expected an integer, got {v!r}")
            out[key] = int(v)
    dtype = out.get("torch_dtype") or raw.get("dtype")
    out["torch_dtype"] = str(dtype) if dtype else "bfloat16"
    return out


def _fields_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    fmt = cfg.hf_format
    d: dict[str, Any] = {"architectures": [_ARCH[fmt]]}
    common = [
        "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
        "expert_ffn_hidden_size", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
        "eos_token_id", "pad_token_id", "initializer_range", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "mla_scale_q_lora", "mla_scale_kv_lora", "rope_theta",
        "max_position_embeddings", "n_routed_experts", "zero_expert_num", "zero_expert_type", "moe_topk",
        "routed_scaling_factor", "norm_topk_prob", "router_bias", "mtp_num_layers", "torch_dtype",
    ]  # fmt: skip
    for k in common:
        d[k] = getattr(cfg, k)
    rs = cfg.yarn
    if fmt == "longcat":
        d["model_type"] = None
        d["attention_method"] = "MLA"
        d["use_mla"] = 1
        d["rope_scaling"] = dict(rs) if rs else None
        if isinstance(d["routed_scaling_factor"], float) and d["routed_scaling_factor"].is_integer():
            d["routed_scaling_factor"] = int(d["routed_scaling_factor"])  # the released JSON writes 9
        for k in (
            "oe_vocab_size_ratio", "oe_neighbor_num", "oe_split_num", "ngram_fusion", "index_n_heads",
            "index_head_dim", "index_topk", "index_init_tokens", "index_local_tokens", "index_k_norm_type",
            "indexer_rope_interleave", "cli_factor", "dsa_mtp_cli", "mtp_replicate_modules",
            "mtp_disable_over_tokenizer",
        ):  # fmt: skip
            d[k] = getattr(cfg, k)
        if cfg.mla_norm_eps is not None:  # not a released key: written only when it overrides rms_norm_eps
            d["mla_norm_eps"] = cfg.mla_norm_eps
        defaults = ModelConfig.__dataclass_fields__
        for k in HI_KEYS:  # not released keys either: written only when they differ from the defaults
            if getattr(cfg, k) != defaults[k].default:
                d[k] = getattr(cfg, k)
    else:
        # transformers 5.x reads rope_parameters (theta inside) and knows YaRN as "yarn"
        d["model_type"] = fmt
        d["num_hidden_layers"] = 2 * cfg.num_layers
        rp: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if rs:
            rp = {**rs, "rope_type": "yarn", "rope_theta": cfg.rope_theta}
        d["rope_parameters"] = rp
        d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"} if rs else None
        d["num_key_value_heads"] = cfg.num_attention_heads
        d["head_dim"] = cfg.qk_rope_head_dim
        d["qk_head_dim"] = cfg.qk_head_dim
        if fmt == "longcat_flash_ngram":
            d["ngram_vocab_size_ratio"] = cfg.oe_vocab_size_ratio
            d["emb_neighbor_num"] = cfg.oe_neighbor_num
            d["emb_split_num"] = cfg.oe_split_num
            d["ngram_fusion"] = cfg.ngram_fusion
    return d
