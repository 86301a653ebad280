"""`plan --serve`: the TP / EP layout `longcat2 serve --tp T --ep E` would use and its per-device memory.

Design choices:
- Per-rank weight bytes come from the real sharding, not a formula: the model is built on the meta device
  and sharded by `longcat2.parallel.inference.parallelize_for_inference` for the rank, then each parameter
  is counted at the bytes it will be resident in: FP8 (1 B + fp32 128×128 block scales covering the
  rank's slice) for the weights our FP8 export quantises and the loader keeps FP8
  (`longcat2.model.fp8.resident_fp8`; kv_b_proj is dequantised for absorbed MLA), fp32 for the router,
  the serving dtype for the rest. So plan and measured per-rank bytes agree by construction on any model
  (tests compare them on tiny).
- Caches per device: MLA latents and index keys are replicated over the tensor-parallel ranks (every
  head needs the whole latent), so each device holds the whole cache of the sequences it serves: the
  context a device can hold is (usable HBM − its weights) / (KV + index + MTP cache bytes per token).
- Default layout: TP = EP = chips, on the same ranks (the reference deployment: TP16 + EP16 on 16 GPUs).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from longcat2.config import ModelConfig

from . import model_math as mm
from .cluster import PlanError


def sharded_meta_model(cfg: ModelConfig, tp: int, ep: int, rank: int = 0) -> torch.nn.Module:
    """The model on meta, sharded as `longcat2 serve --tp tp --ep ep` shards it for `rank`."""
    from longcat2.model.longcat import LongCatForCausalLM
    from longcat2.parallel.inference import InferenceLayout, parallelize_for_inference, validate_layout

    world = tp * ep if tp != ep else tp
    try:
        validate_layout(world, tp, ep)
    except ValueError as e:
        raise PlanError(str(e)) from e
    with torch.device("meta"):
        model = LongCatForCausalLM(cfg)
    try:
        parallelize_for_inference(model, InferenceLayout(rank=rank, world_size=world, tp=tp, ep=ep))
    except ValueError as e:
        raise PlanError(str(e)) from e
    return model


def rank_weight_bytes(model: torch.nn.Module, fp8: bool = True, dtype_bytes: int = 2) -> dict[str, int]:
    """Resident parameter bytes of a (sharded) meta model when loaded FP8-resident or not."""
    from longcat2.model.fp8 import resident_bytes

    return resident_bytes(model, fp8=fp8, dtype_bytes=dtype_bytes)


def plan_serve_layout(
    cfg: ModelConfig,
    hbm_bytes: float,
    usable_fraction: float,
    chips: int,
    tp: int = 0,
    ep: int = 0,
    kv_bytes: int = 2,
    index_bytes: int = 1,
) -> dict[str, Any]:
    """Per-device weights (FP8-resident and bf16) and cache capacity for TP × EP serving on `chips`."""
    if chips < 1:
        raise PlanError(f"chips: must be >= 1, got {chips}")
    if not tp and not ep:  # TP = EP = chips when the model splits that far, else TP over the heads × EP
        tp = chips if cfg.num_attention_heads % chips == 0 else math.gcd(chips, cfg.num_attention_heads)
        ep = chips if tp == chips else chips // tp
    tp, ep = tp or chips // ep, ep or chips // tp
    usable = hbm_bytes * usable_fraction
    per_token = mm.kv_cache_bytes_per_token(cfg, kv_bytes) + mm.mtp_cache_bytes_per_token(
        cfg, kv_bytes, index_bytes
    )
    if cfg.use_lsa:
        per_token += mm.indexer_cache_bytes_per_token(cfg, index_bytes)
    out: dict[str, Any] = {"chips": chips, "tp": tp, "ep": ep, "usable_bytes_per_device": usable,
                           "cache_bytes_per_token_per_device": per_token, "weights": {}}  # fmt: skip
    try:
        model = sharded_meta_model(cfg, tp, ep, 0)
    except PlanError as e:
        return {**out, "error": str(e)}
    for label, fp8 in (("fp8", True), ("bf16", False)):
        w = rank_weight_bytes(model, fp8=fp8)
        free = usable - w["total"]
        out["weights"][label] = {
            "bytes_per_device": w["total"],
            "fits": free > 0,
            "cache_tokens_per_device": max(0, int(free // per_token)),
            **({"float8": w["float8"], "float8_scales": w["float8_scales"]} if fp8 else {}),
        }
    return out


def render_serve_layout(s: dict[str, Any]) -> list[str]:
    gb = 1e9
    if "error" in s:
        return [f"== serving layout tp {s['tp']} x ep {s['ep']} on {s['chips']} chips: {s['error']}", ""]
    lines = [
        f"== serving layout (longcat2 serve --tp {s['tp']} --ep {s['ep']} on {s['chips']} chips: attention heads, "
        "dense FFNs, vocab over tp; routed experts over ep; latent + index caches replicated) ==",
        f"  usable memory per device {s['usable_bytes_per_device'] / gb:.1f} GB; caches "
        f"{s['cache_bytes_per_token_per_device']:,} B per token on every device",
    ]
    for label, w in s["weights"].items():
        verdict = (
            f"fits, {w['cache_tokens_per_device']:,} cached tokens per device"
            if w["fits"]
            else "does NOT fit"
        )
        lines.append(f"  weights {label:>4}: {w['bytes_per_device'] / gb:7.1f} GB per device -> {verdict}")
    return [*lines, ""]
