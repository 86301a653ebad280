"""Per-rank resident parameter bytes and peak RSS while loading a sharded checkpoint (parallel/loading.py).

    python bench/tp_load_memory.py --make DIR                      # write a ~0.5 GB bf16 model (tiny, widened)
    torchrun --standalone --nproc_per_node 2 bench/tp_load_memory.py --load DIR --tp 2 --ep 2
    python bench/tp_load_memory.py --load DIR                      # one process, same loader

Each rank prints `load_summary`: parameters resident (sharded / replicated), bytes read from the files,
and the growth of its peak RSS (ru_maxrss) while loading, after torch and the model code were imported.
"""

from __future__ import annotations

import argparse

import torch

from longcat2.config import ModelConfig
from longcat2.model.longcat import LongCatForCausalLM

WIDE = {"hidden_size": 1024, "n_routed_experts": 32, "expert_ffn_hidden_size": 1024, "ffn_hidden_size": 2048,
        "vocab_size": 32768, "num_layers": 2}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make")
    ap.add_argument("--load")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.make:
        with torch.device("cpu"):
            model = LongCatForCausalLM(ModelConfig.from_preset("tiny", **WIDE)).to(torch.bfloat16)
        model.save_pretrained(args.make, max_shard_size="100MB")
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters written to {args.make}")
        return
    from longcat2.parallel.inference import init_inference
    from longcat2.parallel.loading import load_for_inference, load_summary

    layout = init_inference(args.tp, args.ep)
    model, stats = load_for_inference(LongCatForCausalLM, args.load, layout, dtype=torch.bfloat16)
    print(load_summary(model, stats, layout), flush=True)


if __name__ == "__main__":
    main()
