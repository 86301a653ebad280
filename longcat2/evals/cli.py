"""`longcat2 eval longctx` and `longcat2 eval ppl`.

`--model` (default: the embedded `longcat-2.0-tiny`) is resolved by `longcat2.model_dir`: a model folder, a
training run folder (its latest checkpoint) or the embedded model's name. `--preset` evaluates a randomly
initialised model (a smoke test). `--lengths` takes spaces, commas or both (`256 512`, `256,512`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longcat2.config import PRESETS, parse_override
from longcat2.engine.cli import add_index_args
from longcat2.model_dir import MODEL_HELP
from longcat2.parallel.serving import add_parallel_args, finish


def _ints(text: str) -> list[int]:
    """One `--lengths` word: an integer or a comma-separated list of them."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by spaces or commas, got {text!r}"
        ) from e
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return values


def _load_model(args: argparse.Namespace):
    import torch

    from longcat2.config import ModelConfig
    from longcat2.model.attention import set_sparse_attention
    from longcat2.model.longcat import LongCatForCausalLM
    from longcat2.model_dir import resolve_model_dir
    from longcat2.parallel import serving

    torch.set_num_threads(args.threads)
    overrides = dict(args.override or [])
    layout = serving.setup(args)  # --tp / --ep under torchrun: every rank runs the same evaluation (SPMD)
    args.rank = layout.rank  # only rank 0 reports
    if layout.distributed and overrides:
        raise ValueError("--override: not supported with --tp/--ep")
    if args.preset is None:
        path = resolve_model_dir(args.model)
        model = serving.load_model(path, layout, torch.float32, args.dequantize_fp8)
        if (
            overrides
        ):  # shape-preserving fields only (LSA budget, RoPE scaling, ...): same weights, new config
            state = model.state_dict()
            model = LongCatForCausalLM(model.config.replace(**overrides).validate())
            model.load_state_dict(state)
    else:
        torch.manual_seed(0)
        model = serving.shard(LongCatForCausalLM(ModelConfig.from_preset(args.preset, **overrides)), layout)
    set_sparse_attention(model, args.attention == "sparse")
    return model.eval()


def _cmd_longctx(args: argparse.Namespace) -> int:
    from longcat2.evals.longctx import evaluate_longctx, heatmap

    model = _load_model(args)
    lengths = list(dict.fromkeys(n for word in args.lengths for n in word))  # flattened, in order, once each
    res = evaluate_longctx(
        model,
        args.task,
        lengths,
        depths=args.depths,
        per_cell=args.per_cell,
        seed=args.seed,
        index_dtype=args.index_dtype,
    )
    finish()  # every rank's last collective is done: end the process group (multi-process runs)
    if args.rank != 0:
        return 0
    if args.heatmap:
        res["heatmap"] = str(heatmap(res, args.heatmap))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{args.task}: mean accuracy {res['mean']:.3f}")
        print("length  " + "  ".join(f"{d:>5.0%}" for d in res["depths"]))
        for length in lengths:
            row = res["accuracy"][str(length)]
            print(f"{length:<7} " + "  ".join(f"{row[str(d)]:5.2f}" for d in res["depths"]))
    return 0


def _cmd_ppl(args: argparse.Namespace) -> int:
    from longcat2.data import ensure_prepared
    from longcat2.evals.ppl import evaluate_ppl

    model = _load_model(args)
    shard_dir = (
        Path(args.data) if args.data != "stdlib" else ensure_prepared("stdlib", None, model.config.vocab_size)
    )
    res = evaluate_ppl(model, shard_dir, args.seq_len, args.batch_size, args.max_windows, args.trailing)
    finish()  # every rank's last collective is done: end the process group (multi-process runs)
    if args.rank != 0:
        return 0
    print(
        json.dumps(res, indent=2)
        if args.json
        else " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())
    )
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="long-context and perplexity evaluation")
    ev = p.add_subparsers(dest="eval_command", metavar="EVAL")
    for name, func, helptext in (
        ("longctx", _cmd_longctx, "synthetic long-context tasks: accuracy per length x depth"),
        ("ppl", _cmd_ppl, "validation loss, bits per byte, trailing-token loss"),
    ):
        q = ev.add_parser(name, help=helptext)
        g = q.add_mutually_exclusive_group()
        g.add_argument("--model", help=MODEL_HELP)
        g.add_argument("--preset", choices=list(PRESETS), metavar="PRESET",
                       help=f"a preset with random weights, a smoke test: {', '.join(PRESETS)}")  # fmt: skip
        q.add_argument("--json", action="store_true")
        q.add_argument(
            "--attention",
            choices=["sparse", "dense"],
            default="sparse",
            help="dense: never select (A/B runs)",
        )
        q.add_argument(
            "--override",
            action="append",
            type=parse_override,
            metavar="KEY=VALUE",
            help="override a shape-preserving model config field, e.g. index_topk=128 (repeatable)",
        )
        q.add_argument("--threads", type=int, default=1)
        if name == "longctx":  # (ppl runs the model's forward, which has no cache)
            add_index_args(q, override=False)
        q.add_argument("--seed", type=int, default=1234)
        add_parallel_args(q)
        q.set_defaults(func=func)
        if name == "longctx":
            q.add_argument("--task", default="passkey", choices=["passkey", "niah", "mqar", "vt"])
            q.add_argument(
                "--lengths",
                nargs="+",
                type=_ints,
                default=[[1024, 2048, 4096, 8192]],
                metavar="N",
                help="context lengths, separated by spaces or commas (default: 1024 2048 4096 8192)",
            )
            q.add_argument("--depths", type=int, default=10)
            q.add_argument("--per-cell", type=int, default=8)
            q.add_argument("--heatmap", help="write a heatmap PNG here")
        else:
            q.add_argument("--data", required=True, help="prepared shard folder or 'stdlib'")
            q.add_argument("--seq-len", type=int, default=512)
            q.add_argument("--batch-size", type=int, default=4)
            q.add_argument("--max-windows", type=int, default=None)
            q.add_argument("--trailing", type=int, default=0, help="also report loss on the last N positions")
