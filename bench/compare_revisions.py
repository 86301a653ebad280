"""Training step and engine prefill/decode speed of two longcat2 checkouts, measured in one run.

Each measurement is a fresh process with `PYTHONPATH` set to one checkout (so each side imports its own
`longcat2`); the checkouts take turns round by round (the order alternates), every side gets the same
settings and repeats. CPU time of the process, 1 thread, fp32, random weights (seed 0). Settings:
  - train-2x128: forward + backward + AdamW of bench/train_throughput.py's model (hidden 512, 2 layers,
    64 routed + 32 zero experts, top-8, 43 M parameters), batch 2x128, median of 3 steps after 1 warm-up;
  - tiny-lsa: the `tiny` preset (LongCat-2.0 family, LSA top-64 active) through `longcat2.engine.generate`,
    1024-token prompt, 32 greedy tokens;
  - small-flash: bench/generate_vs_transformers.py's `small` LongCat-Flash (4 layers, d=512), same prompt.
  Engine: prefill = generate(max_new_tokens=1), decode tok/s = 31 / (total(32) - prefill); median of 3.
The table shows medians over rounds with [min–max], ratios are medians of per-round ratios. The run stops
with an error when the two sides' greedy tokens or training losses differ.

    git worktree add /tmp/before <commit>
    python bench/compare_revisions.py --before /tmp/before --after . --rounds 9
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_models import SMALL_FLASH, TRAIN_MODEL

ENGINE = {"tiny-lsa": ("tiny", {}), "small-flash": ("tiny-flash", SMALL_FLASH)}
SETTINGS = ["train-2x128", *ENGINE]
METRICS = {"train-2x128": ["tokens_per_s"], "tiny-lsa": ["prefill_s", "decode_tok_s"]}
METRICS["small-flash"] = METRICS["tiny-lsa"]


def worker(setting: str, repeats: int) -> dict:
    """One measurement in this process (the checkout on PYTHONPATH)."""
    import torch
    import torch.nn.functional as F

    from longcat2.config import ModelConfig
    from longcat2.model.longcat import LongCatForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if setting == "train-2x128":
        model = LongCatForCausalLM(ModelConfig(**TRAIN_MODEL)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        times, losses = [], []
        for i in range(repeats + 1):
            x, y = (torch.randint(0, 8192, (2, 128), generator=g) for _ in range(2))
            t0 = time.process_time()
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # step 0 is the warm-up
                times.append(time.process_time() - t0)
            losses.append(round(float(loss.detach()), 6))
        return {"tokens_per_s": 256 / statistics.median(times), "check": losses}
    from longcat2.engine import generate

    preset, overrides = ENGINE[setting]
    cfg = ModelConfig.from_preset(preset, **overrides)
    model = LongCatForCausalLM(cfg).eval()
    ids = torch.randint(4, cfg.vocab_size, (1, 1024), generator=g)

    def run(n: int):
        t0 = time.process_time()
        out = generate(model, ids, max_new_tokens=n, temperature=0.0)
        return time.process_time() - t0, out

    run(2)  # warm-up
    pre, dec = [], []
    for _ in range(repeats):
        t1, _ = run(1)
        tn, out = run(32)
        pre.append(t1)
        dec.append(31 / (tn - t1))
    tokens = torch.as_tensor(out).numpy().tobytes()
    return {
        "prefill_s": statistics.median(pre),
        "decode_tok_s": statistics.median(dec),
        "check": hashlib.sha1(tokens).hexdigest()[:12],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="checkout of the earlier revision")
    ap.add_argument("--after", type=Path, help="checkout of the later revision")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="measurements per process")
    ap.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats)))
        return
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    results: dict[tuple[str, str], list[dict]] = {(s, side): [] for s in SETTINGS for side in sides}
    loads = []
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        loads.append(os.getloadavg()[0])
        for side in order:
            env = {**os.environ, "PYTHONPATH": str(sides[side])}
            for setting in SETTINGS:
                cmd = [sys.executable, __file__, "--worker", setting, "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                results[(setting, side)].append(json.loads(out.splitlines()[-1]))
    loads.append(os.getloadavg()[0])

    def fmt(xs: list[float]) -> str:
        return f"{statistics.median(xs):.3g} [{min(xs):.3g}–{max(xs):.3g}]"

    print(f"# {' '.join(sys.argv)}")
    print(
        f"# before {sides['before']}, after {sides['after']}; {args.rounds} interleaved rounds, "
        f"{args.repeats} measurements per process; 1-minute load average {min(loads):.1f}–{max(loads):.1f} "
        f"({os.cpu_count()} CPUs)"
    )
    print("| setting | metric | before | after | after / before |")
    print("|---|---|---|---|---|")
    for setting in SETTINGS:
        a, b = results[(setting, "before")], results[(setting, "after")]
        if any(x["check"] != y["check"] for x, y in zip(a, b)):
            raise SystemExit(
                f"{setting}: the two revisions' outputs differ ({a[0]['check']} vs {b[0]['check']})"
            )
        for m in METRICS[setting]:
            ratios = [y[m] / x[m] for x, y in zip(a, b)]
            print(
                f"| {setting} | {m} | {fmt([x[m] for x in a])} | {fmt([y[m] for y in b])} | "
                f"{statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}] |"
            )
    print("same greedy tokens and training losses on both sides")


if __name__ == "__main__":
    main()
