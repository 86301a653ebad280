import os
import shutil
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture
def umask_027() -> Iterator[Callable[[Path], None]]:
    """Run under umask 027 and check a written tree: every file 0640 and every folder 0750, the modes a plain
    `open()` / `mkdir()` give (not a private temporary file's 0600, nor a hard-coded 0644)."""
    old = os.umask(0o027)

    def check(root: Path) -> None:
        found = [p for p in [root, *root.rglob("*")] if not p.is_symlink()]
        assert any(p.is_file() for p in found), f"{root}: no files"
        for p in found:
            want = 0o750 if p.is_dir() else 0o640
            assert p.stat().st_mode & 0o777 == want, f"{p}: mode {p.stat().st_mode & 0o777:o}, want {want:o}"

    try:
        yield check
    finally:
        os.umask(old)


VOCAB = 512


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A prepared data dir (train/val shards + tokenizer) from ~300 KB of stdlib sources."""
    from longcat2.data import ensure_prepared

    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    size = 0
    for f in sorted(stdlib.glob("*.py")):
        if size > 300_000:
            break
        shutil.copyfile(f, src / f.name)
        size += f.stat().st_size
    return ensure_prepared(src, root / "prepared", VOCAB, max_bytes=None, val_fraction=0.1)
