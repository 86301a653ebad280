"""Training on synthetic long-context tasks: on the fly (`--data task:SPEC`) or from prepared files
(`longcat2 prepare --task SPEC --out DIR`, then `--data DIR`).

Design choices:
- One row builder (`task_row`) makes every example: row i of stream s and rank r uses the seed
  (seed, s, r, i), so the data position is one counter and resume is exact. Stream 0 is training data,
  stream 1 evaluation data (disjoint seeds). Prepared files hold exactly the rows the on-the-fly stream
  would draw at world size 1, so the two routes train on the same examples.
- `task:NAME[+NAME...][:key=value,...]` mixes tasks round-robin; key=value pairs go to every generator
  that accepts them (e.g. `task:mqar:n_pairs=32`). Each row is `seq_len + 1` tokens, right-aligned (pad id 0
  on the left never carries loss), so x/y are `seq_len`; labels are -100 except on answer tokens.
- Prepared files: `{train,val}_tokens.npy` (uint16 [N, seq_len + 1]) and `{train,val}_mask.npy` (bool),
  read as memmaps; `meta.json` (format `longcat2-task`) is written last, so a half-written folder is never
  mistaken for a finished one. Training walks a seeded permutation per epoch, ranks take strided rows.
- The vocabulary is the task id space (`TaskVocab.size`, rounded up to a multiple of 64); no tokenizer.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longcat2.evals.tasks import GENERATORS, TaskVocab
from longcat2.train.config import IGNORE

TASK_FORMAT = "longcat2-task"
TRAIN_STREAM, EVAL_STREAM = 0, 1


def parse_task_spec(spec: str) -> tuple[list[str], dict[str, Any]]:
    """'task:passkey+niah:n_needles=4' → (['passkey', 'niah'], {'n_needles': 4})."""
    if not spec.startswith("task:"):
        raise ValueError(f"data: a synthetic task spec starts with 'task:', got {spec!r}")
    parts = spec[len("task:") :].split(":", 1)
    names = [n for n in parts[0].split("+") if n]
    unknown = [n for n in names if n not in GENERATORS]
    if not names or unknown:
        raise ValueError(f"data: unknown task {unknown or spec!r}; known: {', '.join(GENERATORS)}")
    kwargs: dict[str, Any] = {}
    if len(parts) == 2 and parts[1]:
        for item in parts[1].split(","):
            key, _, value = item.partition("=")
            if not _ or not key:
                raise ValueError(f"data: expected key=value in {spec!r}, got {item!r}")
            kwargs[key] = float(value) if "." in value else int(value)
    return names, kwargs


def task_vocab_size(vocab: TaskVocab) -> int:
    return -(-vocab.size // 64) * 64


class TaskRows:
    """The rows of a task spec: `row(stream, index)` → (tokens int64 [seq_len+1], loss mask bool)."""

    def __init__(self, spec: str, seq_len: int, seed: int, rank: int = 0) -> None:
        self.names, kwargs = parse_task_spec(spec)
        self.spec, self.seq_len, self.seed, self.rank = spec, seq_len, seed, rank
        self.vocab = TaskVocab()
        self.kwargs = {
            name: {k: v for k, v in kwargs.items() if k in inspect.signature(GENERATORS[name]).parameters}
            for name in self.names
        }

    def row(self, stream: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        name = self.names[index % len(self.names)]
        rng = np.random.default_rng([self.seed, stream, self.rank, index])
        ex = GENERATORS[name](rng, self.seq_len + 1, float(rng.random()), self.vocab, **self.kwargs[name])
        toks = np.zeros(self.seq_len + 1, dtype=np.int64)  # pad id 0 never carries loss
        mask = np.zeros(self.seq_len + 1, dtype=bool)
        n = min(len(ex.tokens), self.seq_len + 1)
        toks[-n:], mask[-n:] = ex.tokens[-n:], ex.loss_mask[-n:]  # keep the answer if an example runs long
        return toks, mask


def _xy(toks: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] rows → (x [B, T], y [B, T]) with y = -100 off the answers."""
    t = torch.from_numpy(np.asarray(toks, dtype=np.int64))
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    x, y = t[:, :-1], t[:, 1:].clone()
    y[~m[:, 1:]] = IGNORE
    return x, y


