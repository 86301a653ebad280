"""FP8 weights kept FP8: block quantisation, the exporter of the released layout, FP8 linear and experts.

Design choices:
- Format = the released LongCat-2.0-FP8 (DeepSeek-V3 style): float8_e4m3fn weights, one fp32
  `<name>.weight_scale_inv` per 128×128 block (W ≈ w_fp8 · scale_inv, edge blocks trimmed), and in
  config.json `quantization_config = {quant_method: "fp8", fmt: "e4m3", activation_scheme: "dynamic",
  weight_block_size: [128, 128], ignored_layers: [...]}`. Quantised: the MLA projections, dense FFNs,
  routed experts and the MTP block's linears; left high precision (listed in `ignored_layers` when they are
  linears): norms, router, indexer, N-gram tables and projections, embeddings, lm_head (the spec's list).
- `FP8Linear` holds the float8 weight, its covering block scales and the offset of its first row/column
  inside the first block (a tensor-parallel slice need not start on a block edge). Compute:
  * `torch.nn.functional.scaled_mm` with 1×128 activation blocks and 128×128 weight blocks on a CUDA device
    of compute capability >= 9.0 when the slice is block-aligned (activations quantised on the fly);
    NOT verified on real hardware (no GPU was available); `LONGCAT2_FP8_SCALED_MM=0` turns it off.
  * elsewhere (CPU, any other device): blockwise dequantisation, one block row (128 output rows) at a time
    into a small reusable buffer [128, in] in the activation dtype, then a GEMM into that row range.
- kv_b_proj is never kept FP8: absorbed MLA reads its weight per head (as SGLang, which dequantises it into
  w_kc / w_vc at load); the loader dequantises it.
- Load in the dtype you want for the high-precision parts (`load_for_inference(dtype=...)`): a later
  `model.to(dtype)` / `.float()` also converts float8 parameters (torch treats them as floating point).
- Experts: `FP8Experts` keeps [E, out, in] float8 + [E, ⌈out/128⌉, ⌈in/128⌉] scales and dequantises one
  expert's matrix at a time into a reusable buffer for the rows routed to it (`ExpertShard` semantics:
  this rank's expert block, results all-reduced over the ep group when sharded).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"
# linears left in high precision (spec: norms / router / indexer / embeddings; plus lm_head, kv_b_proj for MLA)
_KEEP_HIGH = ("mlp.router.", ".indexer.", "ngram_embeddings.", "oe_embed", "lm_head", "embed_tokens")


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] → (float8_e4m3fn [out, in], scale_inv fp32 [⌈out/br⌉, ⌈in/bc⌉]) with w ≈ q · scale_inv."""
    out_f, in_f = w.shape
    br, bc = block
    rows, cols = math.ceil(out_f / br), math.ceil(in_f / bc)
    padded = F.pad(w.float(), (0, cols * bc - in_f, 0, rows * br - out_f))
    tiles = padded.view(rows, br, cols, bc)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [rows, cols]
    scale = amax / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(rows * br, cols * bc)[:out_f, :in_f].contiguous(), scale


def _expand_scale(
    scale: torch.Tensor, offset: tuple[int, int], shape: tuple[int, int], block
) -> torch.Tensor:
    br, bc = block
    s = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return s[offset[0] : offset[0] + shape[0], offset[1] : offset[1] + shape[1]]


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset=(0, 0), block=BLOCK, dtype=torch.float32):
    return (q.float() * _expand_scale(scale.float(), offset, tuple(q.shape), block)).to(dtype)


def resident_fp8(name: str, shape: tuple[int, ...]) -> bool:
    """Whether our parameter `name` is FP8-resident when loaded from our export (the planner's rule; the
    loader decides from the checkpoint's scale tensors, which our exporter writes by the same rule)."""
    if name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
        return True
    if len(shape) != 2 or not name.endswith(".weight") or "norm" in name or "kv_b_proj" in name:
        return False
    return not any(k in name for k in _KEEP_HIGH)


def _scale_blocks(shape: tuple[int, ...], spec: tuple[int, int, int] | None) -> int:
    """fp32 block scales held for an FP8 weight (the blocks covering a tensor-parallel slice)."""
    br, bc = BLOCK
    if len(shape) == 3:  # stacked experts [E_local, out, in]: whole experts
        return shape[0] * math.ceil(shape[1] / br) * math.ceil(shape[2] / bc)
    counts = [math.ceil(shape[0] / br), math.ceil(shape[1] / bc)]
    if spec is not None:
        dim, start, stop = spec
        counts[dim] = math.ceil(stop / BLOCK[dim]) - start // BLOCK[dim]
    return counts[0] * counts[1]


