"""Capacity planner for LongCat-scale training and serving (`longcat2 plan`).

Design choices:
- Pure arithmetic on a `ModelConfig` (no torch import): `model_math` counts parameters, FLOPs and cache bytes
  exactly from the config, with the conventions of longcat_spec.md §6 (MTP excluded from total/active, input
  embedding rows and n-gram tables not active, lm_head active, zero experts parameter-free). A test checks the
  count against the instantiated model for every tiny preset.
- `cluster` turns a layout (TP, PP, EP, CP, DP, EMBP, ZeRO-1, recompute) plus a hardware file into per-chip memory,
  per-step communication, step time, MFU and days; and a deployment into cache sizes, decode bytes (dense vs LSA),
  concurrency and a bandwidth floor. It is a first-order model: every efficiency and overlap factor is a named
  `Assumptions` field, printed with the plan and overridable (`--assume KEY=VALUE`).
- Rank order is TP (fastest), CP, DP, PP (slowest); experts use expert-TP 1 with EP carved from the TP×CP×DP ranks
  of a stage (Megatron-Core convention). Collectives are costed hierarchically (scale-up domain first).
- Hardware lives in small JSON files (`longcat2/hardware/*.json`, each citing its spec sheet); YAML is accepted
  when pyyaml happens to be installed. Errors are `PlanError` with the offending field first, like ConfigError.
"""

from __future__ import annotations

from .cli import build_plan, render
from .cluster import (
    Assumptions,
    Hardware,
    Layout,
    PlanError,
    ServeWorkload,
    TrainWorkload,
    list_hardware,
    load_hardware,
    plan_serving,
    plan_training,
    search_layouts,
    validate_layout,
)
from .model_math import (
    count_parameters,
    decode_bytes_per_step,
    flops_per_token,
    indexer_cache_bytes_per_token,
    kv_cache_bytes_per_token,
    mtp_cache_bytes_per_token,
)

__all__ = [
    "Assumptions", "Hardware", "Layout", "PlanError", "ServeWorkload", "TrainWorkload", "build_plan",
    "count_parameters", "decode_bytes_per_step", "flops_per_token", "indexer_cache_bytes_per_token",
    "kv_cache_bytes_per_token", "list_hardware", "load_hardware", "mtp_cache_bytes_per_token", "plan_serving",
    "plan_training", "render", "search_layouts", "validate_layout",
]  # fmt: skip
