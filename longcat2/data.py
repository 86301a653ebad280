"""Corpus -> token shards on disk, and the deterministic, resumable batch sampler the trainer reads them with.

Design choices:
- Sources and document reading are `longcat2.corpus` (file, `.jsonl`, folder or `stdlib`).
- Bad input never crashes a run half-way: an unreadable, non-UTF-8, binary (NUL bytes) or empty file, or
  a bad jsonl line, is skipped and listed with its reason in `meta.json`. A corpus that yields no
  document at all raises `DataError`.
- One flat token file per split (`train.bin`, `val.bin`): raw little-endian uint16 (vocab <= 65536, so
  every id fits) or uint32, read back as `np.memmap`. Each document is followed by EOS (`</longcat_s>`),
  the separator the N-gram embedding resets on. `meta.json` (written last, so its presence means the
  shards are complete) records dtype, counts, tokenizer, source, seed and skips.
- Validation is held out by file (whole files, chosen with `random.Random(seed)`), so no file leaks into
  both splits. With a single `.jsonl` file the unit is the record (line); with a single text file it is
  the tail of its token stream. Output is byte-identical for the same input, tokenizer and seed.
- `BatchSampler` cuts each epoch into non-overlapping windows of `seq_len + 1` tokens at an epoch-specific
  offset, visits them in an epoch-specific permutation (both from `seed` and the epoch number), and its
  state is just (epoch, window index): `load_state_dict` resumes at the exact next batch without replay.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from longcat2.corpus import STDLIB, DataError, iter_documents, resolve_files
from longcat2.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
DEFAULT_STDLIB_BYTES = 8_000_000  # enough for tiny models, prepared in seconds
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


# ------------------------------------------------------------------------------------------ loading


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


class BatchSampler:
    """Deterministic, resumable (x, y) batches of int64 tensors [batch_size, seq_len] from a token array.

    Epoch e splits the tokens into non-overlapping windows of seq_len + 1 tokens starting at an offset in
    [0, seq_len) and visits them in a permutation; offset and permutation come from
    `np.random.default_rng([seed, e])`. A step consumes `batch_size * world_size` windows (crossing into
    the next epoch when one runs out) and rank r gets slice r. y is x shifted by one token.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"{len(tokens)} tokens are too few for seq_len {seq_len} (one window needs {seq_len + 1})"
            )
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.index = 0  # windows of the current epoch already consumed (by all ranks together)
        self._plan: tuple[int, int, np.ndarray] | None = None  # (epoch, offset, permutation)

    def _epoch_plan(self) -> tuple[int, np.ndarray]:
        if self._plan is None or self._plan[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            n, t = len(self.tokens), self.seq_len
            offset = int(rng.integers(0, min(t, n - t)))
            windows = (n - 1 - offset) // t
            self._plan = (self.epoch, offset, rng.permutation(windows))
        return self._plan[1], self._plan[2]

    @property
    def windows_per_epoch(self) -> int:
        return len(self._epoch_plan()[1])

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[Any, Any]:
        import torch

        need = self.batch_size * self.world_size
        starts: list[int] = []
        while len(starts) < need:
            offset, perm = self._epoch_plan()
            take = perm[self.index : self.index + need - len(starts)]
            starts.extend((offset + take * self.seq_len).tolist())
            self.index += len(take)
            if self.index >= len(perm):
                self.epoch, self.index = self.epoch + 1, 0
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        t = self.seq_len
        buf = np.stack([np.asarray(self.tokens[s : s + t + 1], dtype=np.int64) for s in mine])
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "index": self.index,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after the batch the state was saved at. The token count, seq_len and seed must match
        (they define the windows); batch_size and world_size may change, the window position carries over."""
        for key, mine in (("num_tokens", len(self.tokens)), ("seq_len", self.seq_len), ("seed", self.seed)):
            if key not in state:
                raise DataError(f"sampler state lacks {key!r}")
            if int(state[key]) != mine:
                raise DataError(
                    f"sampler state has {key}={state[key]} but this sampler has {key}={mine}; "
                    "resuming on different data or windows would not continue the same stream"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._plan = None
        if not 0 <= self.index < self.windows_per_epoch:
            raise DataError(f"sampler state index {self.index} is outside epoch {self.epoch}'s windows")


# --------------------------------------------------------------------------------- ensure_prepared


def default_cache_dir() -> Path:
    """`$LONGCAT2_CACHE`, else `~/.cache/longcat2`."""
    env = os.environ.get("LONGCAT2_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "longcat2"


@contextlib.contextmanager
def _locked(dir_: Path) -> Iterator[None]:
    """An exclusive lock on `dir_/.lock` so concurrent ranks prepare a cache once (POSIX only)."""
    dir_.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(dir_ / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_prepared(
    data_arg: str | Path,
    out_dir: str | Path | None,
    vocab_size: int,
    *,
    tokenizer: str | Path | None = None,
    max_bytes: int | None = DEFAULT_STDLIB_BYTES,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    include_tests: bool = True,
) -> Path:
    """Return a prepared data directory for `data_arg`, building it on first use.

    - `data_arg` already a prepared directory (has meta.json): checked against `vocab_size`, returned.
    - Otherwise (`stdlib`, a file, folder or .jsonl): shards go to `out_dir` (default: a directory under
      `default_cache_dir()` named after the source and settings). Unless `tokenizer` is given, a tokenizer
      with `vocab_size` is trained on the same (byte-capped) corpus into `out_dir/tokenizer` if it is not
      there already. Reused as long as the recorded source and settings match, so repeated runs are free.
    `max_bytes` caps the corpus (default 8 MB; None reads everything). Every failure is a `DataError`.
    """
    try:
        return _ensure_prepared(
            data_arg, out_dir, vocab_size, tokenizer, max_bytes, val_fraction, seed, include_tests
        )
    except TokenizerError as e:
        raise DataError(f"tokenizer: {e}") from e


def _ensure_prepared(
    data_arg: str | Path,
    out_dir: str | Path | None,
    vocab_size: int,
    tokenizer: str | Path | None,
    max_bytes: int | None,
    val_fraction: float,
    seed: int,
    include_tests: bool,
) -> Path:
    p = Path(str(data_arg)).expanduser()
    if str(data_arg) != STDLIB and p.is_dir() and (p / "meta.json").is_file():
        return _check_vocab(p, read_meta(p), vocab_size)
    if out_dir is None:
        name = STDLIB if str(data_arg) == STDLIB else hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:12]
        out_dir = default_cache_dir() / "data" / f"{name}-v{vocab_size}-b{max_bytes or 'all'}-s{seed}"
    out = Path(out_dir)
    src = resolve_files(data_arg, max_bytes=max_bytes, include_tests=include_tests)
    corpus = {  # what the tokenizer depends on
        "requested_vocab_size": vocab_size,
        "source": src.label,
        "max_bytes": max_bytes,
        "include_tests": include_tests,
    }
    settings = {**corpus, "tokenizer_arg": str(Path(tokenizer).resolve()) if tokenizer else None}
    settings.update(seed=seed, val_fraction=val_fraction)
    with _locked(out):
        if (out / "meta.json").is_file():
            with contextlib.suppress(DataError):
                meta = read_meta(out)
                if meta.get("ensure_prepared") == settings:
                    return _check_vocab(out, meta, vocab_size)
        if tokenizer is None:
            tok_dir = out / "tokenizer"
            marker = tok_dir / "longcat2_training.json"
            recorded = json.loads(marker.read_text()) if marker.is_file() else None
            if recorded != corpus or not (tok_dir / "tokenizer.json").is_file():
                t0 = time.perf_counter()
                train_tokenizer(src.files, vocab_size, tok_dir, max_bytes=max_bytes)
                marker.write_text(json.dumps(corpus, indent=2) + "\n")
                print(
                    f"data: trained tokenizer in {time.perf_counter() - t0:.1f}s -> {tok_dir}",
                    file=sys.stderr,
                )
            tokenizer = tok_dir
        t0 = time.perf_counter()
        meta = prepare(
            data_arg,
            tokenizer,
            out,
            val_fraction=val_fraction,
            seed=seed,
            max_bytes=max_bytes,
            include_tests=include_tests,
            extra_meta={"ensure_prepared": settings},
        )
        print(
            f"data: prepared {meta['splits']['train']['tokens']} train / {meta['splits']['val']['tokens']} val "
            f"tokens in {time.perf_counter() - t0:.1f}s -> {out}",
            file=sys.stderr,
        )
        return _check_vocab(out, meta, vocab_size)


def _check_vocab(shard_dir: Path, meta: dict[str, Any], vocab_size: int) -> Path:
    if int(meta["vocab_size"]) > vocab_size:
        raise DataError(
            f"{shard_dir} was tokenized with vocab_size {meta['vocab_size']}, larger than the model's "
            f"vocab_size {vocab_size}: token ids would overflow the embedding"
        )
    return shard_dir


# ---------------------------------------------------------------------------------------------- CLI


def _cmd_prepare(args: argparse.Namespace) -> int:
    missing = [f"--{n}" for n in ("data", "tokenizer") if getattr(args, n) is None]
    if missing and not args.task:
        print(
            f"error: prepare needs {' and '.join(missing)} (or --task SPEC for synthetic tasks)",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    try:
        if args.task:
            from longcat2.train.synthetic import prepare_task_files

            spec = args.task if args.task.startswith("task:") else f"task:{args.task}"
            meta = prepare_task_files(
                spec, args.out, seq_len=args.seq_len, n_train=args.examples, n_val=args.val_examples,
                seed=args.seed,
            )  # fmt: skip
        else:
            meta = prepare(
                args.data, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                max_bytes=args.max_bytes,
            )  # fmt: skip
    except (DataError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    if args.task:
        print(
            f"prepared {meta['spec']} in {time.perf_counter() - t0:.1f}s -> {args.out}\n"
            f"  train: {tr['rows']:,} rows x {args.seq_len + 1} tokens ({tr['answer_tokens']:,} answer tokens)\n"
            f"  val:   {va['rows']:,} rows ({va['answer_tokens']:,} answer tokens); vocab {meta['vocab_size']}\n"
            f"  train on it with: longcat2 train --data {args.out} --seq-len {args.seq_len} ..."
        )
        return 0
    print(
        f"prepared {meta['source']} in {time.perf_counter() - t0:.1f}s -> {args.out}\n"
        f"  train: {tr['tokens']:,} tokens, {tr['documents']:,} documents, {tr['files']} file(s)\n"
        f"  val:   {va['tokens']:,} tokens, {va['documents']:,} documents, {va['files']} file(s) "
        f"(split by {meta['split_unit']})\n"
        f"  dtype {meta['dtype']}, vocab {meta['vocab_size']}, {len(meta['skipped'])} file(s) with skips"
    )
    for s in meta["skipped"][:10]:
        print(f"  skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if len(meta["skipped"]) > 10:
        print(f"  ... {len(meta['skipped']) - 10} more in meta.json", file=sys.stderr)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="tokenize a corpus into train/val token shards",
        description="Tokenize a corpus into OUT/train.bin, OUT/val.bin (numpy memmaps) and OUT/meta.json; "
        "or, with --task, write synthetic long-context task rows (passkey, niah, mqar, vt) for `train --data OUT`.",
    )
    p.add_argument("--data", help="a text file, a folder, a .jsonl file ('text' field), or 'stdlib'")
    p.add_argument("--tokenizer", help="tokenizer directory (from `longcat2 tokenizer train`)")
    p.add_argument(
        "--task",
        help="synthetic tasks instead of a corpus: NAME[+NAME...][:key=value,...], e.g. passkey+niah:n_needles=4",
    )
    p.add_argument("--seq-len", type=int, default=1024, help="--task: tokens per training row (default 1024)")
    p.add_argument("--examples", type=int, default=10000, help="--task: training rows (default 10000)")
    p.add_argument("--val-examples", type=int, default=256, help="--task: validation rows (default 256)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"share of files held out for validation (default {DEFAULT_VAL_FRACTION})",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the validation split / of the task rows (default 0)"
    )
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes of text")
    p.set_defaults(func=_cmd_prepare)
