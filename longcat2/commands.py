"""General subcommands: `presets`, `info`, `demo`.

Design choices:
- Big presets are built on the `meta` device: parameter counts come from the real module tree without
  allocating 1.6T parameters, so `info` is the model's own count, not a separate formula.
- Active parameters follow the convention that reproduces the published figures (spec §6): input-embedding
  rows and N-gram table rows are not active (looked up, not multiplied), routed experts count only when chosen
  (min: all top-k picks are zero experts; max: all are FFN experts), the lm_head and everything else is active;
  MTP is reported separately.
- `demo` is the living end-to-end check: it runs a tiny LongCat-2.0-family model through a forward pass with
  the sparse path active, a HF-format save/load round trip and greedy generation.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from longcat2.config import PRESETS, ModelConfig
from longcat2.model_dir import resolve_config


def model_stats(cfg: ModelConfig) -> dict[str, Any]:
    """Parameter and cache accounting from a meta-device instance of the model."""
    import torch

    from longcat2.model.fp8 import resident_bytes
    from longcat2.model.longcat import LongCatForCausalLM

    with torch.device("meta"):
        model = LongCatForCausalLM(cfg)
    total = mtp = routed = lookup = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("model.mtp."):
            mtp += n
            continue
        total += n
        if ".mlp.experts." in name:
            routed += n
        elif name == "model.embed_tokens.weight" or ".ngram_embeddings.embedders." in name:
            lookup += n
    per_expert = 3 * cfg.hidden_size * cfg.expert_ffn_hidden_size
    active_min = total - routed - lookup
    active_max = active_min + min(cfg.moe_topk, cfg.n_routed_experts) * per_expert * cfg.num_layers
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    owners = sum(1 for layer in model.model.layers for attn in layer.self_attn if attn.indexer is not None)
    return {
        "preset_or_format": cfg.hf_format,
        "total_params": total,
        "active_params_min": active_min,
        "active_params_max": active_max,
        "routed_expert_params": routed,
        "mtp_params": mtp,
        "kv_cache_bytes_per_token": cfg.num_attention_sublayers * latent * 2,
        "indexer_cache_bytes_per_token": owners * cfg.index_head_dim * 2,
        "weight_bytes_bf16": resident_bytes(model, fp8=False)["total"],  # MTP included
        "weight_bytes_fp8": resident_bytes(model, fp8=True)[
            "total"
        ],  # FP8-resident (our export / the release)
    }


def _fmt_b(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.3f}M"


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.3f} MB"


def cmd_presets(args: argparse.Namespace) -> int:
    print(
        f"{'preset':<20} {'layers':>6} {'hidden':>6} {'experts':>11} {'LSA top-k':>9} {'n-gram':>6} {'MTP':>4}"
    )
    for name in PRESETS:
        c = ModelConfig.from_preset(name)
        ngram = f"{c.oe_neighbor_num}x{c.oe_split_num}" if c.use_ngram else "-"
        lsa = str(c.index_topk) if c.use_lsa else "-"
        experts = f"{c.n_routed_experts}+{c.zero_expert_num}z"
        print(
            f"{name:<20} {c.num_layers:>6} {c.hidden_size:>6} {experts:>11} {lsa:>9} {ngram:>6} {c.mtp_num_layers:>4}"
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    cfg = (
        ModelConfig.from_hf(resolve_config(args.config))
        if args.config
        else ModelConfig.from_preset(args.preset)
    )
    stats = model_stats(cfg)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"model: {args.config or args.preset} ({cfg.hf_format})")
    print(f"  total parameters     {_fmt_b(stats['total_params'])} (without the MTP head)")
    print(
        f"  active parameters    {_fmt_b(stats['active_params_min'])} – {_fmt_b(stats['active_params_max'])}"
        f" (0 … {cfg.moe_topk} FFN experts per token)"
    )
    if stats["mtp_params"]:
        print(f"  MTP head             {_fmt_b(stats['mtp_params'])} (not in the totals above)")
    print(
        f"  weights              {_fmt_bytes(stats['weight_bytes_bf16'])} bf16, "
        f"{_fmt_bytes(stats['weight_bytes_fp8'])} FP8-resident (1 process; plan --serve splits them)"
    )
    print(f"  KV cache (bf16)      {stats['kv_cache_bytes_per_token']:,} bytes/token")
    if cfg.use_lsa:
        from longcat2.plan.model_math import indexer_cache_bytes_per_token

        bf16, fp8 = indexer_cache_bytes_per_token(cfg, 2), indexer_cache_bytes_per_token(cfg, 1)
        print(
            f"  index-key cache      {bf16:,} bytes/token bf16, {fp8:,} fp8 (--index-dtype fp8: e4m3 + fp32 scale)"
        )
        sub = cfg.replace(lsa_hi=True)
        per = sub.index_head_dim * 2 / sub.lsa_hi_block_size * (bf16 // (sub.index_head_dim * 2))
        print(
            f"  HI page summaries    {per:,.0f} bytes/token when lsa_hi is on (bf16 means of "
            f"{sub.lsa_hi_block_size}-token sub-blocks, pages of {sub.lsa_hi_page_size})"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from longcat2.model.longcat import LongCatForCausalLM

    torch.set_num_threads(1)
    cmd_presets(args)
    print()
    for name in ("longcat-2.0", "longcat-flash", "longcat-flash-lite"):
        s = model_stats(ModelConfig.from_preset(name))
        print(
            f"{name:<20} total {_fmt_b(s['total_params'])}, active {_fmt_b(s['active_params_min'])}"
            f"–{_fmt_b(s['active_params_max'])}, KV {s['kv_cache_bytes_per_token']:,} B/token"
        )
    cfg = ModelConfig.from_preset(args.preset)
    torch.manual_seed(args.seed)
    model = LongCatForCausalLM(cfg).eval()
    t = args.seq_len
    ids = torch.randint(4, cfg.vocab_size, (1, t))
    start = time.perf_counter()
    with torch.no_grad():
        out = model(ids, return_dict=True, with_mtp=True)
    took = time.perf_counter() - start
    sparse = cfg.use_lsa and t > cfg.index_topk
    print(
        f"\n{args.preset}: {model.num_parameters():,} params; forward of {t} tokens in {took * 1000:.0f} ms "
        f"({'LSA sparse path, top-' + str(cfg.index_topk) if sparse else 'dense attention'}); "
        f"logits {tuple(out.logits.shape)}, {len(out.mtp_logits)} MTP steps"
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            again = LongCatForCausalLM.from_pretrained(tmp).eval()
            with torch.no_grad():
                diff = (again(ids) - out.logits).abs().max().item()
            print(f"HF-format save/load round trip: max |Δlogit| = {diff:.2e}")
    except ModuleNotFoundError:
        pass
    prompt = ids[:, : cfg.index_topk + 8]  # long enough that decode runs the sparse path
    start = time.perf_counter()
    gen = model.generate(prompt, max_new_tokens=16, temperature=0.0)
    took = time.perf_counter() - start
    ref = prompt
    with torch.no_grad():  # the same greedy tokens by re-running the full, uncached forward
        for _ in range(16):
            ref = torch.cat([ref, model(ref)[:, -1:].argmax(-1)], dim=1)
    print(
        f"engine greedy decode of 16 tokens in {took * 1000:.0f} ms (latent cache, sparse decode); "
        f"equal to full-forward greedy: {torch.equal(gen, ref)}"
    )
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("info", help="parameters and cache sizes of a preset or config.json")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="longcat-2.0", choices=list(PRESETS))
    g.add_argument(
        "--config",
        help="a config.json, a model or checkpoint folder, a training run folder or longcat-2.0-tiny",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="presets, big-model accounting, and a tiny model run end to end")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
