"""Run one engine on many ranks in lockstep: rank 0 drives, every other rank follows.

    engine = Engine(model, ...)                      # on every rank, over a model sharded by inference.py
    if rank == 0: eng = LockstepEngine(engine)      # same surface as Engine: add_request / step / abort ...
                  ...; eng.close()
    else:         follow(engine)                     # returns when rank 0 closes

Design choices:
- Every rank holds a whole engine (scheduler, paged cache with the replicated latents, samplers); only
  the model underneath is sharded. What changes an engine's state from outside is requests arriving and
  being aborted; everything else (which rows a step schedules, prefill chunks, preemption, speculative
  rounds, sampling) is a deterministic function of that state and of the logits, which are the same on all
  ranks (every all-reduce / all-gather leaves identical tensors everywhere). So rank 0 broadcasts, before
  each step, the requests added and aborted since the last one (`broadcast_object_list`, on the CPU side
  of the group), and every rank then runs `engine.step()`: each rank schedules the same batch and runs the
  same forward with its slice of the weights. Broadcasting the inputs of the scheduler instead of its
  output keeps the engine untouched (the scheduler, speculative decoding and failure isolation are one code).
- Sampling: a request without a seed gets one drawn on rank 0 before it is broadcast, so every rank's
  per-request generator draws the same numbers (greedy needs nothing).
- Divergence is detected, not assumed away: each broadcast carries a digest of rank 0's previous step
  outputs (request ids, tokens, finish reasons); a follower whose own digest differs raises
  `LockstepError` instead of running collectives out of step.
- Grammar-constrained requests carry a compiled matcher that cannot be sent: the request travels with the
  grammar's Lark source (`Constraint.source`) and each follower compiles its own matcher
  (`follow(..., compile_grammar=...)`); the matchers then advance on the same tokens.
- Failures: the engine's per-request failure isolation works as in one process when the failure is the
  same on every rank (a bad request, a sampling error: same inputs, same code). A failure on one rank
  only (a device error, out of memory on one device) leaves the ranks' collectives out of step; the
  launcher (torchrun) then stops the job.
- A follower waits for rank 0 inside a broadcast; an idle server keeps them there, so servers create the
  process group with a long timeout (`init_inference(timeout_s=...)`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from longcat2.engine.api import Engine
from longcat2.engine.sampling import SamplingParams


class LockstepError(RuntimeError):
    """A follower's engine produced different outputs from rank 0's."""


def _digest(outputs: Sequence[Any]) -> str:
    h = hashlib.sha1()
    for o in outputs:
        h.update(f"{o.request_id}:{list(o.new_token_ids)}:{o.finish_reason};".encode())
    return h.hexdigest()


def _broadcast(obj: Any, group: dist.ProcessGroup | None = None) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


@dataclasses.dataclass
class _GrammarSource:
    lark: str


class LockstepEngine:
    """Rank 0's engine handle: the `Engine` surface; every call that changes state reaches the followers."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ops: list[tuple] = []
        self._last = _digest([])
        self._closed = False

    def __getattr__(self, name: str) -> Any:  # stats, runner, prefix_cache_stats, ... come from the engine
        return getattr(self.engine, name)

    def add_request(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        on_output: Callable | None = None,
    ) -> str:
        params = dataclasses.replace(params) if params is not None else SamplingParams()
        if params.seed is None:
            params.seed = random.getrandbits(63)
        sent = params
        if params.grammar is not None:
            source = getattr(params.grammar, "source", None)
            if source is None:
                raise ValueError(
                    "grammar: a multi-rank engine needs a constraint compiled from a grammar source"
                )
            sent = dataclasses.replace(params, grammar=_GrammarSource(source))
        prompt = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        rid = self.engine.add_request(prompt, params, request_id, on_output)  # validates here, on rank 0
        self._ops.append(("add", prompt, sent, rid))
        return rid

    def abort(self, request_id: str) -> bool:
        found = self.engine.abort(request_id)
        if found:
            self._ops.append(("abort", request_id))
        return found

    def step(self) -> list:
        ops, self._ops = self._ops, []
        _broadcast(("step", ops, self._last))
        outputs = self.engine.step()
        self._last = _digest(outputs)
        return outputs

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def stream(self) -> Iterator:
        while self.has_unfinished():
            yield from self.step()

    def close(self) -> None:
        """Release the followers (their `follow` returns)."""
        if not self._closed:
            self._closed = True
            _broadcast(("close", [], self._last))


def follow(engine: Engine, compile_grammar: Callable[[str], Any] | None = None) -> int:
    """A follower rank's loop: apply rank 0's requests and aborts, step; returns the number of steps.
    `compile_grammar(lark) -> Constraint` rebuilds grammar constraints (needed when requests carry them)."""
    last = _digest([])
    steps = 0
    while True:
        kind, ops, want = _broadcast(None)
        if want != last:
            raise LockstepError(
                f"rank {dist.get_rank()}: step {steps} produced other tokens than rank 0 (digest {last[:12]} "
                f"vs {want[:12]}); the ranks' logits differ"
            )
        if kind == "close":
            return steps
        for op in ops:
            if op[0] == "add":
                params = op[2]
                if isinstance(params.grammar, _GrammarSource):
                    if compile_grammar is None:
                        raise LockstepError("grammar: this follower cannot compile grammars (no tokenizer)")
                    params.grammar = compile_grammar(params.grammar.lark)
                engine.add_request(op[1], params, op[3])
            else:
                engine.abort(op[1])
        last = _digest(engine.step())
        steps += 1
