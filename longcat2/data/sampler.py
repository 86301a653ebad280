"""The deterministic, resumable batch sampler the trainer reads token shards with.

Design choices:
- `BatchSampler` cuts each epoch into non-overlapping windows of `seq_len + 1` tokens at an epoch-specific
  offset, visits them in an epoch-specific permutation (both from `seed` and the epoch number), and its
  state is just (epoch, window index): `load_state_dict` resumes at the exact next batch without replay.
- Ranks of a multi-process run take disjoint slices of each step's windows, so the data position is global
  and carries over to another world size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from longcat2.corpus import DataError


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
