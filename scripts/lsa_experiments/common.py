"""Shared helpers of the LSA experiments (scripts/lsa_experiments/e*.py).

- `train(out, *flags)`: one `python -m longcat2 train` call (`--threads 1` unless LSA_THREADS, fp32, no MTP);
  skipped when OUT already holds its final checkpoint, so a rerun only does the missing stages; a failure
  that looks transient (another developer editing the trainer) is retried once after a minute.
- `derive(src_run, dst, **fields)`: an HF folder = the latest checkpoint of `src_run` with config fields
  changed (index_topk, index_local_tokens, rope_scaling, ...). `longcat2 train --init` ignores `--model`
  overrides for synthetic-task runs, so stage W/S runs with another top-k start from such a folder.
- `load(path, attention=..., **fields)`: a model in eval mode, dense (never select) or sparse, with config
  fields changed (e.g. YaRN scaling at evaluation time).
- `sublayer_recall(model, x)`: per attention sublayer, the dense attention mass (head-summed, L1-normalised
  causal row) captured by the keys the owner's indexer selected — for a cross-layer reuser too (E4).
- The protocol of sparse_attention.md §4.5: stage D (dense pre-training), stage W (indexer-only dense
  warm-up, dense-row KL), stage S (sparse, LM loss + selected-set KL) and the dense control C (continue D).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
RUNS = Path(os.environ.get("LSA_RUNS", REPO / "runs" / "lsa"))
FIGS = REPO / "docs" / "figures"
RESULTS = REPO / "scripts" / "lsa_experiments" / "results"

COMMON = [
    "--threads",
    os.environ.get("LSA_THREADS", "1"),
    "--precision",
    "fp32",
    "--mtp-weight",
    "0",
    "--no-progress",
    "--keep-checkpoints",
    "1",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def latest(run: str | Path) -> Path | None:
    from longcat2.train.run_checkpoint import latest_checkpoint

    p = Path(run)
    if (p / "config.json").is_file():
        return p
    return latest_checkpoint(p / "checkpoints")


def done(run: Path, steps: int) -> bool:
    ck = latest(run)
    return ck is not None and ck.name == f"step_{steps:08d}"


def train(out: Path, steps: int, flags: list[str]) -> dict[str, Any]:
    """Run one training stage (skipped if finished). Returns {'wall_s', 'metrics': [train records]}."""
    out = Path(out)
    t0 = time.time()
    if not done(out, steps):
        cmd = [PY, "-m", "longcat2", "train", "--out", str(out), "--steps", str(steps), *COMMON, *flags]
        if latest(out) is not None:
            cmd.append("--resume")
        log("$ " + " ".join(cmd[1:]))
        for attempt in range(2):
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if r.returncode == 0:
                break
            sys.stderr.write(r.stderr[-3000:])
            if attempt == 0:
                log(f"train failed (rc {r.returncode}); retrying in 60 s")
                time.sleep(60)
                if latest(out) is not None and "--resume" not in cmd:
                    cmd.append("--resume")
        else:
            raise SystemExit(f"training stage {out} failed")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_recs = [r for r in recs if r.get("type") == "train"]
    wall = sum(r.get("step_time_s", 0.0) for r in train_recs)
    log(f"{out.name}: {steps} steps, {wall:.0f} s of step time (this call {time.time() - t0:.0f} s)")
    return {"wall_s": wall, "metrics": train_recs, "evals": [r for r in recs if r.get("type") == "eval"]}


def warmup_stage(out: Path, steps: int, flags: list[str], init: str | Path) -> dict[str, Any]:
    """Stage W: only the indexers train, on the dense-row KL, with dense attention."""
    return train(
        out, steps,
        [*flags, "--init", str(init), "--train-only", "indexer", "--attention", "dense",
         "--indexer-loss", "1", "--indexer-warmup", str(steps)],
    )  # fmt: skip


def sparse_and_control(root: Path, steps: int, flags: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage S (sparse from root/W, indexer KL on the selected set) and the dense control C (from root/D),
    same steps, LR and data."""
    s = train(
        root / "S", steps, [*flags, "--init", str(root / "W"), "--attention", "sparse", "--indexer-loss", "1"]
    )
    c = train(root / "C", steps, [*flags, "--init", str(root / "D"), "--attention", "dense"])
    return s, c


