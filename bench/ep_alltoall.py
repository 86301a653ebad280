"""Expert-parallel all-to-all traffic (zero-expert short-circuit on/off) and tokens/s from 1 to 2 processes.

Everything is measured from real multi-process runs on this machine (gloo on CPU, spawn, one torch thread
per process), training the tiny-flash preset (8 routed + 4 zero experts, top-3) with `parallelize`:

1. Traffic. 2 processes, EP=2, a few training steps, once with zero-computation experts short-circuited
   (the default: their slots are Σ gate·x on the token's own rank) and once dispatching them like routed
   experts to identity slots spread over the ranks (the naive EP implementation). `ExpertParallelExperts`
   counts the rows and bytes each rank sends to *other* ranks (dispatch + combine, forward; backward sends
   the same amount of gradients again). Both modes compute the same losses (checked). Reported per token
   and per MoE layer: rows (dimension-free), bytes at this preset's hidden size (fp32), and the same rows
   scaled to LongCat-2.0 activations (hidden 8192, bf16).
2. Scaling. Same per-rank batch (weak scaling), median step time after warm-up per run; `--repeats` runs
   per configuration, configurations taking turns; reported: the median run with [min–max] (bench/timing.py), for 1 process and for 2 processes (FSDP=2, and EP=2 with dense weights
   FSDP-sharded over both ranks); tokens/s = global tokens / step time. Optimizer: plain AdamW (the parallel machinery, not Muon-over-DTensor, is measured).

    .venv/bin/python bench/ep_alltoall.py
    .venv/bin/python bench/ep_alltoall.py --steps 6 --batch 8 --seq 128 --json out.json
    .venv/bin/python bench/ep_alltoall.py --steps 1 --warmup 1 --batch 1 --seq 32 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "parallel"))
from pdist_launch import run_distributed  # noqa: E402
from timing import load_average, median, spread  # noqa: E402

PRESET = "tiny-flash"
LONGCAT2_HIDDEN, BF16 = 8192, 2


# ---------------------------------------------------------------------- workers
def _model(num_layers: int):
    from longcat2.config import ModelConfig
    from longcat2.model import LongCatForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(PRESET, torch_dtype="float32", num_layers=num_layers, mtp_num_layers=0)
    return LongCatForCausalLM(cfg).train()


def _batch(step: int, rank: int, batch: int, seq: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(4, vocab, (batch, seq + 1), generator=g)


def _step(model, opt, seq: torch.Tensor) -> float:
    import torch.nn.functional as F

    logits = model(seq[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def traffic_worker(
    rank: int, world: int, short_circuit: bool, steps: int, batch: int, seq: int
) -> dict[str, Any]:
    from longcat2 import parallel as P
    from longcat2.model.moe import MoE

    info = P.init_distributed(ep=world)
    model = _model(num_layers=2)
    if not short_circuit:  # the baseline: zero-expert slots travel like routed ones
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            P.dispatch_zero_experts(moe, info.mesh["ep"])
    P.parallelize(model, info.mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    losses, slots, routed = [], 0, 0
    for s in range(steps):
        losses.append(_step(model, opt, _batch(s, rank, batch, seq, model.config.vocab_size)))
        for m in moes:
            ids = m.last_topk
            slots += ids.numel()
            routed += int((ids < m.n_routed).sum())
    t = P.expert_traffic(model)
    return dict(
        losses=losses,
        tokens=steps * batch * seq,
        layers=len(moes),
        rows_sent=t.rows_sent,
        bytes_sent=t.bytes_sent,
        count_bytes=t.count_bytes,
        local_rows=t.local_rows,
        slots=slots,
        routed_slots=routed,
        hidden=model.config.hidden_size,
    )


def speed_worker(
    rank: int, world: int, ep: int, steps: int, warmup: int, batch: int, seq: int
) -> dict[str, Any]:
    from longcat2 import parallel as P

    info = P.init_distributed(ep=ep)
    model = _model(num_layers=2)
    P.parallelize(model, info.mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for s in range(warmup + steps):
        x = _batch(s, rank, batch, seq, model.config.vocab_size)
        P.barrier()
        t0 = time.perf_counter()
        _step(model, opt, x)
        P.barrier()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "tokens_per_step": world * batch * seq}


# ---------------------------------------------------------------------- report
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="measured training steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--repeats", type=int, default=3, help="scaling runs per configuration (the median is reported)"
    )
    ap.add_argument("--json", type=str, default=None, help="also write the numbers here")
    args = ap.parse_args()
    cmd = "python bench/ep_alltoall.py " + " ".join(sys.argv[1:])
    print(
        f"$ {cmd}\nmachine: {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f} at start "
        f"(other jobs may share it), torch {torch.__version__}, 1 thread per process\n"
    )

    results: dict[str, Any] = {"command": cmd, "preset": PRESET, "loadavg_at_start": os.getloadavg()}
    # 1. traffic
    rows = {}
    for sc in (True, False):
        per_rank = run_distributed(traffic_worker, 2, sc, args.steps, args.batch, args.seq, timeout=600)
        rows[sc] = per_rank
    assert [r["losses"] for r in rows[True]] == [r["losses"] for r in rows[False]] or all(
        abs(a - b) <= 1e-5 * abs(b)
        for ra, rb in zip(rows[True], rows[False])
        for a, b in zip(ra["losses"], rb["losses"])
    ), "short-circuit on/off must compute the same losses"
    r0 = rows[True][0]
    tokens = sum(r["tokens"] for r in rows[True])  # global tokens
    layers, hidden = r0["layers"], r0["hidden"]
    slots = sum(r["slots"] for r in rows[True])
    routed = sum(r["routed_slots"] for r in rows[True])
    k = slots / (tokens * layers)
    f = routed / (tokens * layers)
    print(
        f"1. all-to-all traffic, 2 processes, EP=2, {PRESET} ({layers} MoE layers, hidden {hidden}, top-{k:.0f}),"
    )
    print(
        f"   {args.steps} training steps x {args.batch}x{args.seq} tokens per rank = {tokens} tokens in total"
    )
    print(f"   routing: {f:.3f} routed (FFN) experts per token and layer, {k - f:.3f} zero experts\n")
    hdr = f"   {'zero experts':<20}{'rows/token/layer':>18}{'bytes/token/layer':>19}{'LongCat-2.0 KiB/tok/layer':>27}"
    print(hdr)
    results["traffic"] = {}
    for sc in (False, True):
        rs = rows[sc]
        sent_rows = sum(r["rows_sent"] for r in rs)
        sent_bytes = sum(r["bytes_sent"] for r in rs)
        per_tok_rows = sent_rows / (tokens * layers)
        per_tok_bytes = sent_bytes / (tokens * layers)
        lc2 = per_tok_rows * LONGCAT2_HIDDEN * BF16 / 1024
        name = "short-circuited" if sc else "dispatched (naive)"
        print(f"   {name:<20}{per_tok_rows:>18.3f}{per_tok_bytes:>19.1f}{lc2:>27.1f}")
        results["traffic"]["short_circuit" if sc else "dispatched"] = {
            "rows_per_token_layer": per_tok_rows,
            "bytes_per_token_layer": per_tok_bytes,
            "count_exchange_bytes_total": sum(r["count_bytes"] for r in rs),
            "longcat2_kib_per_token_layer_bf16": lc2,
        }
    t_sc = results["traffic"]["short_circuit"]["rows_per_token_layer"]
    t_no = results["traffic"]["dispatched"]["rows_per_token_layer"]
    print(
        f"   short-circuiting saves {100 * (1 - t_sc / t_no):.1f}% of the payload "
        f"(expected ≈ zero-expert share of slots {100 * (k - f) / k:.1f}%); rows = dispatch + combine,"
        "\n   forward only (backward sends as much again); with uniform routing half the slots stay on-rank.\n"
    )

    # 2. scaling
    print(
        f"2. training tokens/s, {PRESET} (2 layers), {args.batch}x{args.seq} tokens per rank, AdamW; per run the"
    )
    print(
        f"   median of {args.steps} steps after {args.warmup} warm-up steps per run; median [min–max] of "
        f"{args.repeats} interleaved runs"
    )
    runs = [("1 process", 1, 1), ("2 processes, FSDP=2", 2, 1), ("2 processes, EP=2 (+FSDP)", 2, 2)]
    step_s: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _ in range(args.repeats):  # configurations take turns, so a burst of outside load hits all of them
        for name, world, ep in runs:
            r = run_distributed(
                speed_worker, world, ep, args.steps, args.warmup, args.batch, args.seq, timeout=600
            )[0]
            step_s[name].append(r["step_s"])
    results["scaling"] = {}
    base = None
    for name, world, _ in runs:
        mid = median(step_s[name])
        tps = world * args.batch * args.seq / mid
        base = base or tps
        print(
            f"   {name:<28} step {spread(step_s[name], 1000, 1)} ms  {tps:8.0f} tokens/s  x{tps / base:.2f}"
        )
        results["scaling"][name] = {"step_s_runs": step_s[name], "tokens_per_s": tps, "speedup": tps / base}
    print(
        "   (this machine behaves like ~1 core: two processes share it, so the 2-process numbers show the\n"
        "    overhead of sharding + all-to-all, not a speed-up; on real hardware each rank has its own device)"
    )
    print(f"   {load_average()} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
