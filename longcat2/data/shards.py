"""Prepared token shards on disk: the format, and reading it back (`read_meta`, `load_split`, `TokenShards`).

Design choices:
- One flat token file per split (`train.bin`, `val.bin`): raw little-endian uint16 (vocab <= 65536, so
  every id fits) or uint32, read back as a read-only `np.memmap` (no copy, any corpus size). Each document
  is followed by EOS (`</longcat_s>`), the separator the N-gram embedding resets on. `meta.json` records
  the format version, dtype, counts, tokenizer, source, seed and skips.
- Reading trusts nothing: a missing `meta.json`, another format version, or a split file whose size does
  not match the recorded token count is a `DataError` that says to re-run `longcat2 prepare`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from longcat2.corpus import DataError

FORMAT_VERSION = 1


def read_meta(shard_dir: str | Path) -> dict[str, Any]:
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        raise DataError(
            f"{shard_dir} is not a prepared data directory (no meta.json); run `longcat2 prepare`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
            "re-run `longcat2 prepare`"
        )
    return meta


def load_split(shard_dir: str | Path, split: str) -> np.ndarray:
    """The token ids of a split as a read-only `np.memmap` (a zero-length array for an empty split)."""
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    meta = read_meta(shard_dir)
    info = meta["splits"][split]
    dtype = np.dtype(meta["dtype"])
    path = Path(shard_dir) / info["file"]
    n = int(info["tokens"])
    if not path.is_file():
        raise DataError(f"{path} is missing (meta.json lists {n} {split} tokens)")
    size = path.stat().st_size
    if size != n * dtype.itemsize:
        raise DataError(
            f"{path} has {size} bytes but meta.json says {n} tokens of {dtype.name} ({n * dtype.itemsize} bytes); "
            "the shard is truncated or stale: re-run `longcat2 prepare`"
        )
    if n == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


class TokenShards:
    """A prepared data directory: `meta`, `train`/`val` token arrays, tokenizer location and special ids."""

    def __init__(self, shard_dir: str | Path) -> None:
        self.dir = Path(shard_dir)
        self.meta = read_meta(self.dir)
        self._splits: dict[str, np.ndarray] = {}

    def split(self, name: str) -> np.ndarray:
        if name not in self._splits:
            self._splits[name] = load_split(self.dir, name)
        return self._splits[name]

    @property
    def train(self) -> np.ndarray:
        return self.split("train")

    @property
    def val(self) -> np.ndarray:
        return self.split("val")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def tokenizer_dir(self) -> Path | None:
        t = self.meta.get("tokenizer")
        return Path(t) if t else None

    def __repr__(self) -> str:
        s = self.meta["splits"]
        return f"TokenShards({str(self.dir)!r}, train={s['train']['tokens']}, val={s['val']['tokens']})"
