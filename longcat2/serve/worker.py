"""The bridge between asyncio request handlers and the synchronous, step-driven inference engine.

Design choices:
- One background thread (`EngineWorker`) owns the engine and runs its step loop; nothing else touches
  the engine. Handlers `submit()` a prompt and get a `RequestHandle` whose async iterator yields
  `Chunk`s. New requests and cancellations are handed to the thread through a condition-guarded inbox and
  applied between steps, so requests join and leave the running batch at every step (continuous batching;
  the engine's scheduler admits up to `max_batch` requests and prefills long prompts in chunks alongside
  the others' decode rows).
- Outputs go back through the handlers' event loop with one `loop.call_soon_threadsafe` per step carrying
  every request's chunk (one wake-up of the loop per step, not one per request), never blocking the
  engine thread on a slow client.
- Detokenization happens in the engine thread with one incremental decoder per request (special tokens
  kept, so the chat parser downstream sees the tags; the EOS/stop token that ends a request is counted but
  not decoded). Stop strings are matched here on the full output text, independent of how the engine
  matches them: text that could be the start of a stop string is held back until it is resolved, the
  text is cut before the stop string, and the engine request is aborted as soon as a stop string appears.
  The engine is given the stop strings as well so it can stop on its own step.
- Slow clients: a request whose consumer has not taken `max_backlog` delivered chunks (a streaming client
  that stopped reading: the SSE writer blocks once the socket buffers fill) is aborted and ends with an
  "error" chunk, so it does not hold a batch slot while the server generates output nobody reads, and
  its undelivered output stays bounded.
- Admission control: at most `max_batch` requests run and at most `max_queue` wait; `submit` raises
  `QueueFull` beyond that (the API layer answers 429) and `ShuttingDown` once draining began (503).
- Cancellation: `RequestHandle.cancel()` (called when a client disconnects or a handler is cancelled)
  removes a waiting request or aborts a running one at the next step boundary, which frees its cache
  blocks and batch slot. `shutdown(timeout)` stops admitting, lets running requests finish for up to
  `timeout` seconds, then aborts the rest and joins the thread.
- A request that fails on its own inside the engine step (its forward or its sampling raised; the engine
  isolates it) ends with an "error" chunk carrying the engine's message; the others in the batch go on.
  Only if `engine.step()` itself raises does every request in flight fail with an "error" chunk (the API
  layer reports a 500 or an error event), and the engine is asked to abort them so the next requests
  start clean.
- `Metrics` is a small thread-safe registry rendered in the Prometheus text format (`GET /metrics`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from longcat2.engine.scheduler import text_token_ids

log = logging.getLogger("longcat2.serve")


class QueueFull(RuntimeError):
    """More requests are waiting than `max_queue` allows."""


class ShuttingDown(RuntimeError):
    """The server is draining and accepts no new requests."""


class EngineOutput(Protocol):
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None


class Backend(Protocol):
    """What the worker needs from an engine (`longcat2.engine.Engine` has exactly this surface)."""

    def add_request(
        self, prompt_ids: Sequence[int], params: Any = None, request_id: str | None = None
    ) -> str: ...

    def step(self) -> Sequence[EngineOutput]: ...

    def abort(self, request_id: str) -> bool: ...

    def has_unfinished(self) -> bool: ...


class TextDecoder(Protocol):
    def step(self, token_id: int) -> str: ...


class Detokenizer(Protocol):
    def decode_stream(self) -> TextDecoder: ...


@dataclass
class Chunk:
    """What a request's consumer receives: new text (stop-string safe) and, on the last chunk, why it ended.

    finish_reason: None while running, else "stop" (EOS, stop token or stop string), "length", "abort"
    (cancelled or shut down) or "error"."""

    text: str
    token_ids: list[int]
    completion_tokens: int
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# --------------------------------------------------------------------------------------- stop strings


class StopMatcher:
    """Incremental stop-string search over a growing text; holds back a possible stop-string prefix."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Add text; return what is safe to emit. After a match, returns the text before it and ignores the rest."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        self._pending += text
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = self._pending.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            self.matched = best[1]
            out, self._pending = self._pending[: best[0]], ""
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(s[:k]):
                    hold = k
                    break
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.matched is not None else self._pending), ""
        return out


