"""Long-context evaluation: accuracy of a model on synthetic tasks per length × needle depth.

Design choices:
- Exact match per example = every answer token is the argmax given the true prefix (one forward pass,
  equal to greedy decoding of the answer). MQAR reports the fraction of queries answered.
- Examples of the same length are batched; the model runs in eval mode without gradient.
- Output: a JSON-able dict {task, lengths, depths, accuracy[length][depth], mean}, and optionally a heatmap
  PNG (matplotlib, Agg backend).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longcat2.evals.tasks import Example, TaskVocab, make_examples


@torch.no_grad()
def score_examples(model: torch.nn.Module, examples: list[Example], batch_size: int = 4) -> list[float]:
    """Per-example accuracy: the fraction of answer spans whose tokens are all predicted exactly."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        width = max(len(e.tokens) for e in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e.tokens)] = torch.from_numpy(e.tokens)  # right padding never affects earlier logits
        pred = model(ids.to(device)).argmax(-1).cpu()  # pred[:, t] predicts token t+1
        for i, e in enumerate(batch):
            ok = [bool((pred[i, a - 1 : b - 1] == ids[i, a:b]).all()) for a, b in e.answers]
            scores.append(float(np.mean(ok)))
    return scores


def evaluate_longctx(
    model: torch.nn.Module,
    task: str,
    lengths: list[int],
    depths: int = 5,
    per_cell: int = 8,
    seed: int = 1234,
    vocab: TaskVocab | None = None,
    batch_size: int = 4,
    **task_kw: Any,
) -> dict[str, Any]:
    depth_grid = [round(d, 3) for d in np.linspace(0, 1, depths)] if depths > 1 else [0.5]
    acc: dict[str, dict[str, float]] = {}
    for li, length in enumerate(lengths):
        acc[str(length)] = {}
        for di, depth in enumerate(depth_grid):
            ex = make_examples(task, per_cell, length, seed + 1000 * li + di, [depth], vocab, **task_kw)
            acc[str(length)][str(depth)] = float(np.mean(score_examples(model, ex, batch_size)))
    mean = float(np.mean([v for row in acc.values() for v in row.values()]))
    return {"task": task, "lengths": lengths, "depths": depth_grid, "accuracy": acc, "mean": mean}


def heatmap(result: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array(
        [[result["accuracy"][str(L)][str(d)] for d in result["depths"]] for L in result["lengths"]]
    )
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(result["depths"]), 1.2 + 0.5 * len(result["lengths"])))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])), [str(x) for x in result["lengths"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title or f"{result['task']}: mean {result['mean']:.3f}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)
