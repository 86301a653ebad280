"""Corpus preparation, shard loading, the resumable batch sampler and ensure_prepared."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from longcat2 import corpus as C
from longcat2.data import BatchSampler, DataError, TokenShards, ensure_prepared, load_split, prepare
from longcat2.data import cli as data_cli
from longcat2.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
)


def _texts(n: int) -> list[str]:
    return [
        f"# file {i}\n" + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40 + 7 * i)) + "\n"
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer(train_tokenizer(_texts(20) * 3, 320, tmp_path_factory.mktemp("tok")))


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    texts = {}
    for i, t in enumerate(_texts(12)):
        rel = f"sub/doc{i:02d}.txt" if i % 3 == 0 else f"doc{i:02d}.md"
        (root / rel).write_text(t, encoding="utf-8")
        texts[rel] = t
    (root / "latin1.txt").write_bytes("na\xefve caf\xe9\n".encode("latin-1"))
    (root / "empty.txt").write_text("  \n")
    (root / ".hidden.txt").write_text("never read")
    (root / "dangling.txt").symlink_to(tmp_path / "missing-target")
    return root, texts


def _docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    out, cur = [], []
    for t in tokens.tolist():
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == [], "every document ends with EOS"
    return out


def test_prepare_counts_split_by_file_and_skips(tmp_path: Path, corpus, tok: Tokenizer) -> None:
    root, texts = corpus
    meta = prepare(root, tok, tmp_path / "out", val_fraction=0.25, seed=1)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tok.eos_id == 2
    assert meta["split_unit"] == "file" and va["files"] == len(meta["val_files"]) == 3
    assert tr["documents"] + va["documents"] == len(texts) == tr["files"] + va["files"]
    want_tokens = sum(len(tok.encode(t)) + 1 for t in texts.values())
    assert tr["tokens"] + va["tokens"] == want_tokens
    train, val = load_split(tmp_path / "out", "train"), load_split(tmp_path / "out", "val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert (tmp_path / "out" / "train.bin").stat().st_size == 2 * tr["tokens"]
    # val holds exactly the held-out files, train the others, each in sorted path order
    val_set = set(meta["val_files"])
    assert [tok.decode(d) for d in _docs(val, 2)] == [texts[r] for r in sorted(texts) if r in val_set]
    assert [tok.decode(d) for d in _docs(train, 2)] == [texts[r] for r in sorted(texts) if r not in val_set]
    skipped = {s["path"]: s["reason"] for s in meta["skipped"]}
    assert skipped == {
        "dangling.txt": "unreadable: No such file or directory",
        "empty.txt": "empty file",
        "latin1.txt": "not UTF-8 (invalid byte 0xef at offset 2)",
    }
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    shards = TokenShards(tmp_path / "out")
    assert shards.vocab_size == 320 and shards.eos_id == 2 and len(shards.train) == tr["tokens"]
    assert shards.tokenizer_dir == Path(tok.path).resolve()


def test_prepared_files_follow_the_umask(tmp_path: Path, corpus, tok: Tokenizer, umask_027) -> None:
    prepare(corpus[0], tok.path, tmp_path / "prepared")
    umask_027(tmp_path / "prepared")


def test_prepare_is_deterministic_and_seeded(tmp_path: Path, corpus, tok: Tokenizer) -> None:
    root, _ = corpus
    metas = [
        prepare(root, tok, tmp_path / name, val_fraction=0.25, seed=s)
        for name, s in (("a", 7), ("b", 7), ("c", 8))
    ]
    for split in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()
    assert metas[0] == metas[1]
    assert metas[0]["val_files"] != metas[2]["val_files"]


def test_jsonl_single_file_splits_by_record(tmp_path: Path, tok: Tokenizer) -> None:
    src = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(_texts(20))]
    lines[3] = "{broken"
    lines[5] = json.dumps({"body": "no text"})
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = prepare(src, tok, tmp_path / "o", val_fraction=0.2, seed=0)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert meta["split_unit"] == "record" and tr["documents"] + va["documents"] == 18
    assert 1 <= va["documents"] <= 4
    head = len(("\n".join(lines[:4]) + "\n").encode())
    capped = prepare(src, tok, tmp_path / "c", val_fraction=0.0, max_bytes=head + 10)
    assert capped["splits"]["train"]["documents"] == 3  # lines 1-3; line 4 is broken, line 5 is cut
    assert capped["skipped"][0]["reason"].startswith(
        "1 of 4 jsonl lines skipped"
    )  # the cut line is not an error
    (entry,) = meta["skipped"]
    assert entry["path"] == "c.jsonl" and not entry["whole_file"]
    assert (
        entry["reason"]
        == "2 of 20 jsonl lines skipped (first: line 4: invalid JSON (Expecting property name enclosed in double quotes))"
    )


def test_single_text_file_tail_split_and_max_bytes(tmp_path: Path, tok: Tokenizer) -> None:
    src = tmp_path / "one.txt"
    text = "".join(_texts(10))
    src.write_text(text)
    meta = prepare(src, tok, tmp_path / "o", val_fraction=0.1)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert meta["split_unit"] == "tail"
    n = len(tok.encode(text)) + 1
    assert tr["tokens"] + va["tokens"] == n and va["tokens"] == -(-n // 10)
    joined = np.concatenate([load_split(tmp_path / "o", "train"), load_split(tmp_path / "o", "val")])
    assert tok.decode(joined.tolist()) == text + "</longcat_s>"
    capped = prepare(src, tok, tmp_path / "c", val_fraction=0.0, max_bytes=100)
    assert capped["text_bytes"] == 100 and capped["splits"]["val"]["tokens"] == 0
    assert load_split(tmp_path / "c", "val").shape == (0,)
    assert tok.decode(load_split(tmp_path / "c", "train").tolist()) == text[:100] + "</longcat_s>"


def test_bad_inputs_raise_clear_errors(tmp_path: Path, tok: Tokenizer) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty corpus: no files found"):
        prepare(empty, tok, tmp_path / "o")
    (empty / "a.bin").write_bytes(b"\x00\x01\x02")
    (empty / "b.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(
        DataError, match=r"empty corpus: .* gave no documents \(2 file\(s\) read, 2 skipped; first: a.bin"
    ):
        prepare(empty, tok, tmp_path / "o")
    assert not (tmp_path / "o" / "train.bin").exists() and not (tmp_path / "o" / "meta.json").exists()
    with pytest.raises(DataError, match="'/nonexistent/x' does not exist"):
        prepare("/nonexistent/x", tok, tmp_path / "o")
    with pytest.raises(DataError, match="val_fraction must be in"):
        prepare(empty, tok, tmp_path / "o", val_fraction=1.0)
    with pytest.raises(DataError, match="no meta.json"):
        load_split(tmp_path, "train")


def test_truncated_shard_is_detected(tmp_path: Path, corpus, tok: Tokenizer) -> None:
    prepare(corpus[0], tok, tmp_path / "o")
    with open(tmp_path / "o" / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="train.bin has 10 bytes but meta.json says"):
        load_split(tmp_path / "o", "train")
    with pytest.raises(DataError, match="split must be"):
        load_split(tmp_path / "o", "test")


def test_stdlib_source_capped(tmp_path: Path, tok: Tokenizer) -> None:
    src = C.resolve_files("stdlib", max_bytes=120_000)
    assert src.kind == "stdlib" and 0 < len(src.files) < src.total_files
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in src.files)
    assert C.resolve_files("stdlib", max_bytes=120_000).files == src.files  # stable order
    no_tests = C.stdlib_files(include_tests=False)[1]
    assert not any({"test", "tests"} & set(f.relative_to(src.root).parts[:-1]) for f in no_tests)
    meta = prepare("stdlib", tok, tmp_path / "o", max_bytes=120_000)
    assert meta["source_kind"] == "stdlib" and meta["text_bytes"] <= 120_000
    assert meta["splits"]["val"]["files"] >= 1


# ------------------------------------------------------------------------------------------- sampler


def test_batch_sampler_shapes_and_targets() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    s = BatchSampler(tokens, batch_size=4, seq_len=16, seed=0)
    x, y = next(s)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    # one epoch visits each non-overlapping window once
    s = BatchSampler(tokens, batch_size=1, seq_len=16, seed=3)
    starts = [int(next(s)[0][0, 0]) for _ in range(s.windows_per_epoch)]
    assert s.epoch == 1 and s.index == 0
    assert len(set(starts)) == len(starts) and len({st % 16 for st in starts}) == 1


def test_batch_sampler_resume_is_exact_across_epochs() -> None:
    tokens = np.random.default_rng(0).integers(0, 500, size=700).astype(np.uint16)
    a = BatchSampler(tokens, batch_size=3, seq_len=32, seed=5)
    for _ in range(4):
        next(a)
    state = a.state_dict()
    expect = [next(a) for _ in range(12)]  # crosses several epochs (21 windows per epoch)
    b = BatchSampler(tokens, batch_size=3, seq_len=32, seed=5)
    b.load_state_dict(json.loads(json.dumps(state)))
    for (x1, y1), (x2, y2) in zip(expect, (next(b) for _ in range(12))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = BatchSampler(tokens, batch_size=3, seq_len=32, seed=6)
    assert not torch.equal(next(other)[0], next(BatchSampler(tokens, batch_size=3, seq_len=32, seed=5))[0])
    with pytest.raises(DataError, match="num_tokens=700 but this sampler has num_tokens=699"):
        BatchSampler(tokens[:-1], batch_size=3, seq_len=32, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len=32 but this sampler has seq_len=16"):
        BatchSampler(tokens, batch_size=3, seq_len=16, seed=5).load_state_dict(state)


def test_batch_sampler_ranks_partition_the_global_batch() -> None:
    tokens = np.arange(5000, dtype=np.uint32)
    whole = BatchSampler(tokens, batch_size=4, seq_len=8, seed=1)
    ranks = [BatchSampler(tokens, batch_size=2, seq_len=8, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, _ = next(whole)
        assert torch.equal(torch.cat([next(r)[0] for r in ranks]), x)


def test_batch_sampler_errors() -> None:
    with pytest.raises(DataError, match="10 tokens are too few for seq_len 10"):
        BatchSampler(np.arange(10), 1, 10)
    with pytest.raises(DataError, match="rank 2 is outside world_size 2"):
        BatchSampler(np.arange(100), 1, 10, rank=2, world_size=2)


# ----------------------------------------------------------------------------------- ensure / CLI


def test_ensure_prepared_builds_once_and_reuses(tmp_path: Path, corpus) -> None:
    root, texts = corpus
    out = ensure_prepared(root, tmp_path / "cache", 300, max_bytes=None)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and (out / "tokenizer" / "tokenizer.json").is_file()
    stamp = (out / "meta.json").stat().st_mtime_ns, (out / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    assert ensure_prepared(root, tmp_path / "cache", 300, max_bytes=None) == out
    assert stamp == (
        (out / "meta.json").stat().st_mtime_ns,
        (out / "tokenizer" / "tokenizer.json").stat().st_mtime_ns,
    )
    assert ensure_prepared(out, None, 300) == out  # an already prepared directory is used as is
    with pytest.raises(DataError, match="vocab_size 300, larger than the model's vocab_size 290"):
        ensure_prepared(out, None, 290)
    with pytest.raises(DataError, match="tokenizer: no tokenizer at"):
        ensure_prepared(root, tmp_path / "other", 300, tokenizer=tmp_path / "no-such-tokenizer")
    # a different seed re-splits without retraining the tokenizer
    ensure_prepared(root, tmp_path / "cache", 300, max_bytes=None, seed=9)
    assert (out / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == stamp[1]
    assert json.loads((out / "meta.json").read_text())["seed"] == 9


def test_ensure_prepared_stdlib_from_nothing(tmp_path: Path) -> None:
    out = ensure_prepared("stdlib", tmp_path / "std", 300, max_bytes=150_000)
    shards = TokenShards(out)
    assert shards.meta["source_kind"] == "stdlib" and shards.vocab_size == 300
    x, y = next(BatchSampler(shards.train, 2, 64, seed=0))
    assert int(x.max()) < 300
    tok = load_tokenizer(shards.tokenizer_dir)
    assert tok.decode(shards.val[:200].tolist())  # decodes


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    data_cli.add_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prepare(tmp_path: Path, corpus, tok: Tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = corpus
    argv = ["prepare", "--data", str(root), "--tokenizer", str(tok.path), "--out", str(tmp_path / "o")]
    assert _cli([*argv, "--val-fraction", "0.2", "--seed", "3"]) == 0
    out = capsys.readouterr()
    assert "split by file" in out.out and "latin1.txt: not UTF-8" in out.err
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["seed"] == 3
    assert (
        _cli(["prepare", "--data", str(tmp_path / "none"), "--tokenizer", str(tok.path), "--out", "x"]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
