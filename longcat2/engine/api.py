"""`Engine` (what a server drives) and `generate` (what `LongCatForCausalLM.generate` calls).

Design choices:
- The engine is synchronous and step-driven: `add_request` queues, `step()` runs one scheduler step (one
  batched forward of prompt chunks + decode rows, or a speculative round) and returns `RequestOutput`
  events; `stream()` steps until idle and yields the events; per-request `on_output` callbacks fire with the
  same events. A server calls `step()` from its own loop/thread and routes events by `request_id`.
- `abort(request_id)` takes effect immediately: blocks are freed and a final event with finish_reason
  "abort" is emitted by the next `step()`.
- One request's failure is its own: if the batched forward, a speculative round or the MTP prefill raises,
  the engine retries it one request at a time and only a request that still fails is dropped; a request
  whose sampling or stop handling raises is dropped alone. A dropped request ends with finish_reason
  "error" and the exception's message in `RequestOutput.error`, and its cache blocks are freed.
- Stop strings need text: pass `detokenize(ids) -> str` (e.g. `tokenizer.decode`).
- Speculative decoding is an engine mode (all decode rows go through MTP draft + verify rounds, except
  grammar-constrained ones, which decode one token a step); prefill is shared with plain decoding and
  additionally fills the MTP cache.
- Prefix caching is on by default (`prefix_cache_bytes` of unreferenced cache blocks may be kept; 0 turns
  it off): a request reuses the longest cached block-aligned prefix of its prompt and prefills only the rest
  (`num_cached_tokens` on its events); completed blocks are offered to the cache after every step, so
  concurrent requests with a common prefix share it too. `prefix_cache_stats()` reports hits and evictions.
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

from longcat2.engine.cache import CacheFull
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
        index_dtype: torch.dtype | str | None = None,
        index_rotate: bool | None = None,
        index_mode: str = "auto",
        prefix_cache_bytes: int = 1 << 30,
    ) -> None:
        """eos_token_id: -1 = the model config's; None = no EOS stop. prefix_cache_bytes: memory the prefix
        cache may keep in blocks no running request holds (0: no prefix caching)."""
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
            index_rotate=index_rotate,
            index_mode=index_mode,
        )
        if prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes: must be >= 0, got {prefix_cache_bytes}")
        cache = self.runner.cache
        cache.prefix_cache_blocks = prefix_cache_bytes // (cache.bytes_per_token() * cache.block_size)
        self.scheduler = Scheduler(max_batch_size, max_step_tokens)
        self.spec: SpeculativeDecoder | None = None
        if speculative:
            k = num_draft_tokens if num_draft_tokens is not None else min(3, max(1, self.cfg.mtp_num_layers))
            self.spec = SpeculativeDecoder(self.runner, k)
        self.requests: dict[str, Request] = {}
        self._aborted: list[Request] = []
        self._ids = itertools.count()
        self.stats = {
            "steps": 0,
            "prompt_tokens": 0,
            "cached_prompt_tokens": 0,
            "output_tokens": 0,
            "preemptions": 0,
            "time_s": 0.0,
        }

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
        cache = self.runner.cache
        if cache.max_blocks is not None and -(-(len(prompt) + 1) // cache.block_size) > cache.max_blocks:
            raise ValueError(
                f"prompt_ids: {len(prompt)} tokens cannot fit in the KV cache "
                f"(max_blocks={cache.max_blocks} of {cache.block_size} tokens)"
            )
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
        prefill, decode = self.scheduler.schedule(self._admit)
        prefill, decode = self._reserve(prefill, decode, events)
        new: dict[str, list[int]] = {}
        segs: list[Segment] = []
        owners: list[Request] = []
        for req, n in prefill:
            s = req.num_prefilled
            ids = req.prefill_ids
            done = s + n == len(ids)
            segs.append(Segment(req.seq, torch.tensor(ids[s : s + n]), s, "last" if done else "none"))
            owners.append(req)
        # constrained requests decode one token a step (their grammar masks each position in turn)
        plain = decode if self.spec is None else [r for r in decode if r.sampler.constraint is not None]
        drafted = [r for r in decode if r.sampler.constraint is None] if self.spec is not None else []
        for req in plain:
            seq = req.seq
            segs.append(Segment(seq, torch.tensor(seq.tokens[-1:]), len(seq.tokens) - 1, "last"))
            owners.append(req)
        results = self._forward(segs, owners, events) if segs else []
        to_mask = [  # the rows sampled this step: their grammar masks, in one batch
            r
            for r, res in zip(owners, results)
            if res is not None and r.sampler.constraint is not None and res[0] is not None
        ]
        self._isolated_batch([r.sampler for r in to_mask], to_mask, events, fill_masks)
        chunks = []
        for i, (req, n) in enumerate(prefill):
            if results[i] is None:
                continue
            logits, hidden = results[i]
            start = req.num_prefilled
            req.num_prefilled += n
            self.stats["prompt_tokens"] += n
            if self.spec is not None:
                chunks.append((req, start, n, hidden))
            if req.num_prefilled == len(req.prefill_ids):
                req.status = Status.DECODE
                self._sample(req, logits, new, events)
        if chunks:
            self._isolated_batch(chunks, [c[0] for c in chunks], events, self.spec.after_prefill)  # type: ignore[union-attr]
        batched = [  # plain greedy decode rows: one argmax for all of them
            (req, res[0])
            for req, res in zip(plain, results[len(prefill) :])
            if res is not None and req.sampler.plain_greedy
        ]
        if len(batched) > 1:
            for (req, _), tok in zip(
                batched, torch.cat([lg for _, lg in batched]).float().argmax(-1).tolist()
            ):
                new[req.request_id] = [tok]
        for j, req in enumerate(plain):
            res = results[len(prefill) + j]
            if res is not None and req.request_id not in new:
                self._sample(req, res[0], new, events)
        if self.spec is not None and drafted:
            live = [r for r in drafted if not r.finished]

            def spec_round(reqs: list[Request]) -> None:
                for req, toks in zip(reqs, self.spec.round(reqs)):  # type: ignore[union-attr]
                    new[req.request_id] = toks

            self._isolated_batch(live, live, events, spec_round)
        for req in [r for r, _ in prefill] + decode:
            if req.request_id not in new and req.seq is not None:
                self.runner.commit(req.seq)  # a prompt chunk that did not finish the prompt
        for rid, toks in new.items():
            req = self.requests.get(rid)
            if req is None or req.finished:
                continue
            self._isolated(req, events, lambda r=req, t=toks: self._append(r, t, events))
        self.stats["steps"] += 1
        self.stats["time_s"] += time.perf_counter() - t0
        return events

    def _sample(
        self, req: Request, logits: torch.Tensor, new: dict[str, list[int]], events: list[RequestOutput]
    ) -> None:
        """logits [1, V] → the request's next token in `new` (or the request fails alone)."""
        try:
            new[req.request_id] = [req.sampler.sample(logits[0])]
        except Exception as e:
            self._fail(req, e, events)

    def _append(self, req: Request, toks: list[int], events: list[RequestOutput]) -> None:
        kept = req.append(toks, self.eos_token_id, self.detokenize)
        for t in kept:
            req.sampler.observe(t)
        req.seq.tokens.extend(kept)  # type: ignore[union-attr]
        self.runner.commit(req.seq)  # type: ignore[arg-type]
        self.stats["output_tokens"] += len(kept)
        events.append(self._event(req, kept))
        if req.finished:
            self._release(req)

    # ------------------------------------------------------------------ failure isolation
    # A failure while running or sampling one request fails that request alone ("error" event with the
    # message) and the rest of the step goes on: batched work that raises is retried one request at a time,
    # so only the request that fails on its own is dropped (its cache blocks are freed).
    def _fail(self, req: Request, exc: Exception, events: list[RequestOutput]) -> None:
        if req.finished:
            return
        req.error = f"{type(exc).__name__}: {exc}"
        req._finish("error")
        self._release(req)
        events.append(self._event(req, []))

    def _isolated(self, req: Request, events: list[RequestOutput], fn: Callable[[], Any]) -> None:
        if req.finished:
            return
        try:
            fn()
        except Exception as e:
            self._fail(req, e, events)

    def _isolated_batch(
        self, items: list[Any], reqs: list[Request], events: list[RequestOutput], fn: Callable[[list], Any]
    ) -> None:
        """fn(items) for the whole batch; if it raises, fn([item]) per request, failing those that raise."""
        items = [x for x, r in zip(items, reqs) if not r.finished]
        reqs = [r for r in reqs if not r.finished]
        if not items:
            return
        try:
            fn(items)
            return
        except Exception as e:
            if len(items) == 1:
                self._fail(reqs[0], e, events)
                return
        for item, req in zip(items, reqs):
            self._isolated(req, events, lambda x=item: fn([x]))

    def _forward(
        self, segs: list[Segment], owners: list[Request], events: list[RequestOutput]
    ) -> list[tuple[torch.Tensor | None, torch.Tensor] | None]:
        """Per segment: (logits, hidden rows [T, H]), or None when its request failed."""
        results: list[tuple[torch.Tensor | None, torch.Tensor] | None] = [None] * len(segs)

        def run(idx: list[int]) -> None:
            out = self.runner.forward([segs[i] for i in idx])
            for k, i in enumerate(idx):
                t = int(segs[i].tokens.shape[0])
                results[i] = (out.logits[k], out.hidden[out.offsets[k] : out.offsets[k] + t])

        self._isolated_batch(list(range(len(segs))), owners, events, run)
        return results

    def _admit(self, req: Request) -> None:
        """A request leaves the queue: its cache sequence, with the longest cached prefix of its prompt
        (after a preemption: of its prompt and output so far)."""
        req.seq = self.runner.new_sequence(req.prefill_ids)
        req.num_prefilled = self.runner.attach_prefix(req.seq)
        if not req.preemptions:
            req.num_cached_tokens = req.num_prefilled
            self.stats["cached_prompt_tokens"] += req.num_cached_tokens

    def _reserve(
        self, prefill: list[tuple[Request, int]], decode: list[Request], events: list[RequestOutput]
    ) -> tuple[list[tuple[Request, int]], list[Request]]:
        """Cache blocks for this step's rows, oldest request first. When the pool is full and may not grow,
        the newest running request is preempted (its blocks freed, to be recomputed later: with the prefix
        cache most of it comes back as cache hits) until the rest fit; a request that cannot fit even
        alone fails with an error."""
        extra = self.spec.num_draft if self.spec is not None else 0
        need = {r.request_id: r.num_prefilled + n for r, n in prefill}
        need.update({r.request_id: len(r.seq.tokens) + extra for r in decode})  # type: ignore[union-attr]
        for req in list(self.scheduler.active):
            if req.request_id not in need or req.status is Status.WAITING:
                continue
            while True:
                try:
                    expect = len(req.prompt) + req.params.max_new_tokens + extra
                    self.runner.cache.reserve(req.seq.blocks, need[req.request_id], expect)  # type: ignore[union-attr]
                    break
                except CacheFull as e:
                    victim = self.scheduler.active[-1]
                    if victim is req and len(self.scheduler.active) == 1:
                        self._fail(req, CacheFull(f"the request does not fit in the KV cache: {e}"), events)
                        break
                    self._preempt(victim)
                    if victim is req:
                        break
        live = {id(r) for r in self.scheduler.active}
        prefill = [(r, n) for r, n in prefill if id(r) in live and r.status is Status.PREFILL]
        decode = [r for r in decode if id(r) in live and r.status is Status.DECODE]
        return prefill, decode

    def _preempt(self, req: Request) -> None:
        self.runner.free(req.seq)  # type: ignore[arg-type]
        req.seq = None
        req.pending_hidden = None
        self.scheduler.preempt(req)
        self.stats["preemptions"] += 1

    def prefix_cache_stats(self) -> dict[str, float]:
        """Lookups, prompt tokens looked up and served from the cache, hit rate, keyed blocks (held or
        only cached), cached blocks nobody holds, evictions."""
        cache = self.runner.cache
        st = dict(cache.prefix_stats)
        st["hit_rate"] = st["hit_tokens"] / st["query_tokens"] if st["query_tokens"] else 0.0
        st["blocks"] = cache.num_cached_blocks
        st["idle_blocks"] = len(cache.lru)
        st["capacity_blocks"] = cache.prefix_cache_blocks
        return st

    def _event(self, req: Request, kept: list[int]) -> RequestOutput:
        if req.num_cache_written_tokens is None and req.seq is not None and req.output:
            keyed = min(len(req.seq.blocks.keys) * self.runner.cache.block_size, len(req.prompt))
            req.num_cache_written_tokens = max(0, keyed - req.num_cached_tokens)
        ev = RequestOutput(
            req.request_id,
            kept,
            req.finished,
            req.finish_reason,
            req.stop_reason,
            list(req.output),
            req.error,
            num_cached_tokens=req.num_cached_tokens,
            num_cache_written_tokens=req.num_cache_written_tokens or 0,
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
