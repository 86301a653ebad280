"""Corpus → token shards on disk (`longcat2 prepare`): the writer of `train.bin`, `val.bin` and `meta.json`.

Design choices:
- Sources and document reading are `longcat2.corpus` (file, `.jsonl`, folder or `stdlib`).
- Bad input never crashes a run half-way: an unreadable, non-UTF-8, binary (NUL bytes) or empty file, or
  a bad jsonl line, is skipped and listed with its reason in `meta.json`. A corpus that yields no
  document at all raises `DataError`.
- The on-disk format is `shards.py`'s: one flat token file per split, each document followed by EOS;
  `meta.json` is written last, so its presence means the shards are complete. Split files are written to
  `.tmp` names and renamed into place.
- Validation is held out by file (whole files, chosen with `random.Random(seed)`), so no file leaks into
  both splits. With a single `.jsonl` file the unit is the record (line); with a single text file it is
  the tail of its token stream. Output is byte-identical for the same input, tokenizer and seed.
- Documents are encoded in batches of about 1 MB of text, very long ones in line-aligned chunks, so the
  tokenizer never sees a giant string.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from longcat2.corpus import STDLIB, DataError, iter_documents, resolve_files
from longcat2.data.shards import FORMAT_VERSION
from longcat2.tokenizer import Tokenizer, load_tokenizer

DEFAULT_VAL_FRACTION = 0.02
_ENCODE_BATCH_BYTES = 1 << 20  # text handed to the tokenizer per encode_batch call
_CHUNK_BYTES = 1 << 20  # very long documents are encoded in line-aligned chunks of about this size


def _chunks(text: str) -> Iterator[str]:
    """Split a very long document at line boundaries so the tokenizer never sees a giant string."""
    if len(text) <= _CHUNK_BYTES:
        yield text
        return
    start = 0
    while start < len(text):
        end = min(len(text), start + _CHUNK_BYTES)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            if nl > start:
                end = nl + 1
        yield text[start:end]
        start = end


# ---------------------------------------------------------------------------------------- prepare


class _SplitWriter:
    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.f = open(self.tmp, "wb")  # closed by finish() or abort()
        self.dtype = dtype
        self.tokens = 0
        self.documents = 0
        self.files: set[str] = set()
        self.text_bytes = 0

    def write(self, ids: list[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        arr.tofile(self.f)
        self.tokens += int(arr.size)

    def finish(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "tokens": self.tokens,
            "documents": self.documents,
            "files": len(self.files),
            "text_bytes": self.text_bytes,
        }


def _count_jsonl_lines(path: Path, max_bytes: int | None) -> int:
    try:
        data = path.read_bytes()
    except OSError:
        return 0
    if max_bytes is not None:
        data = data[:max_bytes]
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


def prepare(
    data: str | Path,
    tokenizer: str | Path | Tokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    max_bytes: int | None = None,
    include_tests: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize a corpus into `out_dir/{train,val}.bin` + `meta.json`; returns the meta dict."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    src = resolve_files(data, max_bytes=max_bytes, include_tests=include_tests)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten

    rng = random.Random(seed)
    files = src.files
    val_units: set[int] = set()
    if val_fraction == 0:
        unit = "none"
    elif len(files) >= 2:
        unit = "file"
        k = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
        val_units = set(rng.sample(range(len(files)), k))
    elif files[0].suffix.lower() == ".jsonl":
        unit = "record"
        n = _count_jsonl_lines(files[0], max_bytes)
        if n >= 2:
            val_units = set(rng.sample(range(n), min(n - 1, max(1, round(n * val_fraction)))))
    else:
        unit = "tail"

    writers = {s: _SplitWriter(out / f"{s}.bin", dtype) for s in ("train", "val")}
    pending: dict[str, list[list[str]]] = {"train": [], "val": []}  # documents (as chunks) to encode
    pending_bytes = {"train": 0, "val": 0}
    skipped: list[dict[str, Any]] = []
    val_files: list[str] = []
    used = 0

    def flush(split: str) -> None:
        docs = pending[split]
        if not docs:
            return
        encoded = iter(tok.encode_batch([c for d in docs for c in d]))
        ids: list[int] = []
        for d in docs:
            for _ in d:
                ids.extend(next(encoded))
            ids.append(tok.eos_id)
        writers[split].write(ids)
        writers[split].documents += len(docs)
        docs.clear()
        pending_bytes[split] = 0

    try:
        for fi, path in enumerate(files):
            budget = None if max_bytes is None else max_bytes - used
            if budget is not None and budget <= 0:
                break
            rel = src.rel(path)
            problems: list[str] = []
            n_docs = 0
            for ui, text in iter_documents(path, budget, problems):
                n_docs += 1
                nbytes = len(text.encode("utf-8"))
                used += nbytes
                if unit == "tail":
                    ids = [t for c in _chunks(text) for t in tok.encode(c)] + [tok.eos_id]
                    cut = len(ids) - max(1, math.ceil(len(ids) * val_fraction))
                    parts = {"train": ids[:cut], "val": ids[cut:]} if cut >= 1 else {"train": ids}
                    for s, part in parts.items():
                        writers[s].write(part)
                        writers[s].documents += 1
                        writers[s].files.add(rel)
                    writers["train"].text_bytes += nbytes
                    continue
                in_val = (unit == "file" and fi in val_units) or (unit == "record" and ui in val_units)
                split = "val" if in_val else "train"
                writers[split].files.add(rel)
                writers[split].text_bytes += nbytes
                pending[split].append(list(_chunks(text)))
                pending_bytes[split] += nbytes
                if pending_bytes[split] >= _ENCODE_BATCH_BYTES:
                    flush(split)
            if problems:
                skipped.append({"path": rel, "reason": "; ".join(problems), "whole_file": n_docs == 0})
            if unit == "file" and fi in val_units and n_docs:
                val_files.append(rel)
        flush("train")
        flush("val")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise

    n_docs_total = writers["train"].documents + writers["val"].documents
    if n_docs_total == 0:
        for w in writers.values():
            w.abort()
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        raise DataError(
            f"empty corpus: {src.label} gave no documents ({len(files)} file(s) read, {len(skipped)} skipped"
            + (f"; first: {reasons}" if reasons else "")
            + ")"
        )
    if writers["train"].tokens == 0:
        for w in writers.values():
            w.abort()
        raise DataError(
            f"the train split of {src.label} is empty (every readable document went to val); "
            f"lower val_fraction (now {val_fraction})"
        )
    for w in writers.values():
        w.finish()

    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "tokenizer": str(Path(tok.path).resolve()) if tok.path else None,
        "source": src.label,
        "source_kind": src.kind,
        "max_bytes": max_bytes,
        "include_tests": include_tests if src.kind == STDLIB else None,
        "seed": seed,
        "val_fraction": val_fraction,
        "split_unit": unit,
        "splits": {s: w.summary() for s, w in writers.items()},
        "files_total": src.total_files,
        "files_read": len(files),
        "text_bytes": used,
        "val_files": val_files,
        "skipped": skipped,
    }
    if extra_meta:
        meta.update(extra_meta)
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "meta.json")
    return meta
