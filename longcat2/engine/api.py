"""`Engine` (what a server drives) and `generate` (what `LongCatForCausalLM.generate` calls).

Design choices:
- The engine is synchronous and step-driven: `add_request` queues, `step()` runs one scheduler step (one
  batched forward of prompt chunks + decode rows, or a speculative round) and returns `RequestOutput`
  events; `stream()` steps until idle and yields the events; per-request `on_output` callbacks fire with the
  same events. A server calls `step()` from its own loop/thread and routes events by `request_id`.
- `abort(request_id)` takes effect immediately: blocks are freed and a final event with finish_reason
  "abort" is emitted by the next `step()`.
- Stop strings need text: pass `detokenize(ids) -> str` (e.g. `tokenizer.decode`).
- Speculative decoding is an engine mode (all decode rows go through MTP draft + verify rounds, except
  grammar-constrained ones, which decode one token a step); prefill is shared with plain decoding and
  additionally fills the MTP cache.
- `generate` accepts a [B, T] tensor (returns [B, T + longest output] like transformers: prompt + output,
  right-padded with pad_token_id to the longest output) or a list of token-id lists of any lengths
  (returns the generated ids per prompt).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from longcat2.engine.grammar import fill_masks
from longcat2.engine.runner import ModelRunner, Segment
from longcat2.engine.sampling import RequestSampler, SamplingParams
from longcat2.engine.scheduler import Request, RequestOutput, Scheduler, Status
from longcat2.engine.speculative import SpeculativeDecoder


class Engine:
    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_size: int = 8,
        max_step_tokens: int = 512,
        block_size: int = 256,
        num_blocks: int = 16,
        max_blocks: int | None = None,
        speculative: bool = False,
        num_draft_tokens: int | None = None,
        detokenize: Callable[[list[int]], str] | None = None,
        eos_token_id: int | None = -1,
        cache_dtype: torch.dtype | None = None,
        index_dtype: torch.dtype | None = None,
        index_mode: str = "auto",
    ) -> None:
        """eos_token_id: -1 = the model config's; None = no EOS stop."""
        self.model = model.eval()
        self.cfg = model.config
        self.eos_token_id = self.cfg.eos_token_id if eos_token_id == -1 else eos_token_id
        self.detokenize = detokenize
        self.runner = ModelRunner(
            model,
            block_size=block_size,
            num_blocks=num_blocks,
            max_blocks=max_blocks,
            with_mtp=speculative,
            cache_dtype=cache_dtype,
            index_dtype=index_dtype,
            index_mode=index_mode,
        )
        self.scheduler = Scheduler(max_batch_size, max_step_tokens)
        self.spec: SpeculativeDecoder | None = None
        if speculative:
            k = num_draft_tokens if num_draft_tokens is not None else min(3, max(1, self.cfg.mtp_num_layers))
            self.spec = SpeculativeDecoder(self.runner, k)
        self.requests: dict[str, Request] = {}
        self._aborted: list[Request] = []
        self._ids = itertools.count()
        self.stats = {"steps": 0, "prompt_tokens": 0, "output_tokens": 0, "time_s": 0.0}

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> str:
        prompt = [
            int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)
        ]
        if not prompt:
            raise ValueError("prompt_ids: at least one token is needed")
        if any(t < 0 or t >= self.cfg.vocab_size for t in prompt):
            raise ValueError(f"prompt_ids: token ids must be in [0, {self.cfg.vocab_size})")
        params = params or SamplingParams()
        if params.stop and self.detokenize is None:
            raise ValueError("stop strings need Engine(detokenize=...)")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request_id {rid!r} is already active")
        req = Request(rid, prompt, params, RequestSampler(params, prompt, self.cfg.vocab_size), on_output)
        self.requests[rid] = req
        if params.max_new_tokens == 0:
            req._finish("length")
            self._aborted.append(req)  # reported (as finished) by the next step
            return rid
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        req._finish("abort")
        self._release(req)
        self._aborted.append(req)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborted)

    def _release(self, req: Request) -> None:
        self.scheduler.remove(req)
        if req.seq is not None:
            self.runner.free(req.seq)
            req.seq = None
        req.pending_hidden = None
        self.requests.pop(req.request_id, None)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        events: list[RequestOutput] = []
        for req in self._aborted:
            events.append(self._event(req, []))
            self.requests.pop(req.request_id, None)
        self._aborted = []
        prefill, decode = self.scheduler.schedule()
        new: dict[str, list[int]] = {}
        segs: list[Segment] = []
        for req, n in prefill:
            if req.seq is None:
                req.seq = self.runner.new_sequence(req.prompt)
            s = req.num_prefilled
            done = s + n == len(req.prompt)
            segs.append(Segment(req.seq, torch.tensor(req.prompt[s : s + n]), s, "last" if done else "none"))
        # constrained requests decode one token a step (their grammar masks each position in turn)
        plain = decode if self.spec is None else [r for r in decode if r.sampler.constraint is not None]
        drafted = [r for r in decode if r.sampler.constraint is None] if self.spec is not None else []
        for req in plain:
            seq = req.seq
            segs.append(Segment(seq, torch.tensor(seq.tokens[-1:]), len(seq.tokens) - 1, "last"))
        if segs:
            out = self.runner.forward(segs)
            last = [r.sampler for r, n in prefill if r.num_prefilled + n == len(r.prompt)]
            fill_masks(last + [r.sampler for r in plain])  # the grammar masks of this step, in one batch
            chunks = []
            for i, (req, n) in enumerate(prefill):
                start = req.num_prefilled
                req.num_prefilled += n
                self.stats["prompt_tokens"] += n
                if self.spec is not None:
                    chunks.append((req, start, n, out.hidden[out.offsets[i] : out.offsets[i] + n]))
                if req.num_prefilled == len(req.prompt):
                    new[req.request_id] = [req.sampler.sample(out.logits[i][0])]
                    req.status = Status.DECODE
            if chunks:
                self.spec.after_prefill(chunks)  # type: ignore[union-attr]
            for j, req in enumerate(plain):
                new[req.request_id] = [req.sampler.sample(out.logits[len(prefill) + j][0])]
        if self.spec is not None and drafted:
            for req, toks in zip(drafted, self.spec.round(drafted)):
                new[req.request_id] = toks
        for rid, toks in new.items():
            req = self.requests[rid]
            kept = req.append(toks, self.eos_token_id, self.detokenize)
            for t in kept:
                req.sampler.observe(t)
            req.seq.tokens.extend(kept)  # type: ignore[union-attr]
            self.stats["output_tokens"] += len(kept)
            events.append(self._event(req, kept))
            if req.finished:
                self._release(req)
        self.stats["steps"] += 1
        self.stats["time_s"] += time.perf_counter() - t0
        return events

    def _event(self, req: Request, kept: list[int]) -> RequestOutput:
        ev = RequestOutput(
            req.request_id, kept, req.finished, req.finish_reason, req.stop_reason, list(req.output)
        )
        if req.on_output is not None:
            req.on_output(ev)
        return ev

    def stream(self) -> Iterator[RequestOutput]:
        """Step until every request has finished, yielding the events as they are produced."""
        while self.has_unfinished():
            yield from self.step()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[list[int]]:
        """Run prompts to completion (batched); → output token ids per prompt."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        results: dict[str, list[int]] = {}
        for ev in self.stream():
            if ev.finished:
                results[ev.request_id] = ev.token_ids
        return [results[r] for r in rids]

    @property
    def acceptance_rate(self) -> float:
        return self.spec.acceptance_rate if self.spec is not None else 0.0


_SAMPLING_KEYS = {f for f in SamplingParams.__dataclass_fields__}


def generate(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[Sequence[int]] | Sequence[int],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    *,
    speculative: bool = False,
    num_draft_tokens: int | None = None,
    eos_token_id: int | None = -1,
    stream: Callable[[RequestOutput], None] | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    return_engine: bool = False,
    **sampling: Any,
) -> Any:
    """Generate from token ids. Sampling keywords: top_k, top_p, min_p, repetition_penalty,
    presence_penalty, frequency_penalty, seed (per prompt: seed + index), stop_token_ids, ignore_eos."""
    unknown = set(sampling) - _SAMPLING_KEYS
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
    as_tensor = isinstance(input_ids, torch.Tensor)
    if as_tensor:
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        prompts = ids.tolist()
    elif input_ids and isinstance(input_ids[0], int):
        prompts = [list(input_ids)]  # type: ignore[arg-type]
    else:
        prompts = [list(p) for p in input_ids]  # type: ignore[union-attr]
    kw = dict(engine_kwargs or {})
    kw.setdefault("max_batch_size", max(1, len(prompts)))
    kw.setdefault("max_step_tokens", max(2048, len(prompts)))
    eng = Engine(
        model, speculative=speculative, num_draft_tokens=num_draft_tokens, eos_token_id=eos_token_id, **kw
    )
    seed = sampling.pop("seed", None)
    params = [
        SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=None if seed is None else seed + i,
            **sampling,
        )
        for i in range(len(prompts))
    ]
    rids = [eng.add_request(p, sp, on_output=stream) for p, sp in zip(prompts, params)]
    results: dict[str, list[int]] = {}
    for ev in eng.stream():
        if ev.finished:
            results[ev.request_id] = ev.token_ids
    outs = [results[r] for r in rids]
    if as_tensor:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        width = ids.shape[1] + max((len(o) for o in outs), default=0)
        full = torch.full((len(prompts), width), pad, dtype=ids.dtype)
        full[:, : ids.shape[1]] = ids
        for i, o in enumerate(outs):
            full[i, ids.shape[1] : ids.shape[1] + len(o)] = torch.tensor(o, dtype=ids.dtype)
        outs = full if input_ids.dim() == 2 else full[0]  # type: ignore[assignment]
    elif input_ids and isinstance(input_ids[0], int):
        outs = outs[0]  # type: ignore[assignment]
    return (outs, eng) if return_engine else outs
