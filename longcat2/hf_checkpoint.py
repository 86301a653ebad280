"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded), released key names.

Design choices:
- Key map. Our parameter names are the released ones except for two families:
  routed experts are stacked `model.layers.{L}.mlp.experts.{gate_proj,up_proj,down_proj}` [E, out, in], the
  files hold per-expert `...mlp.experts.{e}.{proj}.weight`; the N-gram tables are
  `model.ngram_embeddings.{embedders,post_projs}.{i}.weight` (Flash-Lite spelling), which LongCat-2.0
  (`hf_format == "longcat"`) files call `model.oe_embed_tokens{i}.weight` / `model.oe_embed_proj{i}.weight`.
  Loading accepts both N-gram spellings (and `model.ngram_embeddings.word_embeddings.weight` as an alias of
  `model.embed_tokens.weight`); saving writes the format's own spelling.
- Memory. The model is built under `torch.device("meta")` (no parameter memory, no random init); buffers
  become real zeros and config-derived constants (RoPE frequencies, N-gram moduli) are plain CPU tensors, so
  nothing needs re-deriving afterwards. Tensors are then read one at a time with `safetensors.safe_open`, one shard mapped at a
  time, and each parameter is materialised on the target device as it is read; a stacked expert tensor is
  allocated once and each expert's slice is copied in. Peak memory is the model plus one tensor and the
  mapped pages of the current shard (measured: 1.06 GB model, 100 MB shards → 1.29 GB peak RSS growth).
- Dtype. `dtype=None` means the config's `torch_dtype`. When the target is below fp32, the router
  (`mlp.router.classifier.*`) stays fp32 as in the released checkpoints, and buffers keep the dtype the model
  gave them (`e_score_correction_bias` is fp32).
- FP8. A weight stored as float8 with a `<name>.weight_scale_inv` companion is dequantised on load:
  W = w.float() * scale, the scale repeated over blocks of `quantization_config.weight_block_size`
  (default 128x128; the last block of a row/column is trimmed), then cast to the target dtype.
