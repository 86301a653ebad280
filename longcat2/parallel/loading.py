"""Load a HF checkpoint straight into one rank's shard: meta model, `get_slice` reads, tensor by tensor.

Design choices:
- The model is built on the meta device and sharded there (`parallelize_for_inference` only changes
  shapes and records `shard_specs`); then the checkpoint's keys are walked in file order (one shard file
  mapped at a time, as `longcat2.hf_checkpoint` does) and each tensor this rank needs is read with
  `safe_open(...).get_slice(key)[rows or columns]`: only the bytes of the rank's slice are copied out of
  the mapped file. Routed experts outside the rank's block are never opened; a stacked expert tensor is
  allocated once (local experts only) and filled expert by expert. Peak host memory is the rank's share
  plus one tensor slice and the mapped pages of the current file.
- Key names, the N-gram spellings, the fp32 router and the FP8 companions follow `longcat2.hf_checkpoint`
  (its key map and readers are reused). FP8 weights (`weight_scale_inv`, 128×128 blocks): with
  `fp8="dequantize"` the slice's covering scale blocks are read and the slice is dequantised; with
  `fp8="keep"` (see model/fp8.py) quantised linears stay float8 with their block scales.
- Strict: a parameter of this rank's model that no checkpoint tensor fills is an error naming it; an
  entirely absent MTP head (transformers drops it) keeps a fresh initialisation, as in the 1-process loader.
- `LoadStats` reports what was read: tensors, bytes copied out of the files, and the peak RSS growth
  while loading (ru_maxrss, Linux KiB), so the CLIs can print per-rank numbers.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from longcat2.config import ModelConfig
from longcat2.hf_checkpoint import (
    _FP32_PARAMS,
    _SCALE_SUFFIX,
    CheckpointError,
    _block_size,
    _build_on_meta,
    _hf_key_to_ours,
    _init_fresh,
    _resolve_dtype,
    _ShardReader,
    _Slots,
    _weight_files,
)
from longcat2.model.fp8 import dequantize, fp8_targets, install_fp8
from longcat2.parallel.inference import InferenceLayout, parallelize_for_inference


@dataclass
class LoadStats:
    tensors: int = 0
    bytes_read: int = 0
    rss_before_kib: int = 0
    rss_peak_kib: int = 0

    @property
    def peak_rss_growth(self) -> int:
        """Bytes of peak resident memory added while loading."""
        return max(0, self.rss_peak_kib - self.rss_before_kib) * 1024


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rows_cols(spec: tuple[int, int, int] | None, shape: list[int]) -> tuple[slice, slice]:
    rows, cols = slice(0, shape[0]), slice(0, shape[1] if len(shape) > 1 else 1)
    if spec is not None:
        dim, start, stop = spec
        if dim == 0:
            rows = slice(start, stop)
        else:
            cols = slice(start, stop)
    return rows, cols


def read_fp8_slice(
    shards: _ShardReader, key: str, rows: slice, cols: slice, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """A float8 weight's [rows, cols] slice and the block scales covering it, with the slice's offset inside
    its first block (0, 0 when the slice is block-aligned)."""
    br, bc = block
    w = shards.tensor(key, lambda h: h.get_slice(key)[rows, cols])
    sk = key + _SCALE_SUFFIX
    r0, r1 = rows.start // br, math.ceil(rows.stop / br)
    c0, c1 = cols.start // bc, math.ceil(cols.stop / bc)
    s = shards.tensor(sk, lambda h: h.get_slice(sk)[r0:r1, c0:c1])
    return w, s, (rows.start - r0 * br, cols.start - c0 * bc)


def load_for_inference(
    cls: type[nn.Module],
    path: str | Path,
    layout: InferenceLayout,
    dtype: torch.dtype | str | None = None,
    fp8: str = "dequantize",
) -> tuple[nn.Module, LoadStats]:
    """Build `cls` on meta, shard it for `layout`, read this rank's slices of `path`. → (model, stats)."""
    if fp8 not in ("dequantize", "keep"):
        raise ValueError(f"fp8: 'dequantize' or 'keep', got {fp8!r}")
    stats = LoadStats(rss_before_kib=_maxrss_kib())
    path = Path(path)
    cfg = ModelConfig.from_hf(path)
    target = _resolve_dtype(dtype, cfg)
    dev = layout.device
    block = _block_size(path)
    files, weight_map = _weight_files(path)
    model = _build_on_meta(cls, cfg)
    parallelize_for_inference(model, layout)
    specs: dict[str, tuple[int, int, int]] = model.shard_specs
    keep_fp8: set[str] = set()
    if fp8 == "keep":
        keep_fp8 = fp8_targets(model, files, weight_map)
    slots = _Slots(model)
    expert_ranges = {n: (s[1], s[2]) for n, s in specs.items() if ".experts." in n}
    stacked: dict[str, tuple] = {}  # name → (destination, experts filled, FP8 scales or None)
    loaded: set[str] = set()
    fp8_parts: dict[str, tuple] = {}  # name → (float8 weight, block scales, offset) kept FP8

    def dt_for(name: str, current: torch.Tensor) -> torch.dtype:
        if not slots.is_param[name]:
            return current.dtype
        return torch.float32 if _FP32_PARAMS.search(name) and target.itemsize < 4 else target

    shards = _ShardReader(files, weight_map)

    def read(key: str, ours: str, full_shape: list[int], spec):
        """This rank's slice as a tensor, or (float8, scales, offset) for a weight kept FP8."""
        rows, cols = _rows_cols(spec, full_shape)
        scale_key = key + _SCALE_SUFFIX
        if scale_key in shards.where:
            w, s, off = read_fp8_slice(shards, key, rows, cols, block)
            stats.bytes_read += w.numel() * w.element_size() + s.numel() * s.element_size()
            if ours in keep_fp8:
                return w, s.float(), off
            return dequantize(w, s, off, block)
        if len(full_shape) == 1:
            t = shards.tensor(key, lambda h: h.get_slice(key)[rows])
        else:
            t = shards.tensor(key, lambda h: h.get_slice(key)[rows, cols])
        stats.bytes_read += t.numel() * t.element_size()
        return t

    try:
        for key in shards.where:
            if key.endswith(_SCALE_SUFFIX):
                continue
            ours, expert = _hf_key_to_ours(key)
            if ours not in slots.owners or ours in slots.tied:
                continue  # not this model's (zero-expert / MTP extras; see checkpoint.py) or a tied alias
            current = slots.current(ours)
            full_shape = list(shards.tensor(key, lambda h, k=key: h.get_slice(k).get_shape()))
            dt = dt_for(ours, current)
            if expert is None:
                spec = specs.get(ours)
                want = list(current.shape)
                t = read(key, ours, full_shape, spec)
                got = list((t[0] if isinstance(t, tuple) else t).shape)
                if got != want:
                    raise CheckpointError(f"{key}: slice shape {got} != this rank's {want}")
                if isinstance(t, tuple):
                    fp8_parts[ours] = (t[0].to(dev), t[1].to(dev), t[2])
                else:
                    slots.assign(ours, t.to(device=dev, dtype=dt))
                loaded.add(ours)
                stats.tensors += 1
                continue
            lo, hi = expert_ranges.get(ours, (0, current.shape[0]))
            if not lo <= expert < hi:
                continue  # another rank's expert (or a zero expert's tensor): never read
            t = read(key, ours, full_shape, None)
            w = t[0] if isinstance(t, tuple) else t
            if list(w.shape) != list(current.shape[1:]):
                raise CheckpointError(f"{key}: shape {list(w.shape)} != expected {list(current.shape[1:])}")
            if ours not in stacked:  # allocated once: this rank's experts only
                wdt = w.dtype if isinstance(t, tuple) else dt
                scales = torch.empty((hi - lo, *t[1].shape), device=dev) if isinstance(t, tuple) else None
                stacked[ours] = (torch.empty(current.shape, dtype=wdt, device=dev), set(), scales)
            dest, filled, scales = stacked[ours]
            dest[expert - lo].copy_(w)
            if scales is not None:
                scales[expert - lo].copy_(t[1])
            filled.add(expert)
            stats.tensors += 1
            if len(filled) == hi - lo:
                if scales is not None:
                    fp8_parts[ours] = (dest, scales, (0, 0))
                else:
                    slots.assign(ours, dest)
                loaded.add(ours)
                del stacked[ours]
    finally:
        shards.close()
    missing = [n for n in slots.owners if n not in loaded and slots.is_param[n]]
    mtp_absent = all(n.startswith("model.mtp.") for n in missing) and not any(
        n.startswith("model.mtp.") for n in loaded
    )
    if missing and not mtp_absent:
        shown = "; ".join(missing[:10]) + (f"; ... ({len(missing)} total)" if len(missing) > 10 else "")
        raise CheckpointError(f"missing {shown} (checkpoint {path}, rank {layout.rank})")
    for name in missing:
        current = slots.current(name)
        slots.assign(name, torch.empty(current.shape, dtype=dt_for(name, current), device=dev))
    if missing:
        _init_fresh(model, missing)
    if fp8_parts:
        install_fp8(model, fp8_parts, block)
    model.to(dev)
    model.eval()
    stats.rss_peak_kib = _maxrss_kib()
    return model, stats


def load_summary(model: nn.Module, stats: LoadStats, layout: InferenceLayout) -> str:
    """One line per rank: resident parameter bytes (sharded / replicated), bytes read, peak RSS growth."""
    from longcat2.parallel.inference import parameter_bytes

    b = parameter_bytes(model)
    mib = 1 << 20
    return (
        f"rank {layout.rank}/{layout.world_size} (tp {layout.tp_rank}/{layout.tp}, ep {layout.ep_rank}/{layout.ep}): "
        f"parameters {b['total'] / mib:.2f} MiB resident ({b['sharded'] / mib:.2f} MiB sharded, "
        f"{b['replicated'] / mib:.2f} MiB replicated); read {stats.bytes_read / mib:.2f} MiB in "
        f"{stats.tensors} tensors; peak RSS growth while loading {stats.peak_rss_growth / mib:.1f} MiB"
    )
