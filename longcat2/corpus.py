"""Reading a corpus: which files a data argument names, and the documents in each file.

Design choices:
- Sources: a UTF-8 text file (one document), a `.jsonl` file (one document per line, from its `text`
  field), a folder (every non-hidden file below it, recursively, in sorted path order; `.jsonl` files
  inside are read as jsonl), or `stdlib`: the `.py` files of the running interpreter's standard library
  (`sysconfig.get_paths()["stdlib"]`, no site-/dist-packages), ordered by the SHA-1 of their relative path
  so that a byte cap takes a spread sample of the library instead of its first letters.
- Bad input never crashes: an unreadable, non-UTF-8, binary (NUL bytes) or empty file, or a bad jsonl
  line, is skipped with its reason. Shared by shard writing (`data/writer.py`) and tokenizer training
  (`tokenizer.py`), which is why it is a module of its own: both import it, neither imports the other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STDLIB = "stdlib"
_TEST_DIRS = {"test", "tests", "idle_test"}


class DataError(ValueError):
    """The corpus, a shard directory or a sampler state is unusable; the message names what and where."""


# ------------------------------------------------------------------------------------------- sources


@dataclass
class SourceFiles:
    """A resolved data argument: the files to read, in reading order."""

    label: str  # what meta.json records as the source
    kind: str  # "stdlib" | "file" | "folder"
    root: Path
    files: list[Path]
    total_files: int  # before the byte cap
    max_bytes: int | None = None

    def rel(self, path: Path) -> str:
        if self.kind == "file":
            return path.name
        return path.relative_to(self.root).as_posix()


def stdlib_files(include_tests: bool = True) -> tuple[Path, list[Path]]:
    """The standard library root and its `.py` files in spread (SHA-1 of relative path) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the standard library directory {root} (sysconfig stdlib path) does not exist")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        keep = []
        for d in sorted(dirnames):
            if d in ("site-packages", "dist-packages", "__pycache__") or d.startswith("."):
                continue
            if not include_tests and d in _TEST_DIRS:
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if name.endswith(".py"):
                rel = (rel_dir / name).as_posix()
                found.append((hashlib.sha1(rel.encode()).hexdigest(), Path(dirpath) / name))
    found.sort()
    return root, [p for _, p in found]


def _folder_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        out.extend(Path(dirpath) / n for n in filenames if not n.startswith("."))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def resolve_files(
    data: str | Path, *, max_bytes: int | None = None, include_tests: bool = True
) -> SourceFiles:
    """Resolve a data argument (file, folder, `.jsonl`, or `stdlib`) to its files, capped at `max_bytes`.

    The cap keeps files in reading order while the running total of their sizes is below `max_bytes`
    (the last one may be read partially; see `read_file_documents`).
    """
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    if str(data) == STDLIB:
        root, files = stdlib_files(include_tests)
        kind, label = "stdlib", f"stdlib ({root}, Python {sys.version.split()[0]})"
    else:
        root = Path(data).expanduser()
        if not root.exists():
            raise DataError(
                f"data source {str(data)!r} does not exist (expected a file, folder, .jsonl or 'stdlib')"
            )
        if root.is_dir():
            files, kind = _folder_files(root), "folder"
        else:
            files, kind, root = [root], "file", root.parent
        label = str(Path(data).expanduser().resolve())
    if not files:
        raise DataError(f"empty corpus: no files found in {label}")
    total = len(files)
    if max_bytes is not None:
        kept, used = [], 0
        for f in files:
            if used >= max_bytes:
                break
            kept.append(f)
            with contextlib.suppress(OSError):
                used += f.stat().st_size
        files = kept
    return SourceFiles(label=label, kind=kind, root=root, files=files, total_files=total, max_bytes=max_bytes)


def _decode(data: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason)."""
    if b"\x00" in data:
        return None, "binary file (contains NUL bytes)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (invalid byte 0x{data[e.start]:02x} at offset {e.start})"
    return text.removeprefix("\ufeff"), None


def _truncate_utf8(data: bytes, n: int) -> bytes:
    """The first n bytes, shortened so they do not end inside a UTF-8 character."""
    if len(data) <= n:
        return data
    cut = n
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # data[cut] continues the character being cut
        cut -= 1
    return data[:cut]


def iter_documents(path: Path, max_bytes: int | None, problems: list[str]) -> Iterator[tuple[int, str]]:
    """Yield (unit index, text); a whole-file failure or bad jsonl lines are appended to `problems`.

    For a text file the unit index is 0; for `.jsonl` it is the 0-based line number.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        problems.append(f"unreadable: {e.strerror or e}")
        return
    is_jsonl = path.suffix.lower() == ".jsonl"
    if max_bytes is not None and len(data) > max_bytes:
        data = _truncate_utf8(data, max_bytes)
        if is_jsonl:  # drop the line the cap cut in half
            data = data[: data.rfind(b"\n") + 1]
    if not is_jsonl:
        text, reason = _decode(data)
        if reason is not None:
            problems.append(reason)
        elif not text.strip():
            problems.append("empty file")
        else:
            yield 0, text
        return
    bad, first_bad, good = 0, "", 0
    for lineno, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        line, reason = _decode(raw)
        if reason is None:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                reason = f"invalid JSON ({e.msg})"
            else:
                text = obj.get("text") if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    reason = "no string 'text' field"
                elif not text.strip():
                    reason = "empty 'text'"
                else:
                    good += 1
                    yield lineno, text
                    continue
        bad += 1
        first_bad = first_bad or f"line {lineno + 1}: {reason}"
    if bad:
        problems.append(f"{bad} of {bad + good} jsonl lines skipped (first: {first_bad})")


def read_file_documents(path: str | Path, *, max_bytes: int | None = None) -> tuple[list[str], str | None]:
    """Read one corpus file: (documents, problem or None). A text file is one document; a `.jsonl` file
    gives one per line with a non-empty string `text`. Reads at most `max_bytes` bytes of the file."""
    problems: list[str] = []
    docs = [text for _, text in iter_documents(Path(path), max_bytes, problems)]
    return docs, ("; ".join(problems) or None)
