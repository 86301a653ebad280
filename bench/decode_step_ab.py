"""One engine choice off and on, in one process: the whole decode step of `decode_lsa.py`'s engine table
(the same stepper: a model preset, B sequences at a synthetic context), steps alternating between the two
arms, so that both see the same machine state (this box's speed drifts by 10-20 % over minutes, more than
the effects measured here).

Choices (each a real knob of the engine, not a patch of it):
- `linear-broadcast`: fp32 linear products of `native.LINEAR_BROADCAST_ROWS` rows through the C broadcast
  tiles (on) or oneDNN (off: the row set emptied);
- `batched-select`: a step's LSA decode rows of several sequences selecting together (on) or one by one
  (off: `AttentionSettings.decode_select_min_rows` past the batch).

Prints each arm's median ms per step and the median [min-max] of the per-pair ratios off / on (timing as
bench/timing.py: one warm-up step per arm, the garbage collector off while timing).

    .venv/bin/python bench/decode_step_ab.py --choice linear-broadcast --batch 32 --length 8192
    .venv/bin/python bench/decode_step_ab.py --choice batched-select --batch 32 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_lsa import engine_stepper  # noqa: E402
from timing import interleaved, load_average, median  # noqa: E402

from longcat2.engine import native  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--choice", choices=["linear-broadcast", "batched-select"], required=True)
    ap.add_argument("--preset", default="attn-2.0", help='a ModelConfig preset or "attn-2.0"')
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = native.LINEAR_BROADCAST_ROWS
    with torch.inference_mode():
        step = engine_stepper(args.length, True, 2 * args.pairs + 4, args.preset, args.dtype, args.batch)
        settings = step.runner.attention  # type: ignore[attr-defined]
        select_min = settings.decode_select_min_rows

        def arm(on: bool) -> None:
            if args.choice == "linear-broadcast":
                native.LINEAR_BROADCAST_ROWS = rows if on else frozenset()
            else:
                settings.decode_select_min_rows = select_min if on else args.batch + 1

        print(f"# {' '.join(sys.argv)}")
        print(f"# torch {torch.__version__}, {args.threads} thread(s); {load_average()} at start")

        def run(on: bool) -> None:
            arm(on)
            step()

        r = interleaved({"off": lambda: run(False), "on": lambda: run(True)}, args.pairs, warmup=1)
        arm(True)
        times = {False: r["off"], True: r["on"]}
    ratios = [a / b for a, b in zip(times[False], times[True])]
    print(
        f"{args.choice}, {args.preset}, batch {args.batch}, context {args.length}, {args.dtype}: "
        f"off {median(times[False]) * 1e3:.2f} ms, on {median(times[True]) * 1e3:.2f} ms per step; "
        f"off/on {median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] over {args.pairs} pairs"
    )
    print(f"# {load_average()} at the end")


if __name__ == "__main__":
    main()
