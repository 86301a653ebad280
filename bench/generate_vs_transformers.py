"""End-to-end generation: longcat2's engine vs transformers `generate` on the same LongcatFlash weights.

A random `LongcatFlashForCausalLM` (transformers) is saved with `save_pretrained` and loaded into
`LongCatForCausalLM.from_pretrained` (the project's checkpoint loader), so both sides run identical weights.
Greedy decoding, EOS disabled, 1 thread. For each setting the script times a full `generate` (prefill +
decode) and timestamps every token (a transformers streamer / the engine's stream callback): decode
throughput = batch / lower-quartile gap between tokens (robust to load from other processes); best of
--repeats. Batched transformers runs (no streamer) use (total(N) - total(1)) / (N - 1) instead.
In fp32 it also checks that both produce the same tokens (bf16 rounds differently and may diverge).

Where the difference comes from: transformers keeps the MLA latent in its cache but re-expands it through
kv_b_proj for every cached token at every decode step (O(L·c·h·(nope+v)) per sublayer), runs MoE experts in
a Python loop over hit experts, and pads batched prompts; the engine decodes in absorbed form over the
latent (O(L·h·(2c+r))), groups experts, and batches requests of different lengths.

    .venv/bin/python bench/generate_vs_transformers.py                 # the default settings (~5 min)
    .venv/bin/python bench/generate_vs_transformers.py --settings small:bf16:4:1024:32
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longcat2 import ModelConfig  # noqa: E402
from longcat2.engine import generate  # noqa: E402
from longcat2.model.longcat import LongCatForCausalLM  # noqa: E402

MODELS = {
    "tiny-flash": dict(preset="tiny-flash"),
    # a small LongCat-Flash: 4 layers (8 MLA sublayers), d=512, 16 routed + 8 zero experts (top-4), ~33M params
    "small": dict(
        preset="tiny-flash",
        vocab_size=8192,
        hidden_size=512,
        num_layers=4,
        num_attention_heads=8,
        ffn_hidden_size=1024,
        expert_ffn_hidden_size=256,
        q_lora_rank=256,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=16,
        zero_expert_num=8,
        moe_topk=4,
        max_position_embeddings=8192,
    ),
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


class Clock:
    """Token timestamps: a transformers streamer (put/end) and an engine `stream` callback at once."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:  # transformers: first call carries the prompt
        if self._prompt_seen:
            self.stamps.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass

    def __call__(self, event) -> None:  # engine event: the first request's tokens time the batch
        if event.request_id == self.first_id and event.new_token_ids:
            self.stamps.append(time.perf_counter())

    first_id = "req-0"

    def summary(self, total: float) -> tuple[float, float, float]:
        """(total s, time to first token s, lower-quartile s between later tokens); nan without timestamps.
        The lower quartile, not the median: on a shared machine other processes stretch random steps."""
        if len(self.stamps) < 2:
            return total, float("nan"), float("nan")
        gaps = sorted(b - a for a, b in zip(self.stamps, self.stamps[1:]))
        return total, self.stamps[0] - self.t0, gaps[len(gaps) // 4]


def best(fn, repeats: int) -> tuple[tuple[float, float, float], object]:
    """Run fn(clock) `repeats` times; the best total, best first-token time and best gap statistic."""
    runs, out = [], None
    for _ in range(repeats):
        clock = Clock()
        out = fn(clock)
        runs.append(clock.summary(time.perf_counter() - clock.t0))
    return tuple(min(r[i] for r in runs) for i in range(3)), out  # type: ignore[return-value]


def main() -> None:
    logging.getLogger("longcat2").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--settings",
        nargs="*",
        default=DEFAULT_SETTINGS,
        help="model:dtype:batch:prompt_len:new_tokens (models: " + ", ".join(MODELS) + ")",
    )
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()

    print(f"# {' '.join(sys.argv)}")
    print(
        f"# torch {torch.__version__}, transformers {transformers.__version__}, 1 thread, greedy, best of {args.repeats}"
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


def run_setting(name, hf, ours, cfg, dtype: torch.dtype, b: int, p: int, n: int, repeats: int) -> str:
    hf.to(dtype)
    ours.to(dtype)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, cfg.vocab_size, (b, p), generator=g)
    mask = torch.ones_like(ids)

    def run_hf(clock, k: int = n):
        with torch.inference_mode():
            return hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=k,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                streamer=clock if b == 1 else None,
            )

    def run_ours(clock, k: int = n):
        return generate(ours, ids, max_new_tokens=k, ignore_eos=True, stream=clock)

    run_hf(Clock(), 2), run_ours(Clock(), 2)  # warm-up
    (t_hf, ttft_hf, gap_hf), out_hf = best(run_hf, repeats)
    (t_us, ttft_us, gap_us), out_us = best(run_ours, repeats)
    if b > 1:  # transformers streamers take batch 1 only: decode time from the total minus a 1-token run
        (t1, _, _), _ = best(lambda c: run_hf(c, 1), repeats)
        gap_hf = (t_hf - t1) / (n - 1)
    same = bool(torch.equal(out_hf, out_us))
    dt = str(dtype).replace("torch.", "")
    return (
        f"| {name} | {dt} | {b} | {p} | {n} | {t_hf:.2f} | {t_us:.2f} | {t_hf / t_us:.1f}x | "
        f"{ttft_hf:.2f} / {ttft_us:.2f} | {b / gap_hf:.1f} | {b / gap_us:.1f} | {gap_hf / gap_us:.1f}x | "
        f"{'yes' if same else 'no'} |"
    )


if __name__ == "__main__":
    main()
