"""Requests, their outputs, and the continuous-batching scheduler.

Design choices:
- A request moves WAITING → PREFILL → DECODE → FINISHED. The scheduler admits waiting requests first come,
  first served while fewer than `max_batch_size` requests are active; finished and aborted requests leave at
  once, so the batch refills every step (continuous batching).
- Each step gets a token budget (`max_step_tokens`): every decoding request costs one token (its decode
  row), and what is left goes to prompt chunks of prefilling requests in arrival order. Long prompts
  therefore prefill in chunks interleaved with other requests' decode steps, and prefill memory is bounded
  by the chunk size.
- Stop handling lives here (`Request.append`): stop token ids, EOS (unless `ignore_eos`), stop strings
  (matched on the detokenized tail of the output through the engine's `detokenize` callback), and
  max_new_tokens. Tokens after a stop in the same step (speculative decoding emits several) are dropped.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from longcat2.engine.runner import SeqState
from longcat2.engine.sampling import RequestSampler, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """One streaming event: tokens produced for a request in one engine step."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" (stop id/string/EOS), "length", "abort", "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended the request
    token_ids: list[int] = field(default_factory=list)  # all output tokens so far
    error: str | None = None  # finish_reason "error": what failed
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_cache_written_tokens: int = 0  # prompt tokens this request added to the prefix cache


def text_token_ids(out: RequestOutput) -> list[int]:
    """`out.new_token_ids` without the stop token (EOS or a stop token id) that ended the request: the ids
    kept in `token_ids`, but left out of the text, as vLLM and transformers' decoding leave them out."""
    ids = list(out.new_token_ids)
    stop_token = out.finished and out.finish_reason == "stop" and isinstance(out.stop_reason, int)
    return ids[:-1] if stop_token and ids and ids[-1] == out.stop_reason else ids


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    sampler: RequestSampler
    on_output: Callable[[RequestOutput], None] | None = None
    status: Status = Status.WAITING
    seq: SeqState | None = None
    output: list[int] = field(default_factory=list)
    num_prefilled: int = 0
    num_cached_tokens: int = 0  # prompt positions reused from the prefix cache
    num_cache_written_tokens: int | None = None  # prompt positions this request added to the prefix cache
    preemptions: int = 0  # times the request gave its cache back and was requeued
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    pending_hidden: torch.Tensor | None = None  # speculative: main hidden of positions mtp_len .. N-1
    drafts_proposed: int = 0
    drafts_accepted: int = 0
    error: str | None = None  # why the request failed (finish_reason "error")

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def prefill_ids(self) -> list[int]:
        """What prefill must run: the prompt, and after a preemption the output so far too (the logits of
        its last token give the next token, as its decode step would have)."""
        return self.prompt + self.output if self.preemptions else self.prompt

    def append(
        self,
        tokens: list[int],
        eos_token_id: int | None,
        detokenize: Callable[[list[int]], str] | None,
    ) -> list[int]:
        """Add sampled tokens, stopping at the first stop condition. → the tokens actually kept."""
        kept = []
        p = self.params
        max_stop = max((len(s) for s in p.stop), default=0)
        for tok in tokens:
            if len(self.output) >= p.max_new_tokens:
                self._finish("length")
                break
            self.output.append(tok)
            kept.append(tok)
            if tok in p.stop_token_ids or (tok == eos_token_id and not p.ignore_eos):
                self._finish("stop", tok)
                break
            if p.stop and detokenize is not None:
                # the tail of the output that can contain a stop string (+ slack for multi-byte tokens)
                tail = detokenize(self.output[-(max_stop + 8) :])
                hit = next((s for s in p.stop if s in tail), None)
                if hit is not None:
                    self._finish("stop", hit)
                    break
            if len(self.output) >= p.max_new_tokens:
                self._finish("length")
                break
        return kept

    def _finish(self, reason: str, stop: int | str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop


class Scheduler:
    def __init__(self, max_batch_size: int = 8, max_step_tokens: int = 512) -> None:
        if max_batch_size <= 0 or max_step_tokens <= 0:
            raise ValueError("max_batch_size and max_step_tokens must be positive")
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        if req in self.active:
            self.active.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def preempt(self, req: Request) -> None:
        """Take a running request out of the batch and put it first in the queue, to be recomputed."""
        self.active.remove(req)
        req.status = Status.WAITING
        req.num_prefilled = 0
        req.preemptions += 1
        self.waiting.appendleft(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    def schedule(
        self, admit: Callable[[Request], None] | None = None
    ) -> tuple[list[tuple[Request, int]], list[Request]]:
        """→ (prefill chunks [(request, number of prompt tokens)], decoding requests). `admit` is called on
        each request as it leaves the queue (the engine gives it its cache sequence and cached prefix,
        which sets `num_prefilled`)."""
        while self.waiting and len(self.active) < self.max_batch_size:
            req = self.waiting.popleft()
            req.status = Status.PREFILL
            if admit is not None:
                admit(req)
            self.active.append(req)
        decode = [r for r in self.active if r.status is Status.DECODE]
        budget = max(1, self.max_step_tokens - len(decode))
        prefill = []
        for r in self.active:
            if r.status is Status.PREFILL and budget > 0:
                n = min(budget, len(r.prefill_ids) - r.num_prefilled)
                prefill.append((r, n))
                budget -= n
        return prefill, decode