def resident_bytes(model: nn.Module, fp8: bool = True, dtype_bytes: int = 2) -> dict[str, int]:
    """Parameter bytes `model` (real or meta, sharded or not: `shard_specs`) holds once loaded from our FP8
    export FP8-resident (`fp8=True`) or from a high-precision checkpoint; the router is fp32, the rest
    `dtype_bytes`. What `longcat2 info` and `plan --serve` report."""
    specs = getattr(model, "shard_specs", {})
    out = {"total": 0, "float8": 0, "float8_scales": 0, "high_precision": 0}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if fp8 and resident_fp8(name, shape):
            scales = 4 * _scale_blocks(shape, specs.get(name))
            out["float8"] += p.numel()
            out["float8_scales"] += scales
            out["total"] += p.numel() + scales
            continue
        b = p.numel() * (4 if ".mlp.router.classifier." in name else dtype_bytes)
        out["high_precision"] += b
        out["total"] += b
    return out


def _scaled_mm_ok(x: torch.Tensor, lin: FP8Linear) -> bool:
    if os.environ.get("LONGCAT2_FP8_SCALED_MM", "1") == "0" or x.device.type != "cuda":
        return False
    if not hasattr(F, "scaled_mm") or torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    return lin.offset == (0, 0) and all(d % 128 == 0 for d in lin.weight.shape) and lin.block == BLOCK


class FP8Linear(nn.Module):
    """y = x · dequant(w)ᵀ with w float8 [out, in] and 128×128 block scales (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, offset=(0, 0), block=BLOCK) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(scale.float(), requires_grad=False)
        self.offset, self.block = tuple(offset), tuple(block)
        self.out_features, self.in_features = weight.shape
        self._buf: torch.Tensor | None = None

    def _buffer(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        rows = min(self.block[0], self.out_features)
        if self._buf is None or self._buf.dtype != dtype or self._buf.device != device:
            self._buf = torch.empty(rows, self.in_features, dtype=dtype, device=device)
        return self._buf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _scaled_mm_ok(x, self):
            return self._scaled_mm(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, in]
        out = x2.new_empty(x2.shape[0], self.out_features)
        buf = self._buffer(x.dtype, x.device)
        br, bc = self.block
        r0, c0 = self.offset
        scale_cols = self.weight_scale_inv.repeat_interleave(bc, 1)[:, c0 : c0 + self.in_features]  # [R, in]
        start = 0
        while start < self.out_features:  # one block row of the full tensor at a time
            row_in_full = r0 + start
            stop = min(self.out_features, start + br - row_in_full % br)
            n = stop - start
            s = scale_cols[row_in_full // br]  # [in]
            torch.mul(self.weight[start:stop].to(x.dtype), s.to(x.dtype), out=buf[:n])
            torch.matmul(x2, buf[:n].t(), out=out[:, start:stop])
            start = stop
        return out.view(*shape[:-1], self.out_features)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - needs an sm90+ GPU
        from torch.nn.functional import ScalingType

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        m, k = x2.shape
        groups = x2.float().view(m, k // 128, 128)
        sa = groups.abs().amax(-1).clamp(min=1e-12) / FP8_MAX  # [M, K/128]
        xq = (groups / sa[..., None]).to(FP8_DTYPE).view(m, k)
        y = F.scaled_mm(
            xq,
            self.weight.t(),
            sa.t().contiguous().t(),  # outer-dim-major scales, as the blockwise kernels expect
            ScalingType.BlockWise1x128,
            self.weight_scale_inv,
            ScalingType.BlockWise128x128,
            output_dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16,
        )
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class FP8Experts(nn.Module):
    """Routed experts [lo, hi) of `num_experts` with float8 weights; the `Experts` call signature."""

    def __init__(self, num_experts: int, lo: int, hi: int, group, weights: dict, block=BLOCK) -> None:
        super().__init__()
        self.num_experts, self.lo, self.hi, self.group, self.block = num_experts, lo, hi, group, tuple(block)
        for proj, (w, s) in weights.items():
            setattr(self, proj, nn.Parameter(w, requires_grad=False))
            setattr(self, proj + SCALE_SUFFIX, nn.Parameter(s.float(), requires_grad=False))
        self._bufs: dict[str, torch.Tensor] = {}

    def _weight(self, proj: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        w, s = getattr(self, proj)[e], getattr(self, proj + SCALE_SUFFIX)[e]
        buf = self._bufs.get(proj)
        if buf is None or buf.dtype != dtype or buf.device != w.device:
            buf = self._bufs[proj] = torch.empty(w.shape, dtype=dtype, device=w.device)
        torch.mul(w.to(dtype), _expand_scale(s, (0, 0), tuple(w.shape), self.block).to(dtype), out=buf)
        return buf

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, H] grouped by expert (counts [E]) → [M, H]."""
        bounds = [0, *counts.cumsum(0).tolist()]
        out = x_sorted.new_zeros(x_sorted.shape)
        for e in range(self.lo, self.hi):
            a, b = bounds[e], bounds[e + 1]
            if b <= a:
                continue
            x = x_sorted[a:b]
            g = x @ self._weight("gate_proj", e - self.lo, x.dtype).t()
            u = x @ self._weight("up_proj", e - self.lo, x.dtype).t()
            out[a:b] = (F.silu(g) * u) @ self._weight("down_proj", e - self.lo, x.dtype).t()
        if self.group is not None:
            dist.all_reduce(out, group=self.group)
        return out


