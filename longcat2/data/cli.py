"""The data-preparation commands: `longcat2 tokenizer train` and `longcat2 prepare`.

`tokenizer train` trains a byte-level BPE (`longcat2.tokenizer.train_tokenizer`) on a corpus; `prepare`
tokenizes a corpus into token shards (`writer.prepare`) or writes synthetic long-context task rows
(`--task`, `longcat2.train.synthetic`).
"""

from __future__ import annotations

import argparse
import sys
import time

from longcat2.corpus import DataError, resolve_files
from longcat2.data.writer import DEFAULT_VAL_FRACTION, prepare
from longcat2.tokenizer import MIN_VOCAB_SIZE, TokenizerError, load_tokenizer, train_tokenizer


def _cmd_prepare(args: argparse.Namespace) -> int:
    missing = [f"--{n}" for n in ("data", "tokenizer") if getattr(args, n) is None]
    if missing and not args.task:
        print(
            f"error: prepare needs {' and '.join(missing)} (or --task SPEC for synthetic tasks)",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    try:
        if args.task:
            from longcat2.train.synthetic import prepare_task_files

            spec = args.task if args.task.startswith("task:") else f"task:{args.task}"
            meta = prepare_task_files(
                spec, args.out, seq_len=args.seq_len, n_train=args.examples, n_val=args.val_examples,
                seed=args.seed,
            )  # fmt: skip
        else:
            meta = prepare(
                args.data, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                max_bytes=args.max_bytes,
            )  # fmt: skip
    except (DataError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    if args.task:
        print(
            f"prepared {meta['spec']} in {time.perf_counter() - t0:.1f}s -> {args.out}\n"
            f"  train: {tr['rows']:,} rows x {args.seq_len + 1} tokens ({tr['answer_tokens']:,} answer tokens)\n"
            f"  val:   {va['rows']:,} rows ({va['answer_tokens']:,} answer tokens); vocab {meta['vocab_size']}\n"
            f"  train on it with: longcat2 train --data {args.out} --seq-len {args.seq_len} ..."
        )
        return 0
    print(
        f"prepared {meta['source']} in {time.perf_counter() - t0:.1f}s -> {args.out}\n"
        f"  train: {tr['tokens']:,} tokens, {tr['documents']:,} documents, {tr['files']} file(s)\n"
        f"  val:   {va['tokens']:,} tokens, {va['documents']:,} documents, {va['files']} file(s) "
        f"(split by {meta['split_unit']})\n"
        f"  dtype {meta['dtype']}, vocab {meta['vocab_size']}, {len(meta['skipped'])} file(s) with skips"
    )
    for s in meta["skipped"][:10]:
        print(f"  skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if len(meta["skipped"]) > 10:
        print(f"  ... {len(meta['skipped']) - 10} more in meta.json", file=sys.stderr)
    return 0


def _add_prepare(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="tokenize a corpus into train/val token shards",
        description="Tokenize a corpus into OUT/train.bin, OUT/val.bin (numpy memmaps) and OUT/meta.json; "
        "or, with --task, write synthetic long-context task rows (passkey, niah, mqar, vt) for `train --data OUT`.",
    )
    p.add_argument("--data", help="a text file, a folder, a .jsonl file ('text' field), or 'stdlib'")
    p.add_argument("--tokenizer", help="tokenizer directory (from `longcat2 tokenizer train`)")
    p.add_argument(
        "--task",
        help="synthetic tasks instead of a corpus: NAME[+NAME...][:key=value,...], e.g. passkey+niah:n_needles=4",
    )
    p.add_argument("--seq-len", type=int, default=1024, help="--task: tokens per training row (default 1024)")
    p.add_argument("--examples", type=int, default=10000, help="--task: training rows (default 10000)")
    p.add_argument("--val-examples", type=int, default=256, help="--task: validation rows (default 256)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"share of files held out for validation (default {DEFAULT_VAL_FRACTION})",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the validation split / of the task rows (default 0)"
    )
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes of text")
    p.set_defaults(func=_cmd_prepare)


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        src = resolve_files(args.data, max_bytes=args.max_bytes)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    skipped: list[str] = []
    try:
        out = train_tokenizer(
            src.files,
            args.vocab_size,
            args.out,
            min_frequency=args.min_frequency,
            max_bytes=args.max_bytes,
            on_skip=lambda path, reason: skipped.append(f"{path}: {reason}"),
        )
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = load_tokenizer(out)
    print(
        f"trained byte-level BPE: vocab {tok.vocab_size} (asked {args.vocab_size}) on {len(src.files)} "
        f"file(s) from {src.label} in {time.perf_counter() - t0:.1f}s -> {out}"
    )
    if skipped:
        print(f"skipped {len(skipped)} file(s) or jsonl line groups, e.g. {skipped[0]}", file=sys.stderr)
    return 0


def _add_tokenizer(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = sub.add_parser(
        "train",
        help="train a tokenizer",
        description="Train a byte-level BPE with the LongCat special tokens (bos=1, eos=</longcat_s>=2, pad=3).",
    )
    t.add_argument(
        "--data",
        required=True,
        help="a text file, a folder (recursive), a .jsonl file with a 'text' field, or 'stdlib'",
    )
    t.add_argument("--vocab-size", type=int, required=True, help=f"total vocabulary (>= {MIN_VOCAB_SIZE})")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes of input")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    t.set_defaults(func=_cmd_train)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    _add_tokenizer(subparsers)
    _add_prepare(subparsers)
