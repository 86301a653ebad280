"""The training loss's parts: masked cross-entropy and the typed record of each part of a step's loss.

Design choices:
- Loss = next-token CE + `mtp_weight` · mean MTP CE (step k predicts token t+k+1, labels y[:, k:]) +
  `z_loss` · hidden z-loss + `balance_loss` · device-level balance loss (+ `indexer_loss` · the LSA indexer
  KL of `sparse.py`); the trainer adds them up, `LossParts` carries each one (detached, as floats) to the
  metrics: a field per part, the indexer recall per layer as a list in model order, no encoded key names.
- `first_token_loss` (SFT): the CE of the first labelled token of every labelled run (the first token of
  each assistant reply: a tool call's tag, a refusal's or an answer's first word), averaged over those
  tokens and added with its weight. One token of ~30 in a reply decides whether to call; in the mean CE its
  gradient is that small (docs/default-model.md, v9). The positions come from the labels alone.
- A part a run does not compute is None and stays out of metrics.jsonl; `LossParts.mean` averages the
  micro-batches of one optimizer step (grad accumulation) part by part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from longcat2.train.config import IGNORE


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean CE over labels != IGNORE (0 with a graph when there are none) and the count."""
    flat = labels.reshape(-1)
    n = int((flat != IGNORE).sum())
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE, reduction="sum"
    )
    return loss / max(n, 1), n


def first_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """`labels` [B, T] with only the first label of each run of labelled positions kept (IGNORE elsewhere)."""
    labelled = labels != IGNORE  # [B, T]
    before = torch.zeros_like(labelled)
    before[:, 1:] = labelled[:, :-1]
    return torch.where(labelled & ~before, labels, torch.full_like(labels, IGNORE))


def first_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`masked_ce` over the first label of each labelled run only, on just those rows of `logits` [B, T, V]
    (a reply's first token is ~1 position in 30: no second full-vocabulary pass over the batch)."""
    first = first_token_labels(labels)
    keep = first != IGNORE  # [B, T]
    return masked_ce(logits[keep], first[keep])  # [N, V], [N]


@dataclasses.dataclass
class LossParts:
    """The unweighted parts of one micro-batch's loss (or the mean over a step's micro-batches)."""

    ce: float
    mtp: float | None = None  # mean CE over the MTP steps
    z: float | None = None  # hidden z-loss
    first_token: float | None = None  # CE of the first token of each assistant reply (SFT)
    balance: float | None = None  # device-level balance loss
    indexer_kl: float | None = None  # LSA indexer distillation KL
    indexer_recall: float | None = None  # mean over the indexer-owning sublayers
    indexer_recall_ceiling: float | None = None
    indexer_recall_per_layer: list[float] = dataclasses.field(default_factory=list)  # model order

    @classmethod
    def mean(cls, parts: Sequence[LossParts]) -> LossParts:
        """Part-by-part mean; a part missing from any micro-batch is left out."""
        if not parts:
            raise ValueError("LossParts.mean of no parts")
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "indexer_recall_per_layer":
                out[f.name] = [sum(v / len(col) for v in col) for col in zip(*values)] if all(values) else []
            elif all(v is not None for v in values):
                out[f.name] = sum(v / len(values) for v in values)  # as accumulated
        return cls(**out)

    def metrics(self) -> dict[str, Any]:
        """The metrics.jsonl fields of the parts besides `loss` (= ce): `mtp_loss`, `z_loss`, `balance_loss`,
        `first_token_loss`, `indexer_kl`, `indexer_recall`, `indexer_recall_ceiling`, `indexer_recall_per_layer`."""
        rec: dict[str, Any] = {}
        for name in ("mtp", "z", "balance", "first_token"):
            value = getattr(self, name)
            if value is not None:
                rec[f"{name}_loss"] = value
        for name in ("indexer_kl", "indexer_recall", "indexer_recall_ceiling"):
            value = getattr(self, name)
            if value is not None:
                rec[name] = value
        if self.indexer_recall_per_layer:
            rec["indexer_recall_per_layer"] = list(self.indexer_recall_per_layer)
        return rec
