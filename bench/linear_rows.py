"""fp32 linear products of a decode batch's few rows: the C kernels (`native.linear`) against oneDNN, by rows.

Three arms per (weight, rows), cold weights (a 64 MB buffer written before every call), 1 thread:
- `broadcast`: the C broadcast tiles (rows in vector lanes, each weight element broadcast; `nt_bcast`);
- `2-row`: the C 2-row x 8-weight-row tiles with lane sums (the broadcast threshold raised past the rows);
- `onednn`: `engine.cpu.onednn_linear`, what the engine calls outside the C kernels' rows.

The C arms run every row count here; the engine itself takes C only for up to `native.LINEAR_MAX_ROWS` rows
and `native.LINEAR_BROADCAST_ROWS` (this table is how those were chosen). Arms interleaved
(bench/timing.py), the flush before each call outside its timing; GFLOP/s of the median time.

    .venv/bin/python bench/linear_rows.py
    .venv/bin/python bench/linear_rows.py --rows 16,32 --shapes 1536x12288
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved, load_average, median  # noqa: E402

from longcat2.engine import native  # noqa: E402
from longcat2.engine.cpu import keep_freed_memory, onednn_linear  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8,12,16,24,32,40,48,64")
    ap.add_argument(
        "--shapes",
        default="1536x12288,8192x512,1536x4096",
        help="in x out features (LongCat-2.0's q_b_proj, o_proj, indexer wq_b)",
    )
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lib = native.library()
    if lib is None:
        print("# the C kernels are not built here (native.library() is None): nothing to compare")
        return
    keep_freed_memory()  # as the engine runs (ModelRunner)
    min_rows = ctypes.c_int.in_dll(lib, "lc2_nt_bc_min_rows")
    default_min = min_rows.value
    native.LINEAR_MAX_ROWS = {**native.LINEAR_MAX_ROWS, torch.float32: 1 << 20}  # every row count in C
    native.LINEAR_MIN_WEIGHT_ROWS = 0
    flush = torch.empty(16 << 20)
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, 1 thread; {load_average()} at start")
    rows = [int(r) for r in args.rows.split(",")]
    print("| weight (in x out) | " + " | ".join(f"{r} rows" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k)
        cells = []
        for m in rows:
            x = torch.randn(m, k)
            ref = x @ w.t()

            def c_tiles(threshold: int, x: torch.Tensor = x, w: torch.Tensor = w) -> torch.Tensor | None:
                min_rows.value = threshold
                try:
                    return native.linear(x, w)
                finally:
                    min_rows.value = default_min

            arms = {
                "broadcast": lambda: c_tiles(default_min),
                "2-row": lambda: c_tiles(1 << 30),
                "onednn": lambda x=x, w=w: onednn_linear(x, w),
            }
            for fn in arms.values():
                y = fn()
                if y is None or not torch.allclose(y, ref, rtol=1e-4, atol=1e-3):
                    raise SystemExit(f"{shape}, {m} rows: an arm's product differs from x @ w.t()")
            t = interleaved(arms, args.repeats, warmup=0, before=lambda: flush.add_(1.0))
            rate = {a: 2 * m * k * n / median(v) / 1e9 for a, v in t.items()}
            cells.append(f"{rate['broadcast']:.0f} / {rate['2-row']:.0f} / {rate['onednn']:.0f}")
        print(f"| {k} x {n} | " + " | ".join(cells) + " |", flush=True)
    print("(GFLOP/s: broadcast / 2-row / oneDNN)")
    print(f"# {load_average()} at the end")


if __name__ == "__main__":
    main()
