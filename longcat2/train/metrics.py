"""OUT/metrics.jsonl and OUT/loss.png: reading, cutting back on resume, plotting.

Design choices:
- One JSON object per line: `train` records (one per step) and `eval` records (val loss, bits per byte);
  a torn last line (a kill mid-write) is skipped when reading, so the file is always readable.
- On resume the file is cut back to the checkpoint's step (`truncate_metrics`, atomic rename), so it reads
  as one run. The plot is written atomically too and never fails a run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse metrics.jsonl, skipping a torn last line."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if isinstance(rec, dict):
                out.append(rec)
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only records with step <= `step` (atomically)."""
    keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> None:
    """Loss curve (train loss, its EMA, validation loss) → PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in recs if r.get("type") == "train" and r.get("loss") is not None]
    ev = [(r["step"], r["val_loss"]) for r in recs if r.get("type") == "eval"]
    tr = [(s, v) for s, v in tr if math.isfinite(v)]
    if not tr:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps, losses = zip(*tr)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="train loss")
    ema, smooth = losses[0], []
    for v in losses:
        ema = 0.9 * ema + 0.1 * v
        smooth.append(ema)
    ax.plot(steps, smooth, lw=1.5, label="train loss (EMA 0.9)")
    if ev:
        es, el = zip(*ev)
        ax.plot(es, el, "o-", lw=1.5, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png_path)
    tmp = png.with_name(".tmp-" + png.name)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, png)
