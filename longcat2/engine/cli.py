"""`longcat2 generate`: run the inference engine from the command line.

    longcat2 generate --prompt "def fib(n):" --max-new-tokens 64 --stream     # the embedded model
    longcat2 generate --model runs/x --prompt "import os"                      # a run's latest checkpoint
    longcat2 generate --preset tiny --prompt-ids 1,2,3 --max-new-tokens 16 --seed 0

`--model` (default: the embedded `longcat-2.0-tiny`) is resolved by `longcat2.model_dir` (a model folder,
a training run folder, or the embedded model's name) and loaded with `LongCatForCausalLM.from_pretrained`;
its tokenizer (if the folder has one) encodes `--prompt` and decodes the output. The EOS / stop token that
ends the generation is not printed (as vLLM and transformers' `skip_special_tokens` leave it out). A preset
builds a randomly initialised model (seeded by `--seed`), which has no tokenizer: give `--prompt-ids` and the
output is printed as ids.
"""

from __future__ import annotations

import argparse
import sys
import time

from longcat2.config import INFERENCE_KEYS, PRESETS, parse_override
from longcat2.model_dir import MODEL_HELP
from longcat2.parallel import serving


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def add_index_args(p: argparse.ArgumentParser, override: bool = True) -> None:
    """--index-dtype and --override (hierarchical indexing settings), shared by generate, serve and eval."""
    p.add_argument("--index-dtype", choices=["bf16", "fp8"], default=None,
                   help="index-key cache: bf16, or fp8 (e4m3 + fp32 scale per token, Hadamard-rotated); "
                        "default: the KV cache dtype")  # fmt: skip
    if override:
        p.add_argument("--override", action="append", type=parse_override, metavar="KEY=VALUE",
                       help=f"inference setting of the model config (repeatable): {', '.join(INFERENCE_KEYS)}; "
                            "e.g. lsa_hi=true turns hierarchical indexing on")  # fmt: skip


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from longcat2.config import ModelConfig, with_inference_overrides
    from longcat2.engine import Engine, SamplingParams
    from longcat2.engine.cpu import choose_threads
    from longcat2.model.longcat import LongCatForCausalLM
    from longcat2.model_dir import resolve_model_dir

    torch.set_num_threads(choose_threads(args.threads or None))
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    tokenizer = None
    layout = serving.setup(args)  # --tp / --ep under torchrun (a no-op in one process)
    if args.preset is None:  # errors (a bad --model, a broken checkpoint) are reported by longcat2.cli
        path = resolve_model_dir(args.model)
        model = serving.load_model(path, layout, dtype, args.dequantize_fp8)
        if (path / "tokenizer.json").is_file():
            from longcat2.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(path)
    else:
        cfg = ModelConfig.from_preset(args.preset)
        torch.manual_seed(args.seed if args.seed is not None else 0)
        model = LongCatForCausalLM(cfg)
        if dtype is not None:
            model = model.to(dtype)
        model = serving.shard(model, layout)
    model.config = with_inference_overrides(model.config, args.override)
    model.eval()
    if args.prompt_ids is not None:
        prompt = args.prompt_ids
    elif tokenizer is not None:
        prompt = tokenizer.encode(args.prompt)
    else:
        print("error: this model has no tokenizer; pass --prompt-ids 1,2,3", file=sys.stderr)
        return 2
    if not prompt:
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    if max(prompt) >= model.config.vocab_size or min(prompt) < 0:
        print(f"error: prompt ids must be in [0, {model.config.vocab_size})", file=sys.stderr)
        return 2
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or [],
        ignore_eos=args.ignore_eos,
    )
    engine = Engine(
        model,
        speculative=args.speculative,
        num_draft_tokens=args.num_draft_tokens,
        detokenize=tokenizer.decode if tokenizer is not None else None,
        eos_token_id=-1,
        max_step_tokens=args.prefill_chunk,
        index_dtype=args.index_dtype,
    )
    engine = serving.drive(engine, layout)  # ranks > 0 follow rank 0 here, then print nothing
    if engine is None:
        return 0
    try:
        return _generate(args, engine, prompt, params, tokenizer)
    finally:
        serving.close(engine)


def _generate(args: argparse.Namespace, engine, prompt: list[int], params, tokenizer) -> int:
    from longcat2.engine.scheduler import text_token_ids

    engine.add_request(prompt, params)
    stream = tokenizer.decode_stream() if (tokenizer is not None and args.stream) else None
    t0 = time.perf_counter()
    first = None
    out: list[int] = []  # every generated id (the count below); text_ids: those printed as text
    text_ids: list[int] = []
    reason = None
    for ev in engine.stream():
        if ev.new_token_ids and first is None:
            first = time.perf_counter() - t0
        out.extend(ev.new_token_ids)
        text_ids.extend(text_token_ids(ev))
        if args.stream:
            if stream is not None:
                sys.stdout.write("".join(stream.step(t) for t in text_token_ids(ev)))
            else:
                sys.stdout.write("".join(f"{t} " for t in ev.new_token_ids))
            sys.stdout.flush()
        if ev.finished:
            reason = ev.finish_reason
    dt = time.perf_counter() - t0
    if args.stream:
        sys.stdout.write("\n")
    elif tokenizer is not None:
        print(tokenizer.decode(text_ids))
    else:
        print(",".join(str(t) for t in out))
    rate = f"{(len(out) - 1) / (dt - first):.1f} tok/s decode" if first is not None and len(out) > 1 else ""
    extra = f", draft acceptance {engine.acceptance_rate:.0%}" if args.speculative else ""
    print(
        f"[{len(prompt)} prompt + {len(out)} generated tokens, finish: {reason}, "
        f"first token {1000 * (first or 0):.0f} ms, {rate}{extra}]",
        file=sys.stderr,
    )
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text (or token ids) with the inference engine")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help=MODEL_HELP)
    src.add_argument("--preset", choices=list(PRESETS), metavar="PRESET",
                     help=f"a preset with random weights: {', '.join(PRESETS)}")  # fmt: skip
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer in the model directory)")
    prompt.add_argument("--prompt-ids", type=_ids, help="prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (and the preset's weight seed)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--num-draft-tokens", type=int, default=None, help="1..3 (default: the MTP depth)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per engine step")
    add_index_args(p)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0 = auto: the cores this process may use minus the current load, at least 1; "
        "env LONGCAT2_THREADS)",
    )
    serving.add_parallel_args(p)
    p.set_defaults(func=_cmd_generate)
