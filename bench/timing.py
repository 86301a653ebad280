"""Shared timing rules for the benchmarks in bench/.

Design choices:
- Every arm gets the same warm-up and the same number of timed repeats; the arms take turns within each
  repeat (interleaved), so background load on a shared machine hits every arm alike.
- The statistic is the median, printed with the spread (min–max) of the repeats; a ratio between two arms is
  the median of the per-repeat ratios (repeat i of arm a over repeat i of arm b, which ran back to back),
  with its spread.
- `load_average()` goes next to every table, so a reader can judge how quiet the machine was.
- The garbage collector is run before the timed rounds and kept off during them, as `timeit` does: a full
  collection of a process holding two LongCat-2.0-dims models scans ~170K objects in ~85 ms, and it
  landed in whichever arm happened to cross the threshold (one turn in five at 2.4x its median).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence


def interleaved(
    arms: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    before: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each arm: `warmup` untimed rounds, then `repeats` timed rounds, arms in turn
    (the garbage collector off during them: module doc); `before` (e.g. a cache flush) runs ahead of every
    timed call, outside its timing."""
    if repeats < 1:
        raise ValueError(f"repeats: at least 1, got {repeats}")
    for _ in range(warmup):
        for fn in arms.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in arms}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in arms.items():
                if before is not None:
                    before()
                t = clock()
                fn()
                times[name].append(clock() - t)
    finally:
        if was_enabled:
            gc.enable()
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """'median [min–max]' of xs × scale."""
    return f"{median(xs) * scale:.{digits}f} [{min(xs) * scale:.{digits}f}–{max(xs) * scale:.{digits}f}]"


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-repeat ratios num[i] / den[i] (paired repeats of two interleaved arms)."""
    if len(num) != len(den):
        raise ValueError(f"ratios: {len(num)} vs {len(den)} repeats")
    return [a / b for a, b in zip(num, den)]


def ratio_spread(num: Sequence[float], den: Sequence[float], digits: int = 2) -> str:
    """'median× [min–max]' of the per-repeat ratios."""
    r = ratios(num, den)
    return f"{median(r):.{digits}f}x [{min(r):.{digits}f}–{max(r):.{digits}f}]"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"
