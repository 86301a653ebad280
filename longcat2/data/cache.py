"""Prepared data on first use: `ensure_prepared` turns `--data` into a shard folder, cached and locked.

Design choices:
- `train --data` takes a prepared folder, `stdlib`, a file, a folder or a `.jsonl`; anything raw is
  prepared once into a cache folder named after the source and settings (`$LONGCAT2_CACHE`, else
  `~/.cache/longcat2`) and reused while the recorded settings match, so repeated runs are free.
- Without `--tokenizer`, a tokenizer of the model's vocab size is trained on the same (byte-capped) corpus
  into the cache folder first (`longcat2.tokenizer.train_tokenizer`), and retrained only when the corpus
  settings change.
- Concurrent ranks (torchrun) prepare a cache once: the work happens under an exclusive `fcntl` lock on
  the cache folder; the others wait and then find it ready.
- A shard folder whose vocabulary is larger than the model's is an error (ids would overflow the
  embedding).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longcat2.corpus import STDLIB, DataError, resolve_files
from longcat2.data.shards import read_meta
from longcat2.data.writer import DEFAULT_VAL_FRACTION, prepare
from longcat2.tokenizer import TokenizerError, train_tokenizer

DEFAULT_STDLIB_BYTES = 8_000_000  # enough for tiny models, prepared in seconds


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
