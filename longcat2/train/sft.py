"""Supervised fine-tuning data: chat `.jsonl` → (x, y) batches with loss only on assistant tokens.

Design choices:
- Input: one JSON object per line with OpenAI-style `messages` (system/user/assistant/tool, tool calls,
  `reasoning_content`) and optional `tools`. Each conversation is rendered with the project's chat
  template (`longcat2.chat.render_with_mask`): the ids equal the tokenizer's encoding of the rendered
  transcript (a tag spelled inside message text stays text: only the template writes control tokens),
  and the mask is 1 exactly on what the assistant produces (reasoning, content, tool calls and
  the closing `</longcat_s>`). Label of position t = id[t+1] where mask[t+1] = 1, else -100.
- Bad lines (invalid JSON, no `messages`, a template error) and conversations with no assistant token are
  skipped and counted, never fatal; an empty result is an error. Conversations longer than seq_len + 1
  tokens are truncated (counted; dropped when no assistant token is left).
- One conversation per row, right-padded with `<pad>` (label -100) to the longest row of the batch: no
  packing, so no attention across conversations. Order: an epoch-specific permutation from
  `np.random.default_rng([seed, epoch])`; the resumable state is (epoch, index), like `data.BatchSampler`.
  A step takes batch_size × world rows, rank r gets slice r.
- `--group-by-length` (transformers' `group_by_length`, the sampler of its LengthGroupedSampler): the
  epoch's permutation is cut into windows of 64 steps' rows, each window sorted by length (longest first),
  and the steps' row blocks are shuffled, so a step holds conversations of similar length and the padding
  (half of the compute on a mix of 50- to 640-token conversations) mostly goes, while every conversation
  is still seen once per epoch in a seed-determined order. The order is a function of (seed, epoch), so
  resume stays exact.
- Validation: `--val-data`, else a deterministic 5 % of the conversations (at least 1 when there are 20 or
  more; none below that).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longcat2.train.config import IGNORE, TrainConfig, TrainingError
from longcat2.train.run_checkpoint import resolve_init

VAL_SHARE = 0.05
GROUP_WINDOW = 64  # steps per length-sorted window of --group-by-length


def encode_example(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tokenizer, seq_len: int
) -> tuple[list[int], list[int], bool, bool]:
    """(input ids, labels, truncated, has assistant tokens at all) for one conversation; labels are -100
    off the assistant tokens."""
    from longcat2.chat import render_with_mask

    ids, mask = render_with_mask(messages, tools, tokenizer)
    has_assistant = any(mask[1:])
    truncated = len(ids) > seq_len + 1
    ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1], labels, truncated, has_assistant


def load_conversations(
    path: str | Path, tokenizer, seq_len: int
) -> tuple[list[tuple[list[int], list[int]]], dict[str, Any]]:
    from longcat2.chat import ChatFormatError

    p = Path(path)
    if not p.is_file():
        raise TrainingError(f"sft data: {p} is not a file (expected a .jsonl of {{'messages': [...]}} lines)")
    examples: list[tuple[list[int], list[int]]] = []
    report: dict[str, Any] = {
        "lines": 0, "bad": 0, "no_assistant": 0, "too_long": 0, "truncated": 0, "first_error": None,
    }  # fmt: skip
    with open(p, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            report["lines"] += 1
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
                    raise ValueError("no 'messages' list")
                tools = obj.get("tools")
                if tools is not None and not isinstance(tools, list):
                    raise ValueError("'tools' must be a list")
                x, y, cut, has_assistant = encode_example(obj["messages"], tools, tokenizer, seq_len)
            except (ValueError, ChatFormatError, TypeError, KeyError) as e:
                report["bad"] += 1
                report["first_error"] = report["first_error"] or f"line {lineno}: {e}"
                continue
            if all(v == IGNORE for v in y):
                report["no_assistant" if not has_assistant else "too_long"] += 1
                continue
            report["truncated"] += int(cut)
            examples.append((x, y))
    return examples, report


class SFTTask:
    """Batches of padded conversations; see the module docstring."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int) -> None:
        from longcat2.tokenizer import TokenizerError, load_tokenizer

        self.cfg, self.rank, self.world = cfg, rank, world
        tok_dir = cfg.tokenizer
        if tok_dir is None and cfg.init:
            init_dir = resolve_init(cfg.init)
            if (init_dir / "tokenizer.json").is_file():
                tok_dir = str(init_dir)
        if tok_dir is None:
            raise TrainingError(
                "sft: no tokenizer; pass --tokenizer DIR or an --init checkpoint that contains one"
            )
        self.tokenizer_dir = Path(tok_dir)
        try:
            self.tokenizer = load_tokenizer(self.tokenizer_dir)
        except TokenizerError as e:
            raise TrainingError(f"tokenizer: {e}") from e
        self.pad_id = self.tokenizer.pad_id
        examples, self.report = load_conversations(cfg.data, self.tokenizer, cfg.seq_len)
        if not examples:
            raise TrainingError(
                f"sft data: no usable conversation in {cfg.data} ({self.report['lines']} lines, "
                f"{self.report['bad']} bad, {self.report['no_assistant']} without assistant tokens, "
                f"{self.report['too_long']} with none in the first --seq-len {cfg.seq_len} tokens; "
                f"first error: {self.report['first_error']})"
            )
        if cfg.val_data:
            self.val, _ = load_conversations(cfg.val_data, self.tokenizer, cfg.seq_len)
            self.train = examples
        else:
            n_val = int(round(len(examples) * VAL_SHARE)) if len(examples) >= 20 else 0
            order = np.random.default_rng([cfg.seed, 7]).permutation(len(examples))
            val_idx = set(order[:n_val].tolist())
            self.val = [e for i, e in enumerate(examples) if i in val_idx]
            self.train = [e for i, e in enumerate(examples) if i not in val_idx]
        self.epoch = 0
        self.index = 0
        self._perm: tuple[int, np.ndarray] | None = None
        self.bytes_per_token = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            rng = np.random.default_rng([self.cfg.seed, self.epoch])
            order = rng.permutation(len(self.train))
            if self.cfg.group_by_length:
                order = self._grouped(order, rng)
            self._perm = (self.epoch, order)
        return self._perm[1]

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`order` with each window of GROUP_WINDOW steps' rows sorted by length (longest first) and the steps' row
        blocks shuffled; a last partial block stays last (see the module docstring)."""
        step = self.cfg.batch_size * self.world
        lengths = np.array([len(x) for x, _ in self.train])
        window = GROUP_WINDOW * step
        parts = [order[i : i + window] for i in range(0, len(order), window)]
        order = np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in parts])
        n_full = len(order) // step
        blocks = order[: n_full * step].reshape(n_full, step)[rng.permutation(n_full)]
        return np.concatenate([blocks.reshape(-1), order[n_full * step :]])

    def collate(self, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(x) for x, _ in rows)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (ids, labels) in enumerate(rows):
            x[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            y[i, : len(labels)] = torch.tensor(labels, dtype=torch.long)
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.cfg.batch_size * self.world
        picked: list[int] = []
        while len(picked) < need:
            perm = self._permutation()
            take = perm[self.index : self.index + need - len(picked)]
            picked.extend(take.tolist())
            self.index += len(take)
            if self.index >= len(perm):
                self.epoch, self.index = self.epoch + 1, 0
        mine = picked[self.rank * self.cfg.batch_size : (self.rank + 1) * self.cfg.batch_size]
        return self.collate([self.train[i] for i in mine])

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not self.val or n <= 0:
            return []
        b = self.cfg.batch_size
        rows = self.val[self.rank :: self.world]
        return [self.collate(rows[i : i + b]) for i in range(0, min(len(rows), n * b), b)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "examples": len(self.train), "seed": self.cfg.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("examples", -1)) != len(self.train):
            raise TrainingError(
                f"sft data changed since the checkpoint ({state.get('examples')} training conversations then, "
                f"{len(self.train)} now); resume needs the same --data"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = None

    def describe(self) -> str:
        r = self.report
        return (
            f"sft data {self.cfg.data}: {len(self.train)} train / {len(self.val)} val conversations "
            f"({r['bad']} bad lines, {r['no_assistant']} without assistant tokens, {r['too_long']} dropped and "
            f"{r['truncated']} truncated at --seq-len {self.cfg.seq_len})"
        )