def prepare_task(out: Path, task: str, seq: int, rows: int, val_rows: int = 64) -> Path:
    """`longcat2 prepare --task` into `out` (skipped when it is already there with these settings)."""
    from longcat2.train.synthetic import read_task_meta

    meta = read_task_meta(out)
    if (
        meta
        and meta["seq_len"] == seq
        and meta["splits"]["train"]["rows"] >= rows
        and meta["spec"] == f"task:{task}"
    ):
        return out
    cmd = [PY, "-m", "longcat2", "prepare", "--task", task, "--seq-len", str(seq), "--examples", str(rows),
           "--val-examples", str(val_rows), "--out", str(out)]  # fmt: skip
    log("$ " + " ".join(cmd[1:]))
    subprocess.run(cmd, cwd=REPO, check=True)
    return out


def mean_last(metrics: list[dict], key: str, n: int = 10) -> float | None:
    vals = [r[key] for r in metrics if r.get(key) is not None][-n:]
    return sum(vals) / len(vals) if vals else None


def derive(src_run: str | Path, dst: str | Path, **fields: Any) -> Path:
    """Copy the latest checkpoint of src_run (weights + config) to dst with config fields changed."""
    src = latest(src_run)
    assert src is not None, f"no checkpoint in {src_run}"
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            shutil.copyfile(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(fields)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def load(path: str | Path, attention: str = "sparse", **fields: Any):
    """Model from a run dir / checkpoint, eval mode; `fields` change the config (shape-preserving only)."""
    import tempfile

    import torch

    from longcat2.model.attention import set_sparse_attention
    from longcat2.model.longcat import LongCatForCausalLM

    torch.set_num_threads(1)
    src = latest(path)
    assert src is not None, f"no checkpoint in {path}"
    if fields:
        with tempfile.TemporaryDirectory() as tmp:
            model = LongCatForCausalLM.from_pretrained(
                derive(src, Path(tmp) / "m", **fields), dtype=torch.float32
            )
    else:
        model = LongCatForCausalLM.from_pretrained(src, dtype=torch.float32)
    set_sparse_attention(model, attention == "sparse")
    return model.eval()


def sublayer_recall(model, x, answer_rows=None) -> list[dict[str, float]]:
    """Per decoder layer: recall of the owner's selection w.r.t. the owner's and the reuser's own dense
    attention (rows that see more than index_topk keys). The model must have sparse attention on.
    `x` may be the (ids, answer_rows) pair of `task_batch`: then `subN_ans` is the recall on the rows that
    predict answer tokens only (filler rows attend diffusely and dominate the all-row mean)."""
    needle = None
    if isinstance(x, tuple):
        x, answer_rows, needle = (*x, None)[:3]
    import torch

    from longcat2.model.attention import MLA
    from longcat2.train.sparse import attention_distribution

    caps: dict[int, tuple] = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, MLA):
            hooks.append(
                m.register_forward_hook(
                    lambda mod, a, o: caps.__setitem__(id(mod), (a[0], a[1], a[2], a[3], o[1]))
                )
            )
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = []
    for li, layer in enumerate(model.model.layers):
        attns = list(layer.self_attn)
        owner_idx = None
        row: dict[str, float] = {"layer": li}
        for si, attn in enumerate(attns):
            xx, cos, sin, pos, idx = caps[id(attn)]
            owner_idx = idx if attn.indexer is not None else owner_idx
            if owner_idx is None:
                row[f"sub{si}"] = row[f"sub{si}_oracle"] = 1.0
                if answer_rows is not None:
                    row[f"sub{si}_ans"] = 1.0
                if needle is not None:
                    row[f"sub{si}_needle"] = 1.0
                continue
            t = xx.shape[1]
            topk = attn.cfg.index_topk
            long_rows = (pos + 1) > topk
            p = attention_distribution(attn, xx, cos, sin, pos, slice(0, t))  # [B, T, T]
            sel = owner_idx
            got = p.gather(-1, sel.clamp(min=0)).masked_fill(sel < 0, 0.0).sum(-1)  # [B, T]
            row[f"sub{si}"] = float(got[:, long_rows].mean())
            # oracle: the best any k keys can capture (top-k of the target itself) -> recall's upper bound
            best = p.topk(min(topk, t), dim=-1).values.sum(-1)
            row[f"sub{si}_oracle"] = float(best[:, long_rows].mean())
            if answer_rows is not None:
                mask = answer_rows & long_rows[None, :]
                row[f"sub{si}_ans"] = float(got[mask].mean()) if bool(mask.any()) else 1.0
            if needle is not None and answer_rows is not None:
                # share of the needle tokens (e.g. KEY d1..d5 SEP) inside the selected set, on answer rows
                chosen = torch.zeros(sel.shape[0], sel.shape[1], t, dtype=torch.bool)
                chosen.scatter_(-1, sel.clamp(min=0), sel >= 0)
                hit = (chosen & needle[:, None, :]).sum(-1).float() / needle.sum(-1, keepdim=True).clamp(
                    min=1
                )
                mask = answer_rows & long_rows[None, :]
                row[f"sub{si}_needle"] = float(hit[mask].mean()) if bool(mask.any()) else 1.0
        out.append(row)
    return out


