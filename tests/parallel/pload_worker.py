"""Run under torchrun by test_loading.py: each rank loads only its slices of a sharded HF checkpoint
(bf16 and our FP8 export), then all ranks generate in lockstep. Rank 0 writes a JSON report to --out."""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from longcat2.engine import Engine, SamplingParams
from longcat2.model.longcat import LongCatForCausalLM
from longcat2.parallel.inference import InferenceLayout, init_inference, parameter_bytes
from longcat2.parallel.loading import load_for_inference, load_summary
from longcat2.parallel.lockstep import LockstepEngine, follow

PROMPTS = [[5, 9, 200, 7, 7, 31], [100 + i for i in range(40)]]


def generate(engine) -> list[list[int]]:
    rids = [engine.add_request(p, SamplingParams(max_new_tokens=5, ignore_eos=True)) for p in PROMPTS]
    out: dict[str, list[int]] = {r: [] for r in rids}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id].extend(ev.new_token_ids)
    return [out[r] for r in rids]


def kw() -> dict:
    return {"block_size": 16, "num_blocks": 32, "eos_token_id": None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bf16", required=True)
    ap.add_argument("--fp8", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    layout = init_inference(args.tp, args.ep)
    rank = layout.rank
    rec: dict = {}
    ids = torch.tensor([PROMPTS[1]])
    for name, path, fp8 in (("bf16", args.bf16, "dequantize"), ("fp8", args.fp8, "keep")):
        model, stats = load_for_inference(LongCatForCausalLM, path, layout, dtype=torch.float32, fp8=fp8)
        print(f"[{name}] " + load_summary(model, stats, layout), flush=True)
        mine = {"bytes": parameter_bytes(model), "read": stats.bytes_read, "rss": stats.peak_rss_growth}
        everyone = [None] * layout.world_size
        dist.all_gather_object(everyone, mine)
        with torch.inference_mode():
            logits = model(ids)
        engine = Engine(model, **kw())
        if rank == 0:
            lock = LockstepEngine(engine)
            tokens = generate(lock)
            lock.close()
            one, _ = load_for_inference(LongCatForCausalLM, path, InferenceLayout(), torch.float32, fp8=fp8)
            full = parameter_bytes(one)["total"]
            with torch.inference_mode():
                ref_logits = one(ids)
            rec[name] = {"ranks": everyone, "tokens": tokens, "ref_tokens": generate(Engine(one, **kw())),
                         "full_bytes": full, "logit_diff": float((logits - ref_logits).abs().max())}  # fmt: skip
            if name == "fp8":  # the same checkpoint dequantised in one process
                deq = LongCatForCausalLM.from_pretrained(path, dtype=torch.float32)
                with torch.inference_mode():
                    rec[name]["dequantised_diff"] = float((ref_logits - deq(ids)).abs().max())
                rec[name]["logit_scale"] = float(ref_logits.abs().max())
        else:
            follow(engine)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(rec, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
