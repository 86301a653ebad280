"""Training on synthetic long-context tasks: `longcat2 train --data task:passkey+niah ...`.

Design choices:
- Examples are generated on the fly from `longcat2.evals.tasks` (no files): infinite, deterministic data.
  Example i of rank r uses seed (seed, r, i), so the data position is one counter and resume is exact.
- `--data task:NAME[+NAME...][:key=value,...]` mixes tasks round-robin; key=value pairs go to every
  generator that accepts them (e.g. `task:mqar:n_pairs=32`). Each example is `seq_len + 1` tokens, so
  x/y are `seq_len`; labels are -100 except on answer tokens (the loss mask of the generator).
- The vocabulary is the task id space (`TaskVocab.size`, rounded up to a multiple of 64); no tokenizer.
- Evaluation batches come from a disjoint seed stream, the same at every evaluation.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from longcat2.evals.tasks import GENERATORS, TaskVocab

IGNORE = -100


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


class SyntheticTask:
    """Task protocol of the trainer (next_batch / eval_batches / state_dict / describe)."""

    tokenizer_dir = None
    bytes_per_token = None

    def __init__(
        self, spec: str, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.names, kwargs = parse_task_spec(spec)
        self.spec = spec
        self.vocab = TaskVocab()
        self.vocab_size = -(-self.vocab.size // 64) * 64
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world = rank, world
        self.kwargs = {
            name: {k: v for k, v in kwargs.items() if k in inspect.signature(GENERATORS[name]).parameters}
            for name in self.names
        }
        self.drawn = 0

    def _example(self, stream: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        name = self.names[index % len(self.names)]
        rng = np.random.default_rng([self.seed, stream, self.rank, index])
        ex = GENERATORS[name](rng, self.seq_len + 1, float(rng.random()), self.vocab, **self.kwargs[name])
        toks = np.zeros(self.seq_len + 1, dtype=np.int64)  # pad id 0 never carries loss
        mask = np.zeros(self.seq_len + 1, dtype=bool)
        n = min(len(ex.tokens), self.seq_len + 1)
        toks[-n:], mask[-n:] = ex.tokens[-n:], ex.loss_mask[-n:]  # keep the answer if an example runs long
        return toks, mask

    def _batch(self, stream: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._example(stream, start + i) for i in range(self.batch_size)]
        toks = torch.from_numpy(np.stack([r[0] for r in rows]))
        mask = torch.from_numpy(np.stack([r[1] for r in rows]))
        x, y = toks[:, :-1], toks[:, 1:].clone()
        y[~mask[:, 1:]] = IGNORE
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._batch(0, self.drawn)
        self.drawn += self.batch_size
        return batch

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self._batch(1, i * self.batch_size) for i in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "spec": self.spec}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("spec") != self.spec:
            raise ValueError(f"data: checkpoint was trained on {state.get('spec')!r}, not {self.spec!r}")
        self.drawn = int(state["drawn"])

    def describe(self) -> str:
        return f"synthetic tasks {'+'.join(self.names)} at {self.seq_len} tokens (vocab {self.vocab_size})"