- Strictness. Missing, unexpected or wrongly shaped tensors raise `CheckpointError` (a ValueError) naming
  the key (and both shapes). `strict=False` tolerates missing/unexpected keys: missing parameters are freshly
  initialised (with the model's `init_weights` rule), unexpected ones are skipped; shape mismatches remain
  errors. Every load leaves a `LoadReport` on `model.load_report` and logs it when something was skipped.
- Integer tensors where the model holds floating-point values (an int8-quantized file) are an error naming
  the key: they cannot be read as numbers without a quantization scheme, and the only one supported is
  float8 block-wise (above). A tensor the index places in a file that does not hold it is an error naming
  the key and the file.
- Tolerated by design, even with `strict=True` (all listed in the report):
  * a wholly absent MTP head, no `model.mtp.*` tensor at all (transformers drops the MTP head when it saves
    a Flash model): our MTP head keeps a fresh initialisation. A partly present MTP head is incomplete:
    with `strict=True` its missing tensors are errors like any other;
  * `model.mtp.*` in the file when the model has no MTP head, and `model.mtp.oe_*` when
    `mtp_disable_over_tokenizer` (our MTP has no N-gram input): skipped;
  * zero-expert tensors `...experts.{e}.*` with n_routed_experts <= e < n_routed_experts + zero_expert_num
    (transformers 5.0-5.24 wrote gate/up tensors for the identity experts): skipped;
  * `lm_head.weight` next to `model.embed_tokens.weight` when the embeddings are tied: skipped.
- Layout on save. The default is the released layout for every family: routed experts only, MTP included.
  It is what the released checkpoints look like and what vLLM, SGLang and transformers >= 5.25 load
  (transformers ignores the MTP tensors). transformers 5.0-5.24 stacked gate/up over routed + zero experts
  and refused a file without zero-expert gate/up tensors; `transformers_compat=True` writes zero-filled ones
  for those versions (no down_proj, as they did). vLLM rejects such a folder, so it is never the default.
- Atomic saves. Everything is written into a fresh temporary directory next to the target, then swapped in
  with two renames (old → backup, temp → target; the backup is restored if the second rename fails, deleted
  after it succeeds). An exception mid-write leaves the previous checkpoint untouched. Files in an existing
  target that are not part of the checkpoint (tokenizer files, README, ...) are carried over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from longcat2.config import ModelConfig

log = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_BLOCK = (128, 128)
DEFAULT_MAX_SHARD_SIZE = "5GB"

_EXPERT_KEY = re.compile(
    r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
_STACKED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_proj|up_proj|down_proj)$")
_OE_TABLE = re.compile(r"^model\.oe_embed_tokens(?P<i>\d+)\.weight$")
_OE_PROJ = re.compile(r"^model\.oe_embed_proj(?P<i>\d+)\.weight$")
_NG_TABLE = re.compile(r"^model\.ngram_embeddings\.embedders\.(?P<i>\d+)\.weight$")
_NG_PROJ = re.compile(r"^model\.ngram_embeddings\.post_projs\.(?P<i>\d+)\.weight$")
_WORD_ALIAS = "model.ngram_embeddings.word_embeddings.weight"
_SHARD_FILE = re.compile(r"^model-\d+-of-\d+\.safetensors$")
_FP32_PARAMS = re.compile(r"\.mlp\.router\.classifier\.(weight|bias)$")
_SCALE_SUFFIX = "_scale_inv"  # "<x>.weight" + "_scale_inv" == "<x>.weight_scale_inv"


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: the message names the key (and both shapes when they differ)."""


@dataclass
class LoadReport:
    """What `load_pretrained` did besides copying matching tensors (all names in checkpoint spelling)."""

    path: str = ""
    missing: list[str] = field(default_factory=list)  # expected, absent; freshly initialised (strict=False)
    unexpected: list[str] = field(default_factory=list)  # present, unknown; skipped (strict=False)
    mtp_initialised: list[str] = field(default_factory=list)  # absent model.mtp.* kept freshly initialised
    ignored: list[str] = field(default_factory=list)  # known extras skipped (zero experts, tied lm_head, ...)
    dequantised: list[str] = field(default_factory=list)  # FP8 weights dequantised on load

    @property
    def incomplete(self) -> bool:
        """True when some model tensor did not come from the file or some file tensor was not understood
        (the known, harmless extras in `ignored` do not count)."""
        return bool(self.missing or self.unexpected or self.mtp_initialised)

    def __str__(self) -> str:
        def fmt(label: str, keys: list[str]) -> str:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} total)" if len(keys) > 8 else "")
            return f"\n  {label} ({len(keys)}): {shown}"

        out = f"checkpoint {self.path}:"
        for label, keys in (
            ("missing, freshly initialised", self.missing),
            ("unexpected, skipped", self.unexpected),
            ("MTP absent from checkpoint, freshly initialised", self.mtp_initialised),
            ("ignored", self.ignored),
            ("FP8-dequantised", self.dequantised),
        ):
            if keys:
                out += fmt(label, keys)
        return out if "\n" in out else out + " every tensor matched"


# ---------------------------------------------------------------------- key names


def our_key_to_hf(name: str, cfg: ModelConfig, num_experts: int = 0) -> list[str]:
    """Checkpoint key(s) holding our state-dict entry `name` (one per expert for a stacked expert tensor)."""
    m = _STACKED.match(name)
    if m and num_experts:
        return [f"{m['prefix']}.{e}.{m['proj']}.weight" for e in range(num_experts)]
    if cfg.hf_format == "longcat":
        if m := _NG_TABLE.match(name):
            return [f"model.oe_embed_tokens{m['i']}.weight"]
        if m := _NG_PROJ.match(name):
            return [f"model.oe_embed_proj{m['i']}.weight"]
    return [name]


def _hf_key_to_ours(key: str) -> tuple[str, int | None]:
    """Checkpoint key → (our state-dict name, expert index or None). Unknown names map to themselves."""
    if m := _EXPERT_KEY.match(key):
        return f"{m['prefix']}.{m['proj']}", int(m["e"])
    if m := _OE_TABLE.match(key):
        return f"model.ngram_embeddings.embedders.{m['i']}.weight", None
    if m := _OE_PROJ.match(key):
        return f"model.ngram_embeddings.post_projs.{m['i']}.weight", None
    if key == _WORD_ALIAS:
        return "model.embed_tokens.weight", None
    return key, None


# ---------------------------------------------------------------------- model on meta


def _build_on_meta(cls: type[M], cfg: ModelConfig) -> M:
    """Every parameter on `meta` (no allocation, no random init); buffers become real zeros until the
    checkpoint fills them. Config-derived constants (RoPE frequencies, N-gram moduli) are plain CPU tensors
    created with an explicit device, so the meta context does not touch them."""
    with torch.device("meta"):
        model = cls(cfg)  # type: ignore[call-arg]
    for module in model.modules():
        for bname, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[bname] = torch.zeros(buf.shape, dtype=buf.dtype)
    return model


class _Slots:
    """Where each state-dict entry lives: every (module, attribute) owning it (a tied parameter has several),
    and whether it is a parameter or a persistent buffer. Tied aliases map to their first name."""

    def __init__(self, model: nn.Module) -> None:
        self.owners: dict[str, list[tuple[nn.Module, str]]] = {}
        self.is_param: dict[str, bool] = {}
        # alias → canonical name, e.g. lm_head.weight → model.embed_tokens.weight when the embeddings are tied
        self.tied: dict[str, str] = {}
        canonical: dict[int, str] = {}
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            prefix = f"{mod_name}." if mod_name else ""
            for pname, p in mod._parameters.items():
                if p is None:
                    continue
                full = canonical.setdefault(id(p), prefix + pname)
                if full != prefix + pname:
                    self.tied[prefix + pname] = full
                self.owners.setdefault(full, []).append((mod, pname))
                self.is_param[full] = True
            for bname, b in mod._buffers.items():
                if b is not None and bname not in mod._non_persistent_buffers_set:
                    self.owners.setdefault(prefix + bname, []).append((mod, bname))
                    self.is_param[prefix + bname] = False

    def current(self, name: str) -> torch.Tensor:
        mod, attr = self.owners[name][0]
        return mod._parameters[attr] if self.is_param[name] else mod._buffers[attr]  # type: ignore[return-value]

    def assign(self, name: str, value: torch.Tensor) -> None:
        if self.is_param[name]:
            p = nn.Parameter(value, requires_grad=self.current(name).requires_grad)
            for mod, attr in self.owners[name]:
                mod._parameters[attr] = p
        else:
            for mod, attr in self.owners[name]:
                mod._buffers[attr] = value


# ---------------------------------------------------------------------- reading


def _resolve_dtype(dtype: torch.dtype | str | None, cfg: ModelConfig) -> torch.dtype:
    if dtype is None:
        dtype = cfg.torch_dtype or "float32"
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise CheckpointError(f"dtype: unknown torch dtype {dtype!r}")
        dtype = resolved
    return dtype


def _weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and, when sharded, the index's weight_map."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{INDEX_NAME}: not a valid safetensors index ({index}: {e})") from e
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise CheckpointError(f"{INDEX_NAME}: shard {f} listed in the index is missing from {path}")
        return [path / f for f in files], weight_map
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single], None
    raise CheckpointError(f"{WEIGHTS_NAME}: no {WEIGHTS_NAME} or {INDEX_NAME} in {path}")


def _block_size(path: Path) -> tuple[int, int]:
    try:
        raw = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return DEFAULT_BLOCK
    qc = raw.get("quantization_config") or {}
    bs = qc.get("weight_block_size") if isinstance(qc, dict) else None
    if isinstance(bs, (list, tuple)) and len(bs) == 2:
        return int(bs[0]), int(bs[1])
    return DEFAULT_BLOCK


def dequantize_fp8_blockwise(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> torch.Tensor:
    """W = w.float() * scale_inv per [block] tile (edges trimmed) → fp32 [out, in]."""
    out_f, in_f = weight.shape
    br, bc = block
    rows, cols = math.ceil(out_f / br), math.ceil(in_f / bc)
    if tuple(scale_inv.shape) != (rows, cols):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} != expected ({rows}, {cols})")
    s = scale_inv.float().repeat_interleave(br, 0)[:out_f].repeat_interleave(bc, 1)[:, :in_f]
    return weight.float() * s


def _is_float8(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point and t.element_size() == 1


class _ShardReader:
    """Safetensors handles opened one file at a time, so the mapped pages of a finished shard are released.
    `where` maps every key to its file, in file order (a single file is listed by opening it)."""

    def __init__(self, files: list[Path], weight_map: dict[str, str] | None) -> None:
        self.folder = files[0].parent
        self._name: str | None = None
        self._handle = None
        if weight_map is None:
            self.where = dict.fromkeys(self.handle_for(files[0].name).keys(), files[0].name)
        else:
            order = {f.name: i for i, f in enumerate(files)}
            self.where = dict(sorted(weight_map.items(), key=lambda kv: order[kv[1]]))

    def handle_for(self, fname: str) -> Any:  # safetensors' handle type is not exported
        if fname != self._name:
            self.close()
            try:
                self._handle = safe_open(str(self.folder / fname), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{fname}: not a readable safetensors file ({e})") from e
            self._name = fname
        return self._handle

    def handle(self, key: str) -> Any:
        return self.handle_for(self.where[key])

    def tensor(self, key: str, get: Callable[[Any], Any]) -> Any:
        """get(handle of key's file), with a failure (e.g. an index entry naming the wrong shard) reported
        as a CheckpointError that names the key and the file."""
        handle = self.handle(key)
        try:
            return get(handle)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{key}: cannot be read from {self.folder / self.where[key]} ({e})") from e

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._name = None, None


def load_pretrained(
    cls: type[M],
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
) -> M:
    """Build `cls(ModelConfig.from_hf(path))` and fill it from the safetensors files in `path`.

    See the module docstring for dtype, FP8, strictness and the tolerated extras. Returns the model in eval
    mode with a `LoadReport` on `model.load_report`.
    """
    path = Path(path)
    cfg = ModelConfig.from_hf(path)  # ConfigError names a missing / corrupt config.json
    target = _resolve_dtype(dtype, cfg)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "meta":
        raise CheckpointError("device: cannot load a checkpoint onto the meta device")
    block = _block_size(path)
    files, weight_map = _weight_files(path)

    model = _build_on_meta(cls, cfg)
    slots = _Slots(model)
    num_experts = cfg.n_routed_experts
    zero_experts = range(cfg.n_routed_experts, cfg.n_routed_experts + cfg.zero_expert_num)
    has_mtp = any(n.startswith("model.mtp.") for n in slots.owners)
    report = LoadReport(path=str(path))

    def target_dtype(name: str, current: torch.Tensor) -> torch.dtype:
        if not slots.is_param[name]:
            return current.dtype  # buffers keep the dtype the model gave them (fp32 router bias)
        if _FP32_PARAMS.search(name) and target.itemsize < 4:
            return torch.float32
        return target

    shards = _ShardReader(files, weight_map)

    def fetch(key: str) -> torch.Tensor:
        return shards.tensor(key, lambda h: h.get_tensor(key))

    def read(key: str, expected: tuple[int, ...], floating: bool) -> torch.Tensor:
        """One checkpoint tensor, shape-checked, FP8-dequantised to fp32 if it has a scale."""
        shape = tuple(shards.tensor(key, lambda h: h.get_slice(key).get_shape()))
        if shape != expected:
            raise CheckpointError(f"{key}: shape mismatch, checkpoint has {shape}, model expects {expected}")
        t = fetch(key)
        scale_key = key + _SCALE_SUFFIX
        if floating and not t.dtype.is_floating_point and scale_key not in shards.where:
            raise CheckpointError(
                f"{key}: stored as {t.dtype} in {shards.where[key]}, but the model expects floating-point "
                "values; integer (quantized) weights cannot be read as numbers without a quantization scheme "
                "(only float8 block-wise weights with *.weight_scale_inv tensors are supported)"
            )
        if scale_key in shards.where:
            scale = fetch(scale_key)
            try:
                t = dequantize_fp8_blockwise(t.to(dev), scale.to(dev), block)
            except ValueError as e:
                raise CheckpointError(f"{scale_key}: {e} for weight shape {shape}, block {block}") from e
            report.dequantised.append(key)
        elif _is_float8(t):
            raise CheckpointError(f"{key}: {t.dtype} weight without a {scale_key} tensor")
        return t

    stacked: dict[str, tuple[torch.Tensor, set[int]]] = {}
    loaded: set[str] = set()
    try:
        for key in shards.where:  # grouped by file: one shard mapped at a time
            if key.endswith(_SCALE_SUFFIX) and key[: -len(_SCALE_SUFFIX)] in shards.where:
                continue  # consumed with its weight
            ours, expert = _hf_key_to_ours(key)
            if ours in slots.tied:
                report.ignored.append(key)  # tied lm_head duplicate of embed_tokens
                continue
            if ours not in slots.owners:
                if key.startswith("model.mtp.") and (
                    not has_mtp or (cfg.mtp_disable_over_tokenizer and key.startswith("model.mtp.oe_"))
                ):
                    report.ignored.append(key)
                else:
                    report.unexpected.append(key)
                continue
            current = slots.current(ours)
            dt = target_dtype(ours, current)
            floating = current.dtype.is_floating_point
            if expert is None:
                t = read(key, tuple(current.shape), floating)
                slots.assign(ours, t.to(device=dev, dtype=dt))
                loaded.add(ours)
                continue
            if expert in zero_experts:
                report.ignored.append(key)  # transformers 5.x writes gate/up for identity experts
                continue
            if expert >= num_experts:
                report.unexpected.append(key)
                continue
            if ours not in stacked:  # allocate the stacked destination once
                stacked[ours] = (torch.empty(current.shape, dtype=dt, device=dev), set())
            dest, filled = stacked[ours]
            dest[expert].copy_(read(key, tuple(current.shape[1:]), floating))
            filled.add(expert)
            if len(filled) == num_experts:
                slots.assign(ours, dest)
                loaded.add(ours)
                del stacked[ours]
    finally:
        shards.close()

    # what is still on meta (or a buffer not read) was not, or not fully, in the checkpoint
    fresh: list[str] = []
    for name in slots.owners:
        if name in loaded:
            continue
        _missing(report, name, cfg, num_experts, stacked)
        current = slots.current(name)
        if not current.is_meta:  # a buffer the file did not provide: keep the model's value
            continue
        fresh.append(name)
        slots.assign(name, torch.empty(current.shape, dtype=target_dtype(name, current), device=dev))

    mtp_partial = report.mtp_initialised and any(n.startswith("model.mtp.") for n in loaded)
    if mtp_partial:  # only a wholly absent MTP head (transformers drops it) is tolerated
        report.missing.extend(report.mtp_initialised)
        report.mtp_initialised.clear()
    if strict and (report.missing or report.unexpected):
        problems = [f"missing {k}" for k in report.missing] + [f"unexpected {k}" for k in report.unexpected]
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} total)" if len(problems) > 10 else "")
        raise CheckpointError(
            f"{shown} (checkpoint {path}; strict=False initialises missing tensors and skips unexpected ones)"
        )
    if fresh:
        _init_fresh(model, fresh)
        with torch.no_grad():
            for name, (dest, filled) in stacked.items():  # keep the expert slices that were read
                cur = slots.current(name)
                for e in filled:
                    cur[e].copy_(dest[e])
    model.to(dev)  # non-persistent buffers (RoPE, N-gram moduli) follow the parameters
    model.eval()
    model.load_report = report  # type: ignore[attr-defined]
    if report.incomplete:
        log.warning("%s", report)
    else:
        log.info("%s", report)
    return model


def _missing(
    report: LoadReport,
    name: str,
    cfg: ModelConfig,
    num_experts: int,
    stacked: dict[str, tuple[torch.Tensor, set[int]]],
) -> None:
    keys = our_key_to_hf(name, cfg, num_experts if _STACKED.match(name) else 0)
    if name in stacked:
        filled = stacked[name][1]
        keys = [k for e, k in enumerate(keys) if e not in filled]
    if name.startswith("model.mtp."):
        report.mtp_initialised.extend(keys)
    else:
        report.missing.extend(keys)


@torch.no_grad()
def _init_fresh(model: nn.Module, names: list[str]) -> None:
    """Initialise only `names` with the model's own `init_weights` rule (it iterates named_parameters and
    modules, so it is given a view restricted to the fresh parameters)."""
    params = dict(model.named_parameters())
    chosen = [(n, params[n]) for n in names if n in params]
    ids = {id(p) for _, p in chosen}
    mods = [
        m
        for m in model.modules()
        if m._parameters and all(p is None or id(p) in ids for p in m._parameters.values())
    ]
    init = getattr(type(model), "init_weights", None)
    if init is not None:
        view = SimpleNamespace(
            config=getattr(model, "config", None),
            named_parameters=lambda: iter(chosen),
            modules=lambda: iter(mods),
        )
        init(view)
        return
    for n, p in chosen:  # generic fallback
        if p.dim() == 1:
            p.zero_() if n.endswith(".bias") else p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)


# ---------------------------------------------------------------------- writing


@dataclass
class _Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    get: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB", "100KB" (HF convention: GB = 10^9)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (use bytes or e.g. '5GB', '500MB')")
    unit = m[2] or "B"
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0] if unit != "B" else "B"]
    return int(float(m[1]) * base**power)


def _entries(
    model: nn.Module, cfg: ModelConfig, dtype: torch.dtype | None, transformers_compat: bool
) -> list[_Entry]:
    out: list[_Entry] = []
    seen: set[int] = set()
    state = model.state_dict(keep_vars=True)
    param_ids = {id(p) for p in model.parameters()}
    for name, t in state.items():
        if id(t) in seen:
            continue  # tied parameter: written once, under its first name (model.embed_tokens.weight)
        seen.add(id(t))
        if t.is_meta:
            raise CheckpointError(f"{name}: parameter is on the meta device; nothing to save")
        dt = t.dtype
        if dtype is not None and t.is_floating_point() and id(t) in param_ids:
            dt = torch.float32 if (_FP32_PARAMS.search(name) and dtype.itemsize < 4) else dtype

        def getter(t: torch.Tensor = t, dt: torch.dtype = dt, e: int | None = None) -> torch.Tensor:
            x = t.detach() if e is None else t.detach()[e]
            y = x.to(device="cpu", dtype=dt).contiguous()
            if e is not None and y.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                y = y.clone()  # an expert slice still shares the stacked storage, which safetensors refuses
            return y

        m = _STACKED.match(name)
        if m and t.dim() == 3:
            keys = our_key_to_hf(name, cfg, t.shape[0])
            for e, k in enumerate(keys):
                out.append(_Entry(k, tuple(t.shape[1:]), dt, lambda g=getter, e=e: g(e=e)))
            if transformers_compat and m["proj"] in ("gate_proj", "up_proj"):
                for e in range(t.shape[0], t.shape[0] + cfg.zero_expert_num):
                    shape = tuple(t.shape[1:])
                    out.append(
                        _Entry(
                            f"{m['prefix']}.{e}.{m['proj']}.weight",
                            shape,
                            dt,
                            lambda shape=shape, dt=dt: torch.zeros(shape, dtype=dt),
                        )
                    )
        else:
            (k,) = our_key_to_hf(name, cfg)
            out.append(_Entry(k, tuple(t.shape), dt, getter))
    return out


def _write_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """One safetensors file (a module-level hook so tests can simulate a failure mid-save).

    safetensors writes through a private temporary file (mode 0600); give the file the mode a plain `open()`
    gives, 0666 minus the umask, which is what the fresh save directory got (0777 minus the umask)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, path.parent.stat().st_mode & 0o666)


