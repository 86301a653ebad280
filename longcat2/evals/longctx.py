"""Long-context evaluation: accuracy of a model on synthetic tasks per length × needle depth.

Design choices:
- Scored through the inference engine, the path users are served with: each prompt is prefilled into the
  paged cache up to its first answer token (chunked), then the rest of the example is fed one true token
  per step as cached decode (sparse LSA decode once the context exceeds index_topk). Exact match per
  answer span = every answer token is the argmax given the true prefix (teacher forcing, equal to greedy
  decoding of the answer). MQAR reports the fraction of queries answered.
- Examples are batched: one engine step carries a prefill chunk or a decode row of every example of the
  batch; the model runs in eval mode without gradient.
- Output: a JSON-able dict {task, lengths, depths, accuracy[length][depth], mean}, and optionally a heatmap
  PNG (matplotlib, Agg backend).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longcat2.engine.runner import ModelRunner, Segment
from longcat2.evals.tasks import Example, TaskVocab, make_examples


@torch.no_grad()
def predict_answers(
    model: torch.nn.Module,
    examples: list[Example],
    batch_size: int = 4,
    prefill_chunk: int = 2048,
    index_dtype: str | None = None,
) -> list[dict[int, int]]:
    """Per example {position t: the engine's argmax prediction of token t given tokens < t}, for every t
    from the first answer token to the end (prefill + teacher-forced cached decode). index_dtype: the
    engine's index-key cache ("bf16", "fp8", None = the model dtype)."""
    runner = ModelRunner(model, block_size=128, index_dtype=index_dtype)
    preds: list[dict[int, int]] = []
    for b0 in range(0, len(examples), batch_size):
        batch = examples[b0 : b0 + batch_size]
        toks = [torch.from_numpy(e.tokens) for e in batch]
        seqs = [runner.new_sequence(e.tokens.tolist()) for e in batch]  # (N-gram history)
        first = [e.answers[0][0] for e in batch]  # prefill positions < first
        out: list[dict[int, int]] = [{} for _ in batch]
        done = [0] * len(batch)
        while True:  # chunked prefill; the last chunk's last row predicts token `first`
            segs, who = [], []
            for i, (d, f) in enumerate(zip(done, first)):
                if d < f:
                    n = min(prefill_chunk, f - d)
                    segs.append(Segment(seqs[i], toks[i][d : d + n], d, "last" if d + n == f else "none"))
                    who.append(i)
                    done[i] = d + n
            if not segs:
                break
            step = runner.forward(segs)
            for logits, i in zip(step.logits, who):
                if logits is not None:
                    out[i][first[i]] = int(logits[0].argmax())
        for t_off in range(max(len(e.tokens) - f for e, f in zip(batch, first)) - 1):  # decode
            segs, who = [], []
            for i, (e, f) in enumerate(zip(batch, first)):
                t = f + t_off  # feed the true token t, predict t + 1
                if t < len(e.tokens) - 1:
                    segs.append(Segment(seqs[i], toks[i][t : t + 1], t, "last"))
                    who.append(i)
            step = runner.forward(segs)
            for logits, i in zip(step.logits, who):
                out[i][first[i] + t_off + 1] = int(logits[0].argmax())
        for seq in seqs:
            runner.free(seq)
        preds.extend(out)
    return preds


def exact_match(example: Example, pred: dict[int, int]) -> float:
    """The fraction of answer spans whose tokens are all predicted exactly (pred: position → token)."""
    ok = [all(pred.get(t) == int(example.tokens[t]) for t in range(a, b)) for a, b in example.answers]
    return float(np.mean(ok))


def score_examples(model: torch.nn.Module, examples: list[Example], batch_size: int = 4) -> list[float]:
    """Per-example accuracy through the engine (see `predict_answers` and `exact_match`)."""
    return [exact_match(e, p) for e, p in zip(examples, predict_answers(model, examples, batch_size))]


def evaluate_longctx(
    model: torch.nn.Module,
    task: str,
    lengths: list[int],
    depths: int = 5,
    per_cell: int = 8,
    seed: int = 1234,
    vocab: TaskVocab | None = None,
    batch_size: int = 4,
    predict: Callable[[list[Example]], list[dict[int, int]]] | None = None,
    index_dtype: str | None = None,
    **task_kw: Any,
) -> dict[str, Any]:
    """Accuracy per length x depth cell. `predict(examples)` gives the predicted token per answer position
    of each example; by default the model's, through the engine (`predict_answers`)."""
    if predict is None:

        def predict(examples: list[Example]) -> list[dict[int, int]]:
            return predict_answers(model, examples, batch_size, index_dtype=index_dtype)

    depth_grid = [round(d, 3) for d in np.linspace(0, 1, depths)] if depths > 1 else [0.5]
    acc: dict[str, dict[str, float]] = {}
    for li, length in enumerate(lengths):
        acc[str(length)] = {}
        for di, depth in enumerate(depth_grid):
            ex = make_examples(task, per_cell, length, seed + 1000 * li + di, [depth], vocab, **task_kw)
            acc[str(length)][str(depth)] = float(
                np.mean([exact_match(e, p) for e, p in zip(ex, predict(ex))])
            )
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