class SyntheticTask:
    """Task protocol of the trainer (next_batch / eval_batches / state_dict / describe), generated on the fly."""

    tokenizer_dir = None
    bytes_per_token = None

    def __init__(
        self, spec: str, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.rows = TaskRows(spec, seq_len, seed, rank)
        self.names, self.spec, self.vocab = self.rows.names, spec, self.rows.vocab
        self.vocab_size = task_vocab_size(self.vocab)
        self.batch_size, self.seq_len, self.rank, self.world = batch_size, seq_len, rank, world
        self.drawn = 0

    def _batch(self, stream: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.rows.row(stream, start + i) for i in range(self.batch_size)]
        return _xy(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._batch(TRAIN_STREAM, self.drawn)
        self.drawn += self.batch_size
        return batch

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self._batch(EVAL_STREAM, i * self.batch_size) for i in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "spec": self.spec}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("spec") != self.spec:
            raise ValueError(f"data: checkpoint was trained on {state.get('spec')!r}, not {self.spec!r}")
        self.drawn = int(state["drawn"])

    def describe(self) -> str:
        return f"synthetic tasks {'+'.join(self.names)} at {self.seq_len} tokens (vocab {self.vocab_size})"


# ------------------------------------------------------------------------------------- prepared files


def prepare_task_files(
    spec: str, out_dir: str | Path, *, seq_len: int, n_train: int, n_val: int, seed: int = 0
) -> dict[str, Any]:
    """Write the first `n_train` training rows and `n_val` evaluation rows of `spec` to `out_dir`."""
    if seq_len < 16:
        raise ValueError(f"seq_len: at least 16 tokens, got {seq_len}")
    if n_train < 1 or n_val < 0:
        raise ValueError(f"examples: need >= 1 training and >= 0 validation rows, got {n_train} / {n_val}")
    rows = TaskRows(spec, seq_len, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten
    splits: dict[str, Any] = {}
    for split, stream, n in (("train", TRAIN_STREAM, n_train), ("val", EVAL_STREAM, n_val)):
        toks = np.zeros((n, seq_len + 1), dtype=np.uint16)
        mask = np.zeros((n, seq_len + 1), dtype=bool)
        for i in range(n):
            toks[i], mask[i] = rows.row(stream, i)
        for name, arr in ((f"{split}_tokens.npy", toks), (f"{split}_mask.npy", mask)):
            tmp = out / (name + ".tmp")
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, out / name)
        splits[split] = {"rows": n, "answer_tokens": int(mask.sum())}
    meta = {
        "format": TASK_FORMAT,
        "spec": spec,
        "seq_len": seq_len,
        "seed": seed,
        "vocab_size": task_vocab_size(rows.vocab),
        "splits": splits,
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


def read_task_meta(path: str | Path) -> dict[str, Any] | None:
    """The meta of a prepared task folder, or None if `path` is not one."""
    p = Path(path) / "meta.json"
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == TASK_FORMAT else None


class PreparedTask(SyntheticTask):
    """Task protocol over a folder written by `prepare_task_files`: epochs of a seeded permutation."""

    def __init__(
        self, path: str | Path, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        meta = read_task_meta(path)
        if meta is None:
            raise ValueError(
                f"data: {path} is not a prepared task folder (no meta.json of format {TASK_FORMAT})"
            )
        if seq_len > meta["seq_len"]:
            raise ValueError(
                f"data: {path} holds rows of {meta['seq_len']} tokens, shorter than --seq-len {seq_len}; "
                f"prepare it again with --seq-len {seq_len}"
            )
        super().__init__(meta["spec"], batch_size, seq_len, seed, rank, world)
        self.path, self.meta = Path(path), meta
        self.split = {
            s: (
                np.load(self.path / f"{s}_tokens.npy", mmap_mode="r"),
                np.load(self.path / f"{s}_mask.npy", mmap_mode="r"),
            )
            for s in ("train", "val")
        }
        for s, (toks, mask) in self.split.items():
            if toks.shape != mask.shape or toks.shape[0] != meta["splits"][s]["rows"]:
                raise ValueError(f"data: {path}/{s}_*.npy do not match meta.json; prepare the folder again")
        if len(self.split["train"][0]) < batch_size * world:
            raise ValueError(
                f"data: {path} has {len(self.split['train'][0])} training rows, fewer than one global batch "
                f"({batch_size} x {world} ranks)"
            )

    def _rows(self, split: str, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        toks, mask = self.split[split]
        cut = slice(toks.shape[1] - (self.seq_len + 1), None)  # rows are right-aligned: keep the answers
        rows = np.sort(idx)  # ascending reads from the memmaps
        return _xy(toks[rows][:, cut], mask[rows][:, cut])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.split["train"][0])
        per_epoch = n // (self.batch_size * self.world) * self.batch_size * self.world
        start = self.drawn * self.world + self.rank * self.batch_size
        epoch, offset = divmod(start, per_epoch)
        order = np.random.default_rng([self.rows.seed, epoch]).permutation(n)
        self.drawn += self.batch_size
        return self._rows("train", order[offset : offset + self.batch_size])

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = len(self.split["val"][0])
        n = min(n, rows // self.batch_size)
        return [
            self._rows("val", np.arange(i * self.batch_size, (i + 1) * self.batch_size)) for i in range(n)
        ]

    def describe(self) -> str:
        return f"prepared tasks {self.spec} from {self.path} ({len(self.split['train'][0]):,} rows) at {self.seq_len} tokens"