def _owned(name: str) -> bool:
    return name in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME) or bool(_SHARD_FILE.match(name))


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    transformers_compat: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write config.json + safetensors (sharded with an index when over `max_shard_size`) atomically.

    `dtype` casts floating parameters on the way out (the router stays fp32 below fp32); `None` keeps them.
    The released layout (what vLLM, SGLang and transformers >= 5.25 load); `transformers_compat=True` adds the
    zero-filled zero-expert gate/up tensors that transformers 5.0-5.24 need. Returns the checkpoint folder.
    """
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    out_dtype = _resolve_dtype(dtype, cfg) if dtype is not None else None
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise ValueError(f"max_shard_size: must be > 0, got {max_shard_size!r}")

    entries = _entries(model, cfg, out_dtype, transformers_compat)
    shards: list[list[_Entry]] = [[]]
    size = 0
    for ent in entries:
        if shards[-1] and size + ent.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(ent)
        size += ent.nbytes
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    embed_dtype = next((e.dtype for e in entries if e.key == "model.embed_tokens.weight"), None)
    saved_cfg = cfg.replace(torch_dtype=str(embed_dtype).removeprefix("torch.")) if embed_dtype else cfg

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weight_map: dict[str, str] = {}
        for fname, shard in zip(names, shards):
            _write_shard({e.key: e.get() for e in shard}, tmp / fname, {"format": "pt"})
            weight_map.update({e.key: fname for e in shard})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in entries)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(saved_cfg.to_hf(), indent=2) + "\n")
        if path.is_dir():  # carry over what is not ours (tokenizer, README, generation config, ...)
            for item in path.iterdir():
                if _owned(item.name) or (tmp / item.name).exists():
                    continue
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name, symlinks=True)
                else:
                    shutil.copy2(item, tmp / item.name, follow_symlinks=False)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _swap_in(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    backup = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)
