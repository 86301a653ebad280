"""`longcat2 plan`: argument parsing, the human-readable report and `--json`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import textwrap
from typing import Any

from longcat2.config import ConfigError, ModelConfig
from longcat2.model_dir import resolve_config

from . import model_math as mm
from .cluster import (
    RECOMPUTE,
    Layout,
    PlanError,
    ServeWorkload,
    TrainWorkload,
    as_jsonable,
    assumptions_from,
    check_fits,
    list_hardware,
    load_hardware,
    plan_serving,
    plan_training,
    search_layouts,
)
from .serve_layout import plan_serve_layout, render_serve_layout

_DTYPE = {"bf16": 2, "fp8": 1}


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="capacity planner: params, FLOPs, memory, comm, layouts, serving",
        description="Plan LongCat training runs and deployments (docs/planning.md).",
    )
    a = p.add_argument
    a("--preset", default="longcat-2.0", help="model preset (default longcat-2.0)")
    a("--config", help="a released config.json (file or folder); overrides --preset")
    a("--hardware", default="h200", help=f"built-in ({', '.join(list_hardware())}) or a .json/.yaml file")
    a("--hw", action="append", default=[], metavar="KEY=VALUE", help="override a hardware field")
    a("--assume", action="append", default=[], metavar="KEY=VALUE", help="override an assumption")
    a(
        "--experts-per-token",
        type=float,
        help="K_e: FFN experts per token per layer (default 2/3 of moe_topk: 8)",
    )
    a("--json", action="store_true", help="print JSON instead of tables")
    a = p.add_argument_group("training").add_argument
    a("--chips", type=int, help="cluster size (default: tp*pp*cp*dp; --search needs it)")
    a("--train-tokens", type=float, default=35e12)
    a("--global-batch", type=int, default=2048, help="sequences per optimizer step")
    a("--seq-len", type=int, default=8192)
    a("--optimizer", default="muon", choices=["muon", "adamw"])
    a("--precision", default="bf16", choices=["bf16", "fp8"], help="GEMM precision (sets the peak)")
    a("--dense-attention", action="store_true", help="train with dense instead of LSA top-k attention")
    a("--no-mtp", action="store_true", help="do not train the MTP head")
    for k in ("tp", "pp", "ep", "cp", "dp", "embp", "vpp"):
        a(f"--{k}", type=int)
    a("--micro-batch", type=int, default=1)
    a("--no-zero1", action="store_true", help="replicate optimizer states over DP")
    a("--recompute", choices=RECOMPUTE, default="selective")
    a("--offload", action="store_true", help="optimizer states in host memory")
    a("--search", action="store_true", help="rank the layouts that fit on --chips N chips by step time")
    a("--top", type=int, default=10, help="layouts to show with --search")
    a = p.add_argument_group("serving").add_argument
    a("--serve", action="store_true", help="plan a deployment")
    a("--context", type=int, default=131072)
    a("--concurrency", type=int, default=0, help="sequences per instance (default: the max that fits)")
    a("--kv-dtype", choices=list(_DTYPE), default="bf16")
    a("--index-dtype", choices=list(_DTYPE), default="fp8")
    a(
        "--hi",
        action="store_true",
        help="serve with hierarchical indexing on (lsa_hi; off in released configs)",
    )
    a("--weight-dtype", choices=list(_DTYPE), default="fp8")
    a("--instance-chips", type=int, default=0, help="chips per model instance (default: whole nodes)")
    a("--target-tps", type=float, default=0.0, help="per-sequence decode tokens/s target")
    a("--serve-tp", type=int, default=0, help="serving tensor-parallel degree (default: --chips)")
    a("--serve-ep", type=int, default=0, help="serving expert-parallel degree (default: --chips)")
    p.set_defaults(func=run)  # fmt: skip


def build_plan(args: argparse.Namespace) -> dict[str, Any]:
    cfg = (
        ModelConfig.from_hf(resolve_config(args.config))
        if args.config
        else ModelConfig.from_preset(args.preset)
    )
    hw = load_hardware(args.hardware, dict(kv.split("=", 1) for kv in args.hw if "=" in kv))
    bad = [kv for kv in args.hw if "=" not in kv]
    if bad:
        raise PlanError(f"hw: expected KEY=VALUE, got {bad[0]!r}")
    asm = assumptions_from(args.assume)
    if args.experts_per_token is not None:
        asm.experts_per_token = args.experts_per_token
    asm.experts_per_token = asm.experts_per_token or mm.default_experts_per_token(cfg)
    if not 0 <= asm.experts_per_token <= cfg.moe_topk:
        raise PlanError(
            f"experts_per_token: must be in [0, moe_topk={cfg.moe_topk}], got {asm.experts_per_token}"
        )
    out: dict[str, Any] = {
        "model": args.config or args.preset,
        "hardware": dataclasses.asdict(hw),
        "assumptions": dataclasses.asdict(asm),
        "params": mm.count_parameters(cfg, asm.experts_per_token),
        "kv_bytes_per_token": {d: mm.kv_cache_bytes_per_token(cfg, b) for d, b in _DTYPE.items()},
        "indexer_bytes_per_token": {d: mm.indexer_cache_bytes_per_token(cfg, b) for d, b in _DTYPE.items()},
    }
    wl = TrainWorkload(train_tokens=args.train_tokens, global_batch=args.global_batch, seq_len=args.seq_len,
                       optimizer=args.optimizer, precision=args.precision, sparse_attention=not args.dense_attention,
                       mtp=not args.no_mtp)  # fmt: skip
    out["flops_per_token"] = mm.flops_per_token(
        cfg, wl.seq_len, asm.experts_per_token, wl.sparse_attention, wl.mtp
    )
    degrees = {k: getattr(args, k) for k in ("tp", "pp", "ep", "cp", "dp")}
    if args.search:
        fixed = {k: v for k, v in degrees.items() if v is not None}
        pinned = {"tp", "pp", "cp", "dp"} <= set(fixed)  # then the cluster size is their product
        chips = args.chips or (math.prod(fixed[k] for k in ("tp", "pp", "cp", "dp")) if pinned else 0)
        if not chips:
            raise PlanError(
                "chips: --search ranks the layouts of one cluster size: give it with --chips N "
                f"(e.g. --chips {16 * hw.chips_per_node}), or pin --tp --pp --cp --dp"
            )
        out["search"] = search_layouts(cfg, hw, chips, wl, asm, args.top, args.micro_batch, fixed)
    elif (args.chips and not args.serve) or any(v is not None for v in degrees.values()):
        d = {k: (v or 1) for k, v in degrees.items()}
        if degrees["dp"] is None and args.chips:
            rest = d["tp"] * d["pp"] * d["cp"]
            if args.chips % rest:
                raise PlanError(f"dp: --chips {args.chips} is not divisible by tp*pp*cp = {rest}")
            d["dp"] = args.chips // rest
        lay = Layout(**d, embp=args.embp or 0, vpp=args.vpp or 1, zero1=not args.no_zero1, recompute=args.recompute,
                     offload=args.offload, micro_batch=args.micro_batch)  # fmt: skip
        out["train"] = plan_training(cfg, hw, lay, wl, asm, args.chips)
        check_fits(out["train"], hw)
    if args.serve:
        if args.hi:
            cfg = cfg.replace(lsa_hi=True)
        serve_only = not args.search and all(v is None for v in degrees.values())  # --chips: the instance
        instance = args.instance_chips or (args.chips if serve_only and args.chips else 0)
        sw = ServeWorkload(context=args.context, concurrency=args.concurrency, kv_bytes=_DTYPE[args.kv_dtype],
                           index_bytes=_DTYPE[args.index_dtype], weight_bytes=_DTYPE[args.weight_dtype],
                           instance_chips=instance, target_tps=args.target_tps)  # fmt: skip
        out["serve"] = plan_serving(cfg, hw, sw, asm)
        out["serve_layout"] = plan_serve_layout(
            cfg, hw.hbm_bytes, 1 - asm.hbm_reserve, out["serve"]["instance_chips"], args.serve_tp, args.serve_ep,
            _DTYPE[args.kv_dtype], _DTYPE[args.index_dtype],
        )  # fmt: skip
    return as_jsonable(out)


# ---------------------------------------------------------------------- report
def _b(x: float) -> str:
    return f"{x / 1e9:,.2f} B" if x >= 1e7 or not x else f"{x / 1e6:,.3f} M"


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


def _t(sec: float) -> str:
    return f"{sec * 1e3:,.2f} ms" if sec < 1 else f"{sec:,.2f} s"


def _rows(title: str, rows: list[tuple[str, str]]) -> list[str]:
    w = max(len(k) for k, _ in rows)
    return [f"== {title}"] + [f"  {k:<{w}}  {v}" for k, v in rows] + [""]


def render(plan: dict[str, Any]) -> str:
    pc, hw, fl = plan["params"], plan["hardware"], plan["flops_per_token"]
    k_e = plan["assumptions"]["experts_per_token"]
    lines = [f"longcat2 plan: {plan['model']} on {hw['name']}", ""]
    rows = [("total (no MTP)", _b(pc["total"])),
            (f"active min / avg (K_e={k_e:g}) / max", f"{_b(pc['active_min'])} / {_b(pc['active_avg'])} / "
             f"{_b(pc['active_max'])}"), ("MTP (separate)", _b(pc["mtp"]))]  # fmt: skip
    rows += [(f"  {k}", _b(v)) for k, v in pc["breakdown"].items() if v]
    lines += _rows("parameters (B = 1e9, M = 1e6)", rows)
    rows = [(k, f"{v / 1e9:,.3f}") for k, v in fl.items() if k not in ("backward", "train")]
    rows += [
        ("backward (2x fwd)", f"{fl['backward'] / 1e9:,.3f}"),
        ("train (fwd+bwd)", f"{fl['train'] / 1e9:,.3f}"),
    ]
    lines += _rows("forward GFLOPs per token", rows)
    kv, ix = plan["kv_bytes_per_token"], plan["indexer_bytes_per_token"]
    lines += _rows("cache bytes per token", [("MLA latent bf16 / fp8", f"{kv['bf16']:,} / {kv['fp8']:,}"),
                                             ("indexer keys bf16 / fp8", f"{ix['bf16']:,} / {ix['fp8']:,}")])  # fmt: skip
    asm = " ".join(f"{k}={v:g}" for k, v in plan["assumptions"].items())
    lines += ["== assumptions (--assume KEY=VALUE)", *textwrap.wrap(asm, 108, initial_indent="  ",
                                                                     subsequent_indent="  "), ""]  # fmt: skip
    if "train" in plan:
        lines += _render_train(plan["train"])
    if "search" in plan:
        s = plan["search"]
        rej = ", ".join(f"{k}: {v}" for k, v in sorted(s["rejected"].items()))
        lines.append(
            f"== layout search on {s['chips']:,} chips: {s['feasible']} fit (rejected variants: {rej})"
        )
        lines.append(f"  {'#':>2}  {'layout':<44} {'mem/chip':>10} {'step':>10} {'MFU':>6} {'days':>7}")
        for i, p in enumerate(s["best"], 1):
            lay = Layout(
                **{k: p["layout"][k] for k in ("tp", "pp", "ep", "cp", "dp", "zero1", "recompute", "offload")}
            )
            lines.append(f"  {i:>2}  {lay.short():<44} {_gb(p['memory']['total']):>10} {_t(p['step_time']):>10} "
                         f"{p['mfu']:>6.1%} {p['days']:>7.1f}")  # fmt: skip
        lines.append("")
        if s["best"]:
            lines += _render_train(s["best"][0], "best layout")
    if "serve" in plan:
        lines += _render_serve(plan["serve"])
    if "serve_layout" in plan:
        lines += render_serve_layout(plan["serve_layout"])
    return "\n".join(lines)


def _render_train(t: dict[str, Any], title: str = "training") -> list[str]:
    lay, m = t["layout"], t["memory"]
    head = (f"TP{lay['tp']} PP{lay['pp']} EP{lay['ep']} CP{lay['cp']} DP{lay['dp']} EMBP{lay['embp']} "
            f"vpp{lay['vpp']} ZeRO-1={'on' if lay['zero1'] else 'off'}{' offload' if lay['offload'] else ''} "
            f"recompute={lay['recompute']} "
            f"micro-batch {lay['micro_batch']} x {lay['micro_batches']}")  # fmt: skip
    w = t["workload"]
    work = (
        f"{w['train_tokens']:.3g} tokens, {w['global_batch']} x {w['seq_len']} per step, {w['optimizer']}, "
        f"{w['precision']}, {'LSA' if w['sparse_attention'] else 'dense'} attention, MTP {'on' if w['mtp'] else 'off'}"
    )
    rows = [("workload", work), ("layout", head), ("chips", f"{lay['chips']:,}"),
            ("params per chip", _b(t["params_per_chip"]))]  # fmt: skip
    rows += [(f"memory: {k}", _gb(v)) for k, v in m.items() if k not in ("total", "capacity")]
    if lay["offload"]:
        rows.append(("host memory: optimizer (offloaded)", _gb(t["host_optimizer_bytes"])))
    rows += [("memory: total / usable HBM", f"{_gb(m['total'])} / {_gb(m['capacity'])}")]
    for k in ("tp", "ep", "dp", "pp", "cp", "embp", "offload"):
        if k == "offload" and not lay["offload"]:
            continue
        rows.append((f"comm {k}: bytes / time / exposed",
                     f"{_gb(t['comm_bytes'][k])} / {_t(t['comm_time'][k])} / {_t(t['comm_exposed'][k])}"))  # fmt: skip
    rows.append(("EP bytes if zero experts were sent", _gb(t["comm_bytes"]["ep_naive"])))
    rows += [("compute time / bubble", f"{_t(t['compute_time'])} / {t['bubble']:.1%}"),
             ("step time", _t(t["step_time"])), ("tokens per step", f"{t['tokens_per_step']:,.0f}"),
             ("steps", f"{t['steps']:,.0f}"), ("MFU", f"{t['mfu']:.1%}"), ("days to train", f"{t['days']:,.1f}"),
             ("chip-hours", f"{t['chip_hours'] / 1e6:,.2f} M")]  # fmt: skip
    return _rows(title, rows)


def _render_serve(s: dict[str, Any]) -> list[str]:
    d = s["decode_bytes_per_seq"]
    rows = [("context", f"{s['context']:,} tokens"),
            ("instance", f"{s['instance_chips']} chips ({s['nodes']:g} nodes), weights {_gb(s['weights_bytes'])}"),
            ("KV / indexer / MTP cache per token", f"{s['kv_bytes_per_token']:,} / {s['indexer_bytes_per_token']:,}"
             f" / {s['mtp_cache_bytes_per_token']:,} B"),
            ("cache per sequence", _gb(s["cache_bytes_per_sequence"])),
            ("decode bytes/step dense", _gb(d["dense"])),
            ("decode bytes/step LSA" + ("+HI" if d.get("hi") else "") + " (main + indexer)", f"{_gb(d['sparse'])} ({_gb(d['sparse_main'])} + "
             f"{_gb(d['indexer'])}), {d['ratio']:.1f}x less, indexer {d['share']:.0%}"),
            ("max concurrency per instance / node", f"{s['max_concurrency']} / {s['max_concurrency_per_node']:.2f}"),
            ("concurrency planned", str(s["concurrency"])),
            ("weights read per step", _gb(s["weights_read_per_step"]))]  # fmt: skip
    for mode, f in s["decode_floor"].items():
        rows.append((f"decode floor ({mode})", f"{_t(f['seconds'])}/step, {f['tokens_per_s_per_seq']:,.1f} tok/s "
                     f"per sequence, {f['tokens_per_s']:,.0f} tok/s per instance"))  # fmt: skip
    if "meets_target" in s:
        rows.append(("meets --target-tps", "yes" if s["meets_target"] else "no"))
    return _rows("serving (bandwidth floor, attention caches + weights)", rows)


def run(args: argparse.Namespace) -> int:
    try:
        plan = build_plan(args)
    except (PlanError, ConfigError) as e:
        print(f"longcat2 plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0