def task_batch(task: str, n: int, length: int, seed: int = 777, **kw):
    """(ids [n, length], answer_rows [n, length] bool: positions whose next token is an answer token)."""
    import numpy as np
    import torch

    from longcat2.evals.tasks import make_examples

    ex = make_examples(task, n, length, seed, **kw)
    w = max(len(e.tokens) for e in ex)
    ids = np.zeros((n, w), dtype=np.int64)
    rows = np.zeros((n, w), dtype=bool)
    needle = np.zeros((n, w), dtype=bool)
    from longcat2.evals.tasks import TaskVocab

    mk = TaskVocab().markers
    for i, e in enumerate(ex):
        ids[i, : len(e.tokens)] = e.tokens
        for a, b in e.answers:
            rows[i, a - 1 : b - 1] = True
        if task == "passkey":  # needle = KEY d1..dn SEP
            k = int(np.nonzero(e.tokens == mk["KEY"])[0][0])
            needle[i, k : k + len(e.answers and range(*e.answers[0])) + 2] = True
    if task != "passkey":
        return torch.from_numpy(ids), torch.from_numpy(rows)
    return torch.from_numpy(ids), torch.from_numpy(rows), torch.from_numpy(needle)


def longctx(model, task: str, lengths: list[int], depths: int, per_cell: int, **kw) -> dict[str, Any]:
    from longcat2.evals.longctx import evaluate_longctx

    return evaluate_longctx(model, task, lengths, depths=depths, per_cell=per_cell, **kw)


def save_json(name: str, obj: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(obj, indent=2) + "\n")
    log(f"wrote {p.relative_to(REPO)}")
    return p


def figure(name: str):
    """The path of figure `name` (docs/figures/NAME.png), with matplotlib on Agg; save with `save_figure`."""
    import matplotlib

    matplotlib.use("Agg")
    FIGS.mkdir(parents=True, exist_ok=True)
    return FIGS / f"{name}.png"


def save_figure(fig, path: Path) -> None:
    """Tight layout, 80 dpi (keeps the PNGs < 200 KB), close, log."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    log(f"wrote {path}")


def metric_series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in metrics if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]
