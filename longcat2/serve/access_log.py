"""The access log: one line per HTTP request, written when its response has been sent completely.

    INFO longcat2.serve.access: 127.0.0.1:50412 "POST /v1/chat/completions HTTP/1.1" 200 0.843s 25 in / 12 out tokens

Design choices:
- A pure ASGI middleware (the outermost one, so it sees the status the error guard sends) logs after the
  last body chunk, so a stream's line carries its whole duration and its final token counts — uvicorn's
  own access log fires at the response start and knows no tokens; it stays off (`--log-level debug` shows
  it too).
- Token counts come from the generation requests the request submitted: `ServerState.submit` hands every
  `RequestHandle` to `track`, which appends it to a per-request list held in a context variable (set by
  the middleware; the handlers and their streaming tasks run in copies of that context and share the
  list). Tokens in = prompt tokens, out = generated tokens, summed over the request's generations
  (`n`, several prompts); requests that generate nothing (`/health`, `/v1/models`, errors) show none.
- Standard `logging` on the `longcat2.serve.access` logger at INFO: the CLI's `--log-level` and any logging
  configuration apply; `--no-access-log` does not install the middleware at all.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("longcat2.serve.access")

_generations: ContextVar[list[Any] | None] = ContextVar("longcat2_access_generations", default=None)


def track(handle: Any) -> None:
    """Count `handle` (a `RequestHandle`: `prompt_tokens`, `completion_tokens`) in the current request's line."""
    handles = _generations.get()
    if handles is not None:
        handles.append(handle)


class AccessLog:
    """ASGI middleware: one INFO line per HTTP request (client, method, path, status, seconds, tokens)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [0]
        handles: list[Any] = []
        token = _generations.set(handles)

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _generations.reset(token)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "%s", format_line(scope, status[0] or 500, time.perf_counter() - start, handles)
                )


def format_line(scope: Scope, status: int, seconds: float, handles: list[Any]) -> str:
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "-"
    path = scope.get("path", "")
    query = scope.get("query_string", b"")
    target = f"{path}?{query.decode('latin-1')}" if query else path
    line = f'{who} "{scope.get("method", "")} {target} HTTP/{scope.get("http_version", "1.1")}" {status} {seconds:.3f}s'
    if handles:
        tokens_in = sum(h.prompt_tokens for h in handles)
        tokens_out = sum(h.completion_tokens for h in handles)
        line += f" {tokens_in} in / {tokens_out} out tokens"
    return line
