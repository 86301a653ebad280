"""Validation loss, bits per byte and trailing-token loss on prepared token shards.

Design choices:
- The validation split is cut into non-overlapping windows of `seq_len` tokens (in order, deterministic);
  loss is the mean next-token cross entropy over all predicted positions.
- Bits per byte = total nats / ln 2 / UTF-8 bytes of the split's text (from the shard meta), so models with
  different tokenizers compare.
- Trailing-token loss = loss on the last `trailing` positions of each full window only: the long-range
  signal that average loss hides (MoBA's metric).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from longcat2.data import load_split, read_meta


@torch.no_grad()
def evaluate_ppl(
    model: torch.nn.Module,
    shard_dir: str | Path,
    seq_len: int = 512,
    batch_size: int = 4,
    max_windows: int | None = None,
    trailing: int = 0,
) -> dict[str, Any]:
    tokens = load_split(shard_dir, "val")
    meta = read_meta(shard_dir)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(
            f"val split of {shard_dir}: {len(tokens)} tokens, fewer than seq_len+1 ({seq_len + 1})"
        )
    if max_windows:
        n_windows = min(n_windows, max_windows)
    device = next(model.parameters()).device
    total_nats = 0.0
    total_tokens = 0
    trail_nats, trail_count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(start + batch_size, n_windows))
        chunk = np.stack(
            [np.asarray(tokens[r * seq_len : (r + 1) * seq_len + 1], dtype=np.int64) for r in rows]
        )
        ids = torch.from_numpy(chunk).to(device)
        logits = model(ids[:, :-1]).float()
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
            len(rows), -1
        )
        total_nats += float(nll.sum())
        total_tokens += nll.numel()
        if trailing:
            trail_nats += float(nll[:, -trailing:].sum())
            trail_count += nll[:, -trailing:].numel()
    loss = total_nats / total_tokens
    split = meta["splits"]["val"]
    bytes_per_token = split["text_bytes"] / max(1, split["tokens"])
    out: dict[str, Any] = {
        "val_loss": loss,
        "bits_per_byte": loss / math.log(2) / bytes_per_token,
        "tokens": total_tokens,
        "windows": n_windows,
        "seq_len": seq_len,
    }
    if trailing:
        out["trailing_loss"] = trail_nats / trail_count
        out["trailing"] = trailing
    return out
