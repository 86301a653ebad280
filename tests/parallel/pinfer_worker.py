"""Run under torchrun by test_inference.py: TP / EP inference vs one process, for several presets and layouts.

Every rank builds the same seeded fp32 model; rank 0 first runs the unsharded model alone (the 1-process
reference: greedy tokens of a prompt batch with and without speculative decoding, full-forward logits),
then all ranks shard it (`parallelize_for_inference`) and run the same engine in lockstep. Rank 0 writes
one JSON record per (preset, layout) to --out.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.distributed as dist

from longcat2.config import ModelConfig
from longcat2.engine import Engine, SamplingParams
from longcat2.model.attention import MLA
from longcat2.model.longcat import LongCatForCausalLM
from longcat2.parallel.inference import init_inference, parallelize_for_inference, parameter_bytes
from longcat2.parallel.lockstep import LockstepEngine, follow

# prompts: two cross the (lowered) index_topk so the sparse path runs in prefill and decode
LENGTHS = (5, 40, 23)
NEW_TOKENS = 6


def make_model(preset: str) -> LongCatForCausalLM:
    overrides = (
        {"index_topk": 16, "index_init_tokens": 2, "index_local_tokens": 4} if preset == "tiny" else {}
    )
    cfg = ModelConfig.from_preset(preset, **overrides)
    torch.manual_seed(7)
    model = LongCatForCausalLM(cfg).eval()
    with torch.no_grad():  # a router bias that sends rows to every expert and to the zero experts
        for layer in model.model.layers:
            b = layer.mlp.router.e_score_correction_bias
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return model


def prompts(cfg: ModelConfig) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def run_engine(engine, batch: list[list[int]]) -> list[list[int]]:
    """Greedy requests for every prompt, a seeded sampled one, and an unseeded sampled one (its tokens are
    not compared with one process, but the ranks must agree on them: a follower raises LockstepError)."""
    params = [SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True) for _ in batch]
    params.append(SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.9, seed=11))
    params.append(SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.9))
    rids = [engine.add_request(p, sp) for p, sp in zip([*batch, batch[0], batch[0]], params)]
    out: dict[str, list[int]] = {r: [] for r in rids}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id].extend(ev.new_token_ids)
    return [out[r] for r in rids[:-1]]


def count_sparse_steps(model: LongCatForCausalLM) -> list[int]:
    """A counter of MLA calls that ran a sparse selection (the returned indices are not None)."""
    seen = [0]

    def hook(module, inputs, output) -> None:
        seen[0] += output[1] is not None

    for m in model.modules():
        if isinstance(m, MLA):
            m.register_forward_hook(hook)
    return seen


def expected_shard_bytes(base: LongCatForCausalLM, tp: int, ep: int) -> float:
    """What one rank should hold of the sharded families: experts / ep, attention heads, FFNs, vocab / tp."""
    tp_keys = (
        "q_b_proj",
        "kv_b_proj",
        "o_proj",
        "mlps.",
        "transformer_layer.mlp",
        "embed_tokens",
        "embedders",
    )
    total = 0.0
    for name, p in base.named_parameters():
        b = p.numel() * p.element_size()
        if ".experts." in name and ep > 1:
            total += b / ep
        elif tp > 1 and (any(k in name for k in tp_keys) or name == "lm_head.weight"):
            total += b / tp
    return total


def engine_kw(speculative: bool) -> dict:
    return {"speculative": speculative, "block_size": 16, "num_blocks": 32, "eos_token_id": None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny,tiny-flash,tiny-flash-lite")
    ap.add_argument("--layouts", default="2x1,1x2", help="comma-separated TPxEP")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    layouts = [tuple(int(v) for v in s.split("x")) for s in args.layouts.split(",")]
    records = []
    groups = {}
    for tp, ep in layouts:
        groups[(tp, ep)] = init_inference(tp, ep)  # (creates the process group on the first call)
    rank = dist.get_rank()
    for preset in args.presets.split(","):
        base = make_model(preset)
        batch = prompts(base.config)
        ids = torch.tensor([batch[1]])
        ref: dict = {}
        if rank == 0:  # the 1-process reference
            with torch.inference_mode():
                ref["logits"] = base(ids)
            for spec in (False, True):
                ref[spec] = run_engine(Engine(base, **engine_kw(spec)), batch)
        full = parameter_bytes(base)["total"]
        for tp, ep in layouts:
            layout = groups[(tp, ep)]
            model = parallelize_for_inference(copy.deepcopy(base), layout)
            with torch.inference_mode():
                logits = model(ids)
            rec = {"preset": preset, "tp": tp, "ep": ep, "bytes": parameter_bytes(model), "full_bytes": full}
            rec["expected_sharded"] = expected_shard_bytes(base, tp, ep)
            sparse = count_sparse_steps(model)
            for spec in (False, True):
                engine = Engine(model, **engine_kw(spec))
                if rank == 0:
                    lock = LockstepEngine(engine)
                    rec[f"tokens_spec{int(spec)}"] = run_engine(lock, batch)
                    rec[f"ref_spec{int(spec)}"] = ref[spec]
                    lock.close()
                else:
                    follow(engine)
            rec["sparse_calls"] = sparse[0]
            if rank == 0:
                rec["max_logit_diff"] = float((logits - ref["logits"]).abs().max())
                rec["logit_scale"] = float(ref["logits"].abs().max())
                records.append(rec)
            byte_list = [None] * dist.get_world_size()
            dist.all_gather_object(byte_list, rec["bytes"])
            if rank == 0:
                rec["bytes_per_rank"] = byte_list
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(records, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