# -------------------------------------------------------------------------------------------- metrics


class Metrics:
    """Counters and gauges of the server, rendered as Prometheus text."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.window_s = window_s
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejected = 0
        self.steps = 0
        self.step_time_s = 0.0
        self.batch_size = 0
        self.queue_depth = 0
        self.running = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self._recent: deque[tuple[float, int]] = deque()
        self.prefix_cache: Callable[[], dict[str, float]] | None = None  # the engine's prefix_cache_stats

    def record_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def record_step(self, batch: int, tokens: int, seconds: float, running: int, queued: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.steps += 1
            self.step_time_s += seconds
            self.batch_size = batch
            self.running, self.queue_depth = running, queued
            self.generation_tokens += tokens
            if tokens:
                self._recent.append((now, tokens))
            self._trim(now)

    def set_load(self, running: int, queued: int) -> None:
        with self._lock:
            self.running, self.queue_depth = running, queued

    def record_prompt(self, tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += tokens

    def record_finish(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def record_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def record_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_count += 1

    def _trim(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            if not self._recent:
                return 0.0
            total = sum(n for _, n in self._recent)
            span = max(now - self._recent[0][0], 1.0)
            return total / min(span, self.window_s)

    def snapshot(self) -> dict[str, Any]:
        tps = self.tokens_per_second()
        with self._lock:
            return {
                "uptime_s": time.time() - self.started,
                "requests": {f"{e} {s}": n for (e, s), n in sorted(self.requests.items())},
                "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens,
                "finished": dict(self.finished),
                "rejected": self.rejected,
                "engine_steps": self.steps,
                "batch_size": self.batch_size,
                "running": self.running,
                "queue_depth": self.queue_depth,
                "tokens_per_second": tps,
                "ttft_avg_s": self.ttft_sum / self.ttft_count if self.ttft_count else 0.0,
                "prefix_cache": self.prefix_cache() if self.prefix_cache else None,
            }

    def prometheus(self, prefix: str = "longcat2") -> str:
        tps = self.tokens_per_second()
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP {prefix}_{name} {doc}")
                lines.append(f"# TYPE {prefix}_{name} {kind}")
                for labels, value in samples:
                    lines.append(f"{prefix}_{name}{labels} {value:g}")

            metric(
                "requests_total",
                "counter",
                "HTTP requests by endpoint and status.",
                [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())],
            )
            metric(
                "request_finish_total",
                "counter",
                "Generations by finish reason.",
                [(f'{{reason="{r}"}}', n) for r, n in sorted(self.finished.items())],
            )
            metric(
                "requests_rejected_total", "counter", "Requests refused (queue full).", [("", self.rejected)]
            )
            metric("prompt_tokens_total", "counter", "Prompt tokens submitted.", [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generation_tokens)])
            metric("engine_steps_total", "counter", "Engine steps run.", [("", self.steps)])
            metric(
                "engine_step_seconds_total",
                "counter",
                "Time spent in engine steps.",
                [("", self.step_time_s)],
            )
            metric("running_requests", "gauge", "Requests in the running batch.", [("", self.running)])
            metric("queue_depth", "gauge", "Requests waiting for a batch slot.", [("", self.queue_depth)])
            metric(
                "batch_size",
                "gauge",
                "Requests that produced tokens in the last step.",
                [("", self.batch_size)],
            )
            metric(
                "tokens_per_second",
                "gauge",
                f"Generated tokens per second over the last {self.window_s:g} s.",
                [("", tps)],
            )
            metric(
                "time_to_first_token_seconds_sum",
                "counter",
                "Sum of times to first token.",
                [("", self.ttft_sum)],
            )
            metric(
                "time_to_first_token_seconds_count",
                "counter",
                "Requests with a first token.",
                [("", self.ttft_count)],
            )
            if self.prefix_cache is not None:
                pc = self.prefix_cache()
                for name, kind, key, doc in (
                    (
                        "prefix_cache_queries_total",
                        "counter",
                        "queries",
                        "Prefix-cache lookups (one per request).",
                    ),
                    (
                        "prefix_cache_query_tokens_total",
                        "counter",
                        "query_tokens",
                        "Prompt tokens looked up.",
                    ),
                    (
                        "prefix_cache_hit_tokens_total",
                        "counter",
                        "hit_tokens",
                        "Prompt tokens served from it.",
                    ),
                    ("prefix_cache_hit_rate", "gauge", "hit_rate", "Hit tokens / looked-up tokens."),
                    ("prefix_cache_blocks", "gauge", "blocks", "Cache blocks with a prefix key."),
                    ("prefix_cache_idle_blocks", "gauge", "idle_blocks", "Cached blocks no request holds."),
                    ("prefix_cache_capacity_blocks", "gauge", "capacity_blocks", "Most idle blocks kept."),
                    ("prefix_cache_evictions_total", "counter", "evictions", "Cached blocks evicted (LRU)."),
                ):
                    metric(name, kind, doc, [("", pc[key])])
            metric("uptime_seconds", "gauge", "Seconds since start.", [("", time.time() - self.started)])
            return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- worker


@dataclass
class _Req:
    rid: str
    prompt_ids: list[int]
    params: Any
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Chunk]
    submitted: float = field(default_factory=time.monotonic)
    decoder: TextDecoder | None = None
    matcher: StopMatcher | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache
    cache_written_tokens: int = 0  # prompt tokens this request added to it
    admitted: bool = False
    done: bool = False
    first_token: bool = False
    sent: int = 0  # chunks delivered (engine thread)
    taken: int = 0  # chunks the consumer took (event loop)


class RequestHandle:
    """The consumer side of one request: iterate it for `Chunk`s; `cancel()` to stop it early."""

    def __init__(self, worker: EngineWorker, req: _Req) -> None:
        self._worker = worker
        self._req = req
        self.request_id = req.rid
        self.prompt_tokens = len(req.prompt_ids)
        self.finished = False

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far (counted by the engine thread)."""
        return self._req.completion_tokens

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (known once the first token is out)."""
        return self._req.cached_tokens

    @property
    def cache_written_tokens(self) -> int:
        return self._req.cache_written_tokens

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Chunk]:
        while not self.finished:
            chunk = await self._req.queue.get()
            self._req.taken += 1
            if chunk.finished:
                self.finished = True
            yield chunk

    async def collect(self) -> Chunk:
        """Wait for the end; → one chunk with all the text and the finish information."""
        texts, ids = [], []
        last: Chunk | None = None
        async for c in self:
            texts.append(c.text)
            ids += c.token_ids
            last = c
        assert last is not None
        return Chunk(
            "".join(texts), ids, last.completion_tokens, last.finish_reason, last.stop_reason, last.error
        )

    def cancel(self) -> None:
        """Abort the request (no-op once it has finished); frees its batch slot at the next step."""
        if not self.finished:
            self.finished = True
            self._worker.cancel(self.request_id)


class EngineWorker:
    """Owns an engine in a background thread and runs its step loop (see the module docstring)."""

    def __init__(
        self,
        engine: Backend,
        tokenizer: Detokenizer,
        *,
        max_batch: int,
        max_queue: int,
        metrics: Metrics | None = None,
        make_params: Callable[..., Any] | None = None,
        idle_wait_s: float = 0.5,
        max_backlog: int = 2048,
    ) -> None:
        if max_batch <= 0 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.idle_wait_s = idle_wait_s
        self.max_backlog = max_backlog
        self._cond = threading.Condition()
        self._inbox: list[_Req] = []
        self._cancels: list[str] = []
        self._reqs: dict[str, _Req] = {}  # every request not yet finished (inbox, waiting or running)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._abort_all = False
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Chunk], Chunk]]] | None = None
        self.draining = False
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="longcat2-engine", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting; wait up to `timeout` s for in-flight requests; abort the rest; join the thread."""
        self.draining = True
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self._reqs and time.monotonic() < deadline and self.alive:
                self._cond.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            self._abort_all = True
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    # ------------------------------------------------------------------ consumer API

    @property
    def in_flight(self) -> int:
        return len(self._reqs)

    def load(self) -> tuple[int, int]:
        """(running, queued)."""
        n = len(self._reqs)
        running = min(n, self.max_batch)
        return running, n - running

    def submit(self, prompt_ids: list[int], params: Any, stops: Sequence[str] = ()) -> RequestHandle:
        """Queue a request; must be called from the event loop that will consume the handle."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self.draining or self._stop:
                raise ShuttingDown("the server is shutting down")
            if not self.alive:
                raise ShuttingDown("the engine thread is not running")
            if len(self._reqs) >= self.max_batch + self.max_queue:
                self.metrics.record_rejected()
                raise QueueFull(
                    f"server busy: {len(self._reqs)} requests in flight "
                    f"(max_batch={self.max_batch}, max_queue={self.max_queue}); retry later"
                )
            rid = f"r{next(self._ids)}"
            req = _Req(rid, list(prompt_ids), params, list(stops), loop, asyncio.Queue())
            self._reqs[rid] = req
            self._inbox.append(req)
            self._cond.notify_all()
        self.metrics.record_prompt(len(prompt_ids))
        self.metrics.set_load(*self.load())
        return RequestHandle(self, req)

    def cancel(self, rid: str) -> None:
        with self._cond:
            if rid in self._reqs:
                self._cancels.append(rid)
                self._cond.notify_all()

    # ------------------------------------------------------------------ engine thread

    def _deliver(self, req: _Req, chunk: Chunk) -> None:
        req.sent += 1
        if chunk.finished:
            req.done = True
            self.metrics.record_finish(chunk.finish_reason or "unknown")
            with self._cond:
                self._reqs.pop(req.rid, None)
                self._cond.notify_all()
        if self._outbox is not None:  # inside a step: sent in one batch per event loop by _flush
            self._outbox.setdefault(req.loop, []).append((req.queue, chunk))
            return
        self._send(req.loop, [(req.queue, chunk)])

    @staticmethod
    def _put_all(items: list[tuple[asyncio.Queue[Chunk], Chunk]]) -> None:
        for queue, chunk in items:
            queue.put_nowait(chunk)

    def _send(self, loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue[Chunk], Chunk]]) -> None:
        try:
            loop.call_soon_threadsafe(self._put_all, items)
        except RuntimeError:  # the consumer's loop is closed (shutdown); nothing to tell
            pass

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox or {}, None
        for loop, items in outbox.items():
            self._send(loop, items)

    def _finish_local(self, req: _Req, reason: str, error: str | None = None) -> None:
        text = req.matcher.flush() if req.matcher is not None and reason != "error" else ""
        self._deliver(req, Chunk(text, [], req.completion_tokens, reason, None, error))

    def _admit(self, req: _Req) -> None:
        try:
            self.engine.add_request(req.prompt_ids, req.params, request_id=req.rid)
        except Exception as e:  # invalid prompt/params: the API layer checks first, so this is rare
            log.warning("request %s rejected by the engine: %s", req.rid, e)
            self._finish_local(req, "error", f"the engine rejected the request: {e}")
            return
        req.admitted = True
        req.decoder = self.tokenizer.decode_stream()
        req.matcher = StopMatcher(req.stops)

    def _take_inbox(self) -> tuple[list[_Req], list[str], bool, bool]:
        with self._cond:
            while not (self._inbox or self._cancels or self._stop or self._has_engine_work()):
                self._cond.wait(timeout=self.idle_wait_s)
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
            return inbox, cancels, self._stop, self._abort_all

    def _has_engine_work(self) -> bool:
        try:
            return bool(self.engine.has_unfinished())
        except Exception:
            return False

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # pragma: no cover - a bug in the loop itself
            log.exception("engine thread crashed")
            self.error = e
            for req in list(self._reqs.values()):
                self._finish_local(req, "error", f"engine thread crashed: {e}")

    def _loop(self) -> None:
        while True:
            inbox, cancels, stop, abort_all = self._take_inbox()
            for req in inbox:
                if req.rid in cancels:
                    continue
                self._admit(req)
            for rid in cancels:
                req = self._reqs.get(rid)
                if req is None or req.done:
                    continue
                if req.admitted:
                    self.engine.abort(rid)  # the engine reports the "abort" event at the next step
                else:
                    self._finish_local(req, "abort")
            if abort_all:
                for req in list(self._reqs.values()):
                    if req.admitted and not req.done:
                        self.engine.abort(req.rid)
                    elif not req.done:
                        self._finish_local(req, "abort")
            if self._has_engine_work():
                self._step()
            elif stop:
                return
            if stop and not self._reqs and not self._has_engine_work():
                return

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outputs = list(self.engine.step())
        except Exception as e:
            log.exception("engine step failed")
            for req in list(self._reqs.values()):
                if req.admitted and not req.done:
                    try:
                        self.engine.abort(req.rid)  # its abort event is ignored: the request is done
                    except Exception:
                        pass
                    self._finish_local(req, "error", f"engine error: {type(e).__name__}: {e}")
            return
        dt = time.perf_counter() - t0
        produced = 0
        batch = 0
        self._outbox = {}
        try:
            for out in outputs:
                req = self._reqs.get(out.request_id)
                if req is None or req.done:
                    continue
                produced += len(out.new_token_ids)
                batch += 1 if out.new_token_ids else 0
                self._on_output(req, out)
        finally:
            self._flush()
        running, queued = self.load()
        self.metrics.record_step(batch, produced, dt, running, queued)

    def _on_output(self, req: _Req, out: EngineOutput) -> None:
        req.cached_tokens, req.cache_written_tokens = out.num_cached_tokens, out.num_cache_written_tokens
        if out.finished and out.finish_reason == "error":
            log.warning("request %s failed in the engine: %s", req.rid, getattr(out, "error", None))
            self._finish_local(req, "error", f"engine error: {getattr(out, 'error', None) or 'unknown'}")
            return
        ids = list(out.new_token_ids)
        req.completion_tokens += len(ids)
        if ids and not req.first_token:
            req.first_token = True
            self.metrics.record_ttft(time.monotonic() - req.submitted)
        assert req.decoder is not None and req.matcher is not None
        raw = "".join(req.decoder.step(t) for t in text_token_ids(out))  # type: ignore[arg-type]
        text = req.matcher.push(raw)
        if req.matcher.matched is not None:
            if not out.finished:
                self.engine.abort(req.rid)  # its "abort" event will find the request done and be ignored
            self._deliver(req, Chunk(text, ids, req.completion_tokens, "stop", req.matcher.matched))
            return
        if out.finished:
            reason = out.finish_reason or "stop"
            text += req.matcher.flush()
            stop_reason = out.stop_reason
            self._deliver(req, Chunk(text, ids, req.completion_tokens, reason, stop_reason))
            return
        if req.sent - req.taken >= self.max_backlog:
            log.warning(
                "request %s aborted: its client has not read %d chunks", req.rid, req.sent - req.taken
            )
            self.engine.abort(req.rid)  # its "abort" event will find the request done and be ignored
            msg = f"the client stopped reading: {req.sent - req.taken} chunks were not read"
            self._finish_local(req, "error", msg)
            return
        if text or ids:
            self._deliver(req, Chunk(text, ids, req.completion_tokens))
