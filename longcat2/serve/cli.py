"""`longcat2 serve`: an OpenAI- and Anthropic-compatible HTTP server for a LongCat model.

Design choices:
- Defaults are safe for a workstation: bind to 127.0.0.1 (use `--host 0.0.0.0` to expose it), no API key
  unless `--api-key` or `LONGCAT2_API_KEY` is set.
- `--model` defaults to the model embedded in the package and accepts its name, a model folder or a
  training run folder (its latest checkpoint; `longcat2.model_dir`); an installation without the embedded
  model fails with a message saying how to get one, before anything is loaded.
- `--served-model-name` may list several names (aliases). With one name, any requested model name is
  answered by the served model (agents such as Claude Code insist on their own ids); `--strict-model-names`
  turns that off, `--any-model` turns it on for several names. `max_tokens` larger than what fits is
  clamped unless `--strict-max-tokens`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from longcat2.engine.cli import add_index_args
from longcat2.model_dir import MODEL_HELP


def _cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from longcat2.engine.cpu import choose_threads
    from longcat2.hf_checkpoint import parse_size
    from longcat2.serve.app import ServeError, resolve_model_dir, run_server
    from longcat2.serve.core import ServerConfig

    torch.set_num_threads(choose_threads(args.threads or None))
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    config = ServerConfig(
        model_dir=Path(args.model) if args.model else None,
        served_model_names=args.served_model_name or [],
        api_key=args.api_key or os.environ.get("LONGCAT2_API_KEY") or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
        default_temperature=args.default_temperature,
        clamp_max_tokens=not args.strict_max_tokens,
        constrained=not args.no_grammar,
        any_model=False if args.strict_model_names else (True if args.any_model else None),
        speculative=args.speculative,
        num_draft_tokens=args.num_draft_tokens,
        dtype=args.dtype,
        tp=args.tp,
        ep=args.ep,
        dequantize_fp8=args.dequantize_fp8,
        max_step_tokens=args.max_step_tokens,
        shutdown_timeout=args.shutdown_timeout,
        access_log=args.access_log,
        max_request_bytes=args.max_request_bytes,
        prefix_cache_bytes=0 if args.no_prefix_cache else parse_size(args.prefix_cache_size),
        index_dtype=args.index_dtype,
        model_overrides=dict(args.override or []),
    )
    positive = (
        ("--max-batch", args.max_batch),
        ("--max-step-tokens", args.max_step_tokens),
        ("--max-request-bytes", args.max_request_bytes),
    )
    for name, value in positive:
        if value < 1:
            print(f"error: {name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.max_queue < 0:
        print(f"error: --max-queue must be >= 0, got {args.max_queue}", file=sys.stderr)
        return 2
    try:
        path = resolve_model_dir(config)
        print(f"longcat2 serve: loading {path} ...", file=sys.stderr)
        print(
            f"longcat2 serve: http://{args.host}:{args.port}/v1 (OpenAI and Anthropic APIs)", file=sys.stderr
        )
        run_server(config, host=args.host, port=args.port, log_level=args.log_level)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _size(text: str) -> str:
    from longcat2.hf_checkpoint import parse_size

    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GB, 0)") from e
    return text


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over the OpenAI and Anthropic APIs",
        description=(
            "Serve a LongCat model with continuous batching: OpenAI /v1/chat/completions, /v1/completions, "
            "/v1/models; Anthropic /v1/messages, /v1/messages/count_tokens; /health and /metrics."
        ),
    )
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key", default=None, help="require this key (Bearer or x-api-key); env LONGCAT2_API_KEY"
    )
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use (default: the model directory's name)")  # fmt: skip
    p.add_argument("--any-model", action="store_true",
                   help="accept any model name in requests, also with several served names (one name: the default)")  # fmt: skip
    p.add_argument("--strict-model-names", action="store_true",
                   help="answer 404 to model names other than the served ones")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a batch slot; more are refused with 429 (default 64)")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length in tokens (default: the model's max_position_embeddings)")  # fmt: skip
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="output limit when a chat request sets none (default: the rest of the context)")  # fmt: skip
    p.add_argument("--default-temperature", type=float, default=None,
                   help="temperature when a request sets none (default: the model's generation_config.json, else 1.0)")  # fmt: skip
    p.add_argument("--clamp-max-tokens", action="store_true",
                   help="clamp max_tokens larger than what fits (the default; kept for old command lines)")  # fmt: skip
    p.add_argument("--strict-max-tokens", action="store_true",
                   help="answer 400 to a max_tokens larger than the context instead of clamping it")  # fmt: skip
    p.add_argument("--no-grammar", action="store_true",
                   help="no constrained decoding of replies (tool calls, tool_choice, JSON formats)")  # fmt: skip
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument(
        "--prefix-cache-size",
        default="1GiB",
        type=_size,
        metavar="SIZE",
        help="cache memory kept for prefix reuse once requests end, e.g. 512MiB (default 1GiB); "
        "the longest cached block-aligned prefix of every prompt is not prefilled again",
    )
    p.add_argument("--no-prefix-cache", action="store_true", help="turn prefix caching off")
    p.add_argument(
        "--num-draft-tokens", type=int, default=None, help="draft tokens per speculative round (<= 3)"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype (default: the checkpoint's)")  # fmt: skip
    p.add_argument(
        "--max-step-tokens", type=int, default=512, help="token budget of one engine step (prefill chunks)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0 = auto: the cores this process may use minus the current load, at least 1; "
        "env LONGCAT2_THREADS)",
    )
    add_index_args(p)
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown (default 30)")  # fmt: skip
    p.add_argument("--max-request-bytes", type=int, default=32 * 1024 * 1024,
                   help="larger request bodies are refused with a 413 (default 32 MiB)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log one line per request: client, method, path, status, seconds, tokens in/out "
                   "(default on; --no-access-log turns it off)")  # fmt: skip
    from longcat2.parallel.serving import add_parallel_args

    add_parallel_args(p)
    p.set_defaults(func=_cmd_serve)
