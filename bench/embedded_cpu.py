"""The embedded model on CPU through the engine: decode tokens/s and a long prompt's prefill, first and cached.

What a laptop user of `longcat2 generate` / `serve` waits on (issue 21): the embedded `longcat-2.0-tiny`
model (longcat2/assets/default-model, fp32), `--threads` threads (default 1), the Engine's default 512-token
prefill chunks. Arms, taking turns within each of `--repeats` rounds after one warm-up round
(bench/timing.py rules):
- decode: a 64-token prompt → `--new-tokens` greedy tokens (EOS ignored), new tokens/s;
- prefill, first: a `--prompt-len`-token random prompt → 1 token on a fresh Engine (empty prefix cache);
- prefill, cached: the same prompt again on that Engine (the prefix cache holds its blocks).
Each is the median [min–max], in CPU time of this process (1 thread: on a shared machine wall time mostly
measures the other processes; on a quiet one they agree). To compare with an older checkout, run this file with PYTHONPATH pointing at
that checkout (the script only uses the public Engine API):

    .venv/bin/python bench/embedded_cpu.py
    git worktree add /tmp/base <commit> && PYTHONPATH=/tmp/base .venv/bin/python bench/embedded_cpu.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved, load_average, spread  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-len", type=int, default=29_000)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import longcat2
    from longcat2 import LongCatForCausalLM
    from longcat2.engine import Engine, SamplingParams

    path = Path(longcat2.__file__).parent / "assets" / "default-model"
    model = LongCatForCausalLM.from_pretrained(path).eval()
    v = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    long_prompt = torch.randint(4, v, (args.prompt_len,), generator=g).tolist()
    short = torch.randint(4, v, (64,), generator=g).tolist()
    blocks = -(-(args.prompt_len + 16) // 256) * 2 + 8  # one live copy + one in the prefix cache
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    state: dict = {}

    def decode() -> None:
        eng = Engine(model, max_batch_size=1, num_blocks=8, prefix_cache_bytes=0)
        eng.generate([short], SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))

    def first() -> None:
        state["eng"] = Engine(model, max_batch_size=1, num_blocks=blocks)
        state["eng"].generate([long_prompt], one)

    def cached() -> None:
        state["eng"].generate([long_prompt], one)

    arms = {"decode": decode, "first": first, "cached": cached}
    times = interleaved(arms, args.repeats, clock=time.process_time)
    print(f"# {' '.join(sys.argv)}; torch {torch.__version__}, {args.threads} thread(s), {load_average()}")
    print(f"# longcat2 from {Path(longcat2.__file__).parent}")
    print("| decode tok/s (CPU time) | prefill first CPU s | prefill cached CPU s |")
    print("|---|---|---|")
    tps = [args.new_tokens / t for t in times["decode"]]
    print(f"| {spread(tps, digits=1)} | {spread(times['first'])} | {spread(times['cached'])} |")
    print(f"# {load_average()}")


if __name__ == "__main__":
    main()
