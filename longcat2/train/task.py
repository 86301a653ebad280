"""What the trainer trains on: the `Task` protocol, the pre-training task and the choice between tasks.

Design choices:
- A task supplies training batches, evaluation batches, its resumable data position and the tokenizer
  folder; the loop (`trainer.py`) knows nothing else about data. Labels use -100 (`IGNORE`) for "no loss".
- Tasks: `PretrainTask` (here: token shards from `longcat2.data`, windows drawn by `BatchSampler`),
  `SFTTask` (`sft.py`: rendered chats with an assistant-only loss mask), `SyntheticTask` / `PreparedTask`
  (`synthetic.py`: long-context task rows). `make_task` picks one from `--data` and the mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from longcat2.train.config import TrainConfig, TrainingError


class Task(Protocol):
    tokenizer_dir: Path | None
    bytes_per_token: float | None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def describe(self) -> str: ...


class PretrainTask:
    """Token shards → (x, y) windows; eval on the first `n` batches of a fixed-seed sampler over `val`."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int) -> None:
        from longcat2 import data

        self.cfg = cfg
        max_bytes = cfg.data_max_bytes or None
        try:
            shard_dir = data.ensure_prepared(
                cfg.data, cfg.data_cache, cfg.vocab_size, tokenizer=cfg.tokenizer, max_bytes=max_bytes
            )
            self.shards = data.TokenShards(shard_dir)
            self.sampler = data.BatchSampler(
                self.shards.train, cfg.batch_size, cfg.seq_len, cfg.seed, rank=rank, world_size=world
            )
        except data.DataError as e:
            raise TrainingError(f"data: {e}") from e
        tok_dir = cfg.tokenizer or self.shards.tokenizer_dir
        self.tokenizer_dir = Path(tok_dir) if tok_dir else None
        self.rank, self.world = rank, world
        val = self.shards.val
        self.val = val if len(val) >= cfg.seq_len + 1 else None
        vb = self.shards.meta["splits"]["val"].get("text_bytes") or 0
        vt = self.shards.meta["splits"]["val"].get("tokens") or 0
        self.bytes_per_token = vb / vt if vb and vt else None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.sampler)

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from longcat2 import data

        if self.val is None or n <= 0:
            return []
        s = data.BatchSampler(
            self.val, self.cfg.batch_size, self.cfg.seq_len, 1234, rank=self.rank, world_size=self.world
        )
        n = min(n, max(1, s.windows_per_epoch // (self.cfg.batch_size * self.world)))
        return [next(s) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def describe(self) -> str:
        m = self.shards.meta["splits"]
        return f"data {self.shards.dir}: {m['train']['tokens']:,} train / {m['val']['tokens']:,} val tokens"


def make_task(cfg: TrainConfig, rank: int, world: int) -> Task:
    """`task:NAME` or a folder of prepared task rows → a synthetic task; else SFT chats (`mode == "sft"`)
    or pre-training token data."""
    from longcat2.train.synthetic import PreparedTask, SyntheticTask, read_task_meta

    task_cls = SyntheticTask if cfg.data.startswith("task:") else None
    if task_cls is None and read_task_meta(cfg.data) is not None:
        task_cls = PreparedTask
    if task_cls is not None:
        try:
            return task_cls(cfg.data, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
        except ValueError as e:
            raise TrainingError(str(e)) from e
    if cfg.mode == "sft":
        from longcat2.train.sft import SFTTask

        return SFTTask(cfg, rank, world)
    return PretrainTask(cfg, rank, world)