# ---------------------------------------------------------------------- loading
def fp8_targets(model: nn.Module, files: list[Path], weight_map: dict[str, str] | None) -> set[str]:
    """Our parameter names whose checkpoint tensors carry block scales (kept FP8 by the loader)."""
    keys: set[str] = set(weight_map) if weight_map is not None else set()
    if weight_map is None:
        with safe_open(str(files[0]), framework="pt") as f:
            keys = set(f.keys())
    out = set()
    for name, _ in model.named_parameters():
        if "kv_b_proj" in name:
            continue
        if name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
            prefix, proj = name.rsplit(".", 1)
            if f"{prefix}.0.{proj}.weight{SCALE_SUFFIX}" in keys:
                out.add(name)
        elif name + SCALE_SUFFIX in keys:
            out.add(name)
    return out


def install_fp8(model: nn.Module, parts: dict[str, tuple], block=BLOCK) -> None:
    """Swap the modules owning `parts` (name → (float8 weight, scales, offset)) for FP8 modules. Forward
    hooks (the tensor-parallel all-reduce) move with them."""
    experts: dict[str, dict] = {}
    specs = getattr(model, "shard_specs", {})
    for name in parts:  # a sharded weight's scales are sharded with it (accounting: parameter_bytes)
        if name in specs:
            specs[name + SCALE_SUFFIX] = specs[name]
    for name, (w, s, off) in parts.items():
        owner, attr = name.rsplit(".", 1)
        if attr in ("gate_proj", "up_proj", "down_proj") and owner.endswith("experts"):
            experts.setdefault(owner, {})[attr] = (w, s)
            continue
        parent_name, child = owner.rsplit(".", 1) if "." in owner else ("", owner)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = FP8Linear(w, s, off, block)
        new._forward_hooks = old._forward_hooks
        setattr(parent, child, new)
    for owner, weights in experts.items():
        parent_name, child = owner.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        lo, hi = getattr(old, "lo", 0), getattr(old, "hi", old.num_experts)
        group = getattr(old, "group", None)
        setattr(parent, child, FP8Experts(old.num_experts, lo, hi, group, weights, block))


# ---------------------------------------------------------------------- exporter
def export_fp8(model: nn.Module, path: str | Path, **save_kwargs) -> Path:
    """Write `model` as a released-layout FP8 checkpoint: `save_pretrained`, then every target weight of
    each shard quantised (128×128 blocks, `weight_scale_inv`), the index and config.json updated."""
    from longcat2.hf_checkpoint import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, _hf_key_to_ours

    path = Path(model.save_pretrained(path, **save_kwargs))
    index_path = path / INDEX_NAME
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    files = sorted(set(index["weight_map"].values())) if index else [WEIGHTS_NAME]
    ignored: set[str] = set()
    for fname in files:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path / fname), framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                t = f.get_tensor(key)
                ours, _ = _hf_key_to_ours(key)
                quantise = t.dim() == 2 and key.endswith(".weight") and "norm" not in key
                if quantise and any(k in ours or k in key for k in _KEEP_HIGH):
                    ignored.add(key.removesuffix(".weight"))
                    quantise = False
                if quantise:
                    q, s = quantize_blockwise(t)
                    tensors[key], tensors[key + SCALE_SUFFIX] = q, s
                    if index:
                        index["weight_map"][key + SCALE_SUFFIX] = fname
                else:
                    tensors[key] = t
        save_file(tensors, str(path / fname), metadata=metadata)
    if index:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
        "ignored_layers": sorted(ignored),
    }
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return path
