"""Multi-rank inference for the commands (`generate`, `serve`, `eval`): `--tp` / `--ep`, loading, lockstep.

    torchrun --nproc_per_node 16 -m longcat2 serve --model DIR --tp 16 --ep 16

Design choices:
- One switch for the commands: `add_parallel_args` adds `--tp`, `--ep` and `--dequantize-fp8`; `setup`
  creates the process group and groups (nothing in a single process); `load_model` loads this rank's
  shard (`loading.py`, FP8 kept FP8 unless asked otherwise) and prints its per-rank bytes and peak RSS to
  stderr; `drive(engine, layout)` returns the handle rank 0 drives (`LockstepEngine`) or, on every other
  rank, follows rank 0 until it closes and returns None (the command then exits 0 without output).
- A single process with an unquantised checkpoint takes the 1-process loader unchanged
  (`from_pretrained`); an FP8 checkpoint is loaded FP8-resident there too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from longcat2.parallel.inference import InferenceLayout, init_inference, parallelize_for_inference
from longcat2.parallel.mesh import barrier, env_rank_world, shutdown

SERVE_TIMEOUT_S = 7 * 24 * 3600  # followers wait inside a broadcast while the server is idle


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process inference (launch with torchrun --nproc_per_node N)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (attention heads, FFNs, vocab)")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel degree (routed experts)")
    g.add_argument(
        "--dequantize-fp8",
        action="store_true",
        help="load an FP8 checkpoint dequantised to --dtype (default: FP8 weights stay FP8)",
    )


def wanted(args: argparse.Namespace) -> bool:
    """Whether the command runs multi-process (degrees > 1 or launched with several ranks)."""
    return getattr(args, "tp", 1) * getattr(args, "ep", 1) > 1 or env_rank_world()[1] > 1


def setup(args: argparse.Namespace, timeout_s: float | None = None) -> InferenceLayout:
    return init_inference(getattr(args, "tp", 1), getattr(args, "ep", 1), timeout_s=timeout_s)


def is_fp8_checkpoint(path: Path) -> bool:
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "fp8"


def load_model(
    path: Path, layout: InferenceLayout, dtype: torch.dtype | None, dequantize_fp8: bool = False
) -> nn.Module:
    """This rank's shard of the checkpoint in `path` (the whole model in a single process)."""
    from longcat2.model.longcat import LongCatForCausalLM
    from longcat2.parallel.loading import load_for_inference, load_summary

    fp8 = is_fp8_checkpoint(path) and not dequantize_fp8
    if not layout.distributed and not fp8:
        return LongCatForCausalLM.from_pretrained(path, dtype=dtype)
    model, stats = load_for_inference(
        LongCatForCausalLM, path, layout, dtype=dtype, fp8="keep" if fp8 else "dequantize"
    )
    print(f"longcat2: {load_summary(model, stats, layout)}", file=sys.stderr, flush=True)
    return model


def shard(model: nn.Module, layout: InferenceLayout) -> nn.Module:
    """Shard a model built in full on every rank (a preset with seeded random weights), then move the
    shard to the rank's device (in a single process the model stays where it is)."""
    parallelize_for_inference(model, layout)
    return model.to(layout.device) if layout.distributed else model


def drive(engine, layout: InferenceLayout):
    """Rank 0: the engine handle to drive (`LockstepEngine`; the engine itself in one process).
    Other ranks: follow rank 0 until it closes, then None."""
    if not layout.distributed:
        return engine
    from longcat2.parallel.lockstep import LockstepEngine, follow

    if layout.rank == 0:
        return LockstepEngine(engine)
    follow(engine)
    finish()
    return None


def close(engine) -> None:
    """Release the followers (no-op for a plain engine), then end the process group (`finish`)."""
    closer = getattr(engine, "close", None)
    if closer is not None:
        closer()
        finish()


def finish() -> None:
    """Every rank, after its command's last collective: a barrier, then the process group is destroyed
    explicitly. Left to interpreter shutdown, gloo's threads could abort a rank that had finished its work
    ("terminate called without an active exception", exit -6), failing a run whose output was complete."""
    barrier()
    shutdown()


def follow_server(engine, tokenizer) -> None:
    """A server rank > 0: follow rank 0's engine; grammar constraints are compiled here from their source."""
    from longcat2.engine.grammar import Grammars
    from longcat2.parallel.lockstep import follow

    grammars: list[Grammars] = []

    def compile_grammar(lark: str):
        if not grammars:
            grammars.append(Grammars(tokenizer.backend.to_str(), engine.cfg.vocab_size, tokenizer.eos_id))
        return grammars[0].compile(lark)

    follow(engine, compile_grammar)
    finish()


def close_server(worker) -> None:
    """After the server stopped: release the followers once the engine thread is gone (it steps the engine)."""
    thread = getattr(worker, "_thread", None)
    if thread is None or not thread.is_alive():
        close(worker.engine)
