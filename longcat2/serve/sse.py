"""Server-sent events: formatting and a streaming response that always releases its generator.

Design choices:
- `SSEResponse` is a `StreamingResponse` that closes its body iterator when the stream ends for any
  reason (finished, client gone, server shutting down), so the generator's `finally` (which cancels the
  engine request and frees its batch slot) runs at once instead of whenever the garbage collector
  finalizes it. Starlette already watches for `http.disconnect` and cancels the stream when it arrives.
- Proxy-friendly headers: no caching, no buffering (`X-Accel-Buffering: no`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Send

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_data(obj: Any) -> bytes:
    """`data: JSON` (the OpenAI style)."""
    return f"data: {_dumps(obj)}\n\n".encode()


def sse_event(event: str, obj: Any) -> bytes:
    """`event: NAME` + `data: JSON` (the Anthropic style)."""
    return f"event: {event}\ndata: {_dumps(obj)}\n\n".encode()


class SSEResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[bytes], status_code: int = 200) -> None:
        super().__init__(
            content, status_code=status_code, headers=SSE_HEADERS, media_type="text/event-stream"
        )

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
