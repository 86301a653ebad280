"""End-to-end generation: longcat2's engine vs transformers `generate` on the same LongcatFlash weights.

A random `LongcatFlashForCausalLM` (transformers) is saved with `save_pretrained` and loaded into
`LongCatForCausalLM.from_pretrained` (the project's checkpoint loader), so both sides run identical weights.
Greedy decoding, EOS disabled, 1 thread. Both sides are measured the same way (bench/timing.py): one
warm-up, then `--repeats` rounds in which the four runs take turns — transformers N tokens, engine N tokens,
transformers 1 token, engine 1 token. Per round: total = the N-token run (prefill + decode), first token =
the 1-token run, decode step = (total(N) − total(1)) / (N − 1), decode tok/s = batch / decode step. Tables
show medians with [min–max]; speed-ups are medians of the per-round ratios.
In fp32 the script stops with an error unless both sides produce the same tokens; in bf16 (different
rounding) it reports how many leading tokens agree.

Where the difference comes from: transformers keeps the MLA latent in its cache but re-expands it through
kv_b_proj for every cached token at every decode step (O(L·c·h·(nope+v)) per sublayer), runs MoE experts in
a Python loop over hit experts, and pads batched prompts; the engine decodes in absorbed form over the
latent (O(L·h·(2c+r))), groups experts, and batches requests of different lengths.

    .venv/bin/python bench/generate_vs_transformers.py                 # the default settings (~5 min)
    .venv/bin/python bench/generate_vs_transformers.py --settings small:bfloat16:4:1024:32
    .venv/bin/python bench/generate_vs_transformers.py --settings tiny-flash:float32:2:16:4 --repeats 2   # smoke
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import SMALL_FLASH  # noqa: E402
from timing import interleaved, load_average, median, ratio_spread, spread  # noqa: E402

from longcat2 import ModelConfig  # noqa: E402
from longcat2.engine import generate  # noqa: E402
from longcat2.model.longcat import LongCatForCausalLM  # noqa: E402

MODELS = {
    "tiny-flash": dict(preset="tiny-flash"),
    "small": dict(preset="tiny-flash", **SMALL_FLASH),
}
DEFAULT_SETTINGS = [
    "tiny-flash:float32:1:64:64",
    "small:float32:1:1024:32",
    "small:float32:1:2048:32",
    "small:float32:4:1024:32",
    "small:bfloat16:1:2048:32",
]


def build(name: str, tmp: Path):
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    spec = dict(MODELS[name])
    cfg = ModelConfig.from_preset(spec.pop("preset"), **spec)
    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k != "architectures"}
    torch.manual_seed(0)
    hf = LongcatFlashForCausalLM(LongcatFlashConfig(**hf_cfg)).eval()
    path = tmp / name
    hf.save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = LongCatForCausalLM.from_pretrained(path, dtype=torch.float32, strict=False)
    return hf, ours.eval(), cfg


def agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """Leading positions (over the batch) where two [B, T] outputs agree."""
    same = (a == b).all(0)
    return int(same.long().cumprod(0).sum())


def main() -> None:
    logging.getLogger("longcat2").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--settings",
        nargs="*",
        default=DEFAULT_SETTINGS,
        help="model:dtype:batch:prompt_len:new_tokens (models: " + ", ".join(MODELS) + ")",
    )
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()

    print(f"# {' '.join(sys.argv)}")
    print(
        f"# torch {torch.__version__}, transformers {transformers.__version__}, 1 thread, greedy; "
        f"median [min–max] of {args.repeats} interleaved rounds after 1 warm-up; {load_average()}"
    )
    print(
        "| model | dtype | batch | prompt | new | transformers total s | engine total s | total speed-up | "
        "first token s (tf / engine) | transformers decode tok/s | engine decode tok/s | decode speed-up | "
        "same tokens |"
    )
    print("|" + "---|" * 13)
    built: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        for setting in args.settings:
            name, dtype_s, b, p, n = setting.split(":")
            b, p, n = int(b), int(p), int(n)
            if name not in built:
                built[name] = build(name, Path(tmpdir))
            hf, ours, cfg = built[name]
            print(
                run_setting(name, hf, ours, cfg, getattr(torch, dtype_s), b, p, n, args.repeats), flush=True
            )
    print(f"# {load_average()} at the end")


def run_setting(name, hf, ours, cfg, dtype: torch.dtype, b: int, p: int, n: int, repeats: int) -> str:
    hf.to(dtype)
    ours.to(dtype)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, cfg.vocab_size, (b, p), generator=g)
    mask = torch.ones_like(ids)

    outs: dict[str, torch.Tensor] = {}

    def run_hf(k: int):
        with torch.inference_mode():
            outs["hf"] = hf.generate(
                ids, attention_mask=mask, max_new_tokens=k, do_sample=False, eos_token_id=None, pad_token_id=0
            )

    def run_ours(k: int):
        outs["ours"] = generate(ours, ids, max_new_tokens=k, ignore_eos=True)

    if n < 2:
        raise SystemExit(f"{name}: new tokens must be >= 2 to time decode steps, got {n}")
    arms = {
        "hf": lambda: run_hf(n),
        "ours": lambda: run_ours(n),
        "hf1": lambda: run_hf(1),
        "ours1": lambda: run_ours(1),
    }
    # the N-token runs' outputs, checked before timing
    run_hf(n)
    run_ours(n)
    agree = agreement(outs["hf"], outs["ours"])
    full = outs["hf"].shape[1]
    if dtype == torch.float32 and (outs["hf"].shape != outs["ours"].shape or agree != full):
        raise SystemExit(
            f"{name} {b}x{p}+{n}: transformers and the engine produced different tokens "
            f"(first {agree} of {full} positions agree) on the same fp32 weights"
        )
    r = interleaved(arms, repeats, warmup=0)  # the checked runs above were the warm-up
    step = {k: [(tn - t1) / (n - 1) for tn, t1 in zip(r[k], r[k + "1"])] for k in ("hf", "ours")}
    rate = {k: [b / x for x in v] for k, v in step.items()}
    dt = str(dtype).replace("torch.", "")
    same = "yes" if agree == full else f"first {agree - p} of {n} new"
    return (
        f"| {name} | {dt} | {b} | {p} | {n} | {spread(r['hf'])} | {spread(r['ours'])} | "
        f"{ratio_spread(r['hf'], r['ours'], 1)} | {median(r['hf1']):.2f} / {median(r['ours1']):.2f} | "
        f"{spread(rate['hf'], 1, 1)} | {spread(rate['ours'], 1, 1)} | {ratio_spread(step['hf'], step['ours'], 1)} | "
        f"{same} |"
    )


if __name__ == "__main__":
    main()
