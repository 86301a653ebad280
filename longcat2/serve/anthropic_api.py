"""Anthropic-compatible endpoints: `POST /v1/messages` (streamed or not) and `POST /v1/messages/count_tokens`.

Design choices:
- Requests map onto the OpenAI-style messages of `longcat2.chat`: `system` (string or text blocks, joined
  with blank lines) becomes the system turn; in a user message, each run of `tool_result` blocks becomes
  `tool` messages and each run of text blocks a user message, in order; an assistant message's text,
  `thinking` and `tool_use` blocks become content, `reasoning_content` and `tool_calls` (arguments as
  dicts). Images are a 400 in user content; inside a tool result they become the placeholder `[image]` so
  an agent session that read an image file keeps going. `is_error` results are prefixed `Error: `.
- Tools: custom tools (`name`, `description`, `input_schema`) only; Anthropic server tools (`web_search_...`,
  `bash_...`) are a 400. `tool_choice`: auto → auto, any → a forced call, tool → a forced named call,
  none → no tools in the prompt.
- Thinking is on with `thinking: {"type": "enabled", ...}`, off with `disabled`, and otherwise follows the
  conversation. Reasoning is returned as a `thinking` block with a signature (a hash of the text: the
  server does not check signatures on input, it only has to give clients a non-empty value to echo).
- Streaming follows the API's event order exactly: `message_start`, `ping`, then per block
  `content_block_start` / `content_block_delta`* / `content_block_stop` (thinking blocks end with a
  `signature_delta`; a tool_use block carries its whole input in one `input_json_delta`), then
  `message_delta` (stop_reason, stop_sequence, output usage) and `message_stop`. Failures after the
  stream began are sent as an `error` event.
- stop_reason: end_turn (EOS), stop_sequence (with `stop_sequence` set), max_tokens, tool_use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from longcat2 import chat
from longcat2.serve.core import (
    ChatPrompt,
    Finished,
    ServerState,
    build_chat_prompt,
    chat_events,
    check_stops,
    new_id,
    parse_body,
    respond_chat,
)
from longcat2.serve.protocol import (
    AImageBlock,
    APIError,
    ATextBlock,
    AThinkingBlock,
    AToolResultBlock,
    AToolUseBlock,
    CountTokensRequest,
    MessagesRequest,
    anthropic_error_body,
)
from longcat2.serve.sse import sse_event

# ------------------------------------------------------------------------------------- conversion


def _tool_result_text(block: AToolResultBlock) -> str:
    if block.content is None:
        text = ""
    elif isinstance(block.content, str):
        text = block.content
    else:
        text = "".join(b.text if isinstance(b, ATextBlock) else "[image]" for b in block.content)
    return f"Error: {text}" if block.is_error else text


def _system_text(content: list[Any], i: int) -> list[str]:
    """The text blocks of a `system` message inside `messages` (rendered as a system turn)."""
    for j, b in enumerate(content):
        if not isinstance(b, ATextBlock):
            raise APIError(
                400,
                f"messages.{i}.content.{j}: a {b.type!r} block is not allowed in a system message",
                param=f"messages.{i}.content",
            )
    return [b.text for b in content]


def chat_messages(req: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "\n\n".join(b.text for b in req.system)
        if system:
            out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        if m.role == "system":
            out.append({"role": "system", "content": "".join(_system_text(m.content, i))})
            continue
        if m.role == "assistant":
            text, reasoning, calls = [], [], []
            for j, b in enumerate(m.content):
                if isinstance(b, ATextBlock):
                    text.append(b.text)
                elif isinstance(b, AThinkingBlock):
                    reasoning.append(b.thinking)
                elif isinstance(b, AToolUseBlock):
                    calls.append(
                        {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
                    )
                elif b.type == "redacted_thinking":
                    continue
                else:
                    raise APIError(
                        400,
                        f"messages.{i}.content.{j}: a {b.type!r} block is not allowed in an assistant message",
                        param=f"messages.{i}.content",
                    )
            d: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
            if reasoning:
                d["reasoning_content"] = "\n".join(reasoning)
            if calls:
                d["tool_calls"] = calls
            out.append(d)
            continue
        texts: list[str] = []
        for j, b in enumerate(m.content):
            if isinstance(b, AToolResultBlock):
                if texts:
                    out.append({"role": "user", "content": "".join(texts)})
                    texts = []
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _tool_result_text(b)})
            elif isinstance(b, ATextBlock):
                texts.append(b.text)
            elif isinstance(b, AImageBlock) or b.type == "document":
                raise APIError(
                    400,
                    f"messages.{i}.content.{j}: {b.type} blocks are not supported (this model reads text only)",
                    param=f"messages.{i}.content",
                )
            else:
                raise APIError(
                    400,
                    f"messages.{i}.content.{j}: a {b.type!r} block is not allowed in a user message",
                    param=f"messages.{i}.content",
                )
        if texts:
            out.append({"role": "user", "content": "".join(texts)})
    return out


def chat_tools(req: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]] | None:
    if not req.tools:
        return None
    tools = []
    for i, t in enumerate(req.tools):
        if t.type not in (None, "custom"):
            raise APIError(
                400,
                f"tools.{i}: server tool type {t.type!r} is not supported; define a custom tool",
                param="tools",
            )
        fn: dict[str, Any] = {"name": t.name}
        if t.description:
            fn["description"] = t.description
        fn["parameters"] = t.input_schema or {"type": "object", "properties": {}}
        tools.append({"type": "function", "function": fn})
    return tools


def chat_prompt(req: MessagesRequest | CountTokensRequest, constrained: bool = False) -> ChatPrompt:
    tools = chat_tools(req)
    choice = req.tool_choice
    mode, forced = "auto", None
    if choice is not None:
        if choice.type == "any":
            mode = "required"
        elif choice.type == "tool":
            if not choice.name:
                raise APIError(
                    400, "tool_choice.name: required when tool_choice.type is 'tool'", param="tool_choice"
                )
            mode, forced = "named", choice.name
        elif choice.type == "none":
            mode = "none"
    thinking = None if req.thinking is None else req.thinking.type != "disabled"
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    return build_chat_prompt(
        chat_messages(req),
        tools,
        thinking,
        mode,
        forced,
        constrained=constrained,
        parallel=parallel,
        json_schema=_output_schema(req),
    )


def _output_schema(req: MessagesRequest | CountTokensRequest) -> dict[str, Any] | None:
    """Structured output: `output_config.format` (or the older `output_format`) of type json_schema."""
    extra = req.model_extra or {}
    config = extra.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else extra.get("output_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    if not isinstance(fmt.get("schema"), dict):
        raise APIError(
            400, "output_config.format.schema: a JSON schema object is required", param="output_config"
        )
    return fmt["schema"]


# ---------------------------------------------------------------------------------------- builders


def signature(thinking: str) -> str:
    return "longcat2:" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


def stop_reason(fin: Finished) -> str:
    if fin.reason == "length":
        return "max_tokens"
    if fin.reason == "tool_calls":
        return "tool_use"
    if fin.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def usage(fin: Finished) -> dict[str, int]:
    """As the API counts: input_tokens + cache_creation_input_tokens + cache_read_input_tokens = the prompt;
    cache reads are the prefix-cache hit, cache creation the prompt tokens this request added to the cache."""
    return {
        "input_tokens": fin.prompt_tokens - fin.cached_tokens - fin.cache_written_tokens,
        "output_tokens": fin.completion_tokens,
        "cache_creation_input_tokens": fin.cache_written_tokens,
        "cache_read_input_tokens": fin.cached_tokens,
    }


def message_response(events: list[Any], fin: Finished, rid: str, model: str) -> dict[str, Any]:
    """The non-streamed `message` object: a thinking block, text, then tool_use blocks, in output order."""
    content: list[dict[str, Any]] = []
    for ev in events:
        last = content[-1] if content else None
        if isinstance(ev, chat.ReasoningDelta):
            if last is not None and last["type"] == "thinking":
                last["thinking"] += ev.text
            else:
                content.append({"type": "thinking", "thinking": ev.text, "signature": ""})
        elif isinstance(ev, chat.TextDelta):
            if last is not None and last["type"] == "text":
                last["text"] += ev.text
            else:
                content.append({"type": "text", "text": ev.text})
        elif isinstance(ev, chat.ToolCallEvent):
            content.append({"type": "tool_use", "id": ev.id, "name": ev.name, "input": ev.arguments})
    for block in content:
        if block["type"] == "thinking":
            block["signature"] = signature(block["thinking"])
    return {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(fin),
        "stop_sequence": fin.stop_sequence,
        "usage": usage(fin),
    }


async def message_stream(
    events: AsyncIterator[Any], rid: str, model: str, prompt_tokens: int
) -> AsyncIterator[bytes]:
    """SSE events of a streamed message, in the API's order."""
    yield sse_event(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": rid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": prompt_tokens,
                    "output_tokens": 0,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            },
        },
    )
    yield sse_event("ping", {"type": "ping"})
    index = -1
    open_kind: str | None = None
    thinking_text: list[str] = []

    def close() -> list[bytes]:
        nonlocal open_kind
        out = []
        if open_kind == "thinking":
            sig = signature("".join(thinking_text))
            out.append(
                sse_event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "signature_delta", "signature": sig},
                    },
                )
            )
        if open_kind is not None:
            out.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        open_kind = None
        return out

    def start(kind: str, block: dict[str, Any]) -> list[bytes]:
        nonlocal index, open_kind
        out = close()
        index += 1
        open_kind = kind
        out.append(
            sse_event(
                "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
            )
        )
        return out

    def delta(d: dict[str, Any]) -> bytes:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})

    async for ev in events:
        if isinstance(ev, chat.ReasoningDelta):
            if open_kind != "thinking":
                thinking_text = []
                for b in start("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
                    yield b
            thinking_text.append(ev.text)
            yield delta({"type": "thinking_delta", "thinking": ev.text})
        elif isinstance(ev, chat.TextDelta):
            if open_kind != "text":
                for b in start("text", {"type": "text", "text": ""}):
                    yield b
            yield delta({"type": "text_delta", "text": ev.text})
        elif isinstance(ev, chat.ToolCallEvent):
            for b in start("tool_use", {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}}):
                yield b
            yield delta(
                {"type": "input_json_delta", "partial_json": json.dumps(ev.arguments, ensure_ascii=False)}
            )
            for b in close():
                yield b
        elif isinstance(ev, Finished):
            if ev.reason in ("error", "abort"):
                err = APIError(500 if ev.reason == "error" else 503, ev.error or "the request was cancelled")
                yield sse_event("error", anthropic_error_body(err))
                return
            for b in close():
                yield b
            yield sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason(ev), "stop_sequence": ev.stop_sequence},
                    "usage": usage(ev),  # the cache split is known only after prefill
                },
            )
            yield sse_event("message_stop", {"type": "message_stop"})


# ---------------------------------------------------------------------------------------- handlers


def router(state: ServerState) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/messages")
    async def messages(request: Request) -> Any:
        state.check_auth(request)
        req = await parse_body(request, MessagesRequest, state.config.max_request_bytes)
        model = state.resolve_model(req.model)
        stops = check_stops(req.stop_sequences, "stop_sequences")
        prompt = chat_prompt(req, state.config.constrained)
        ids = await state.encode_chat(prompt)
        budget = state.output_budget(len(ids), req.max_tokens, "max_tokens")
        params = state.sampling_params(
            max_new_tokens=budget,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=stops,
        )
        handle = state.submit(ids, state.constrain(params, prompt), stops)
        rid = new_id("msg_")
        events = chat_events(handle, prompt, lambda: new_id("toolu_"))
        return await respond_chat(
            request,
            handle,
            events,
            bool(req.stream),
            lambda evs: message_stream(evs, rid, model, len(ids)),
            lambda got, fin: message_response(got, fin, rid, model),
        )

    @r.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> JSONResponse:
        state.check_auth(request)
        req = await parse_body(request, CountTokensRequest, state.config.max_request_bytes)
        state.resolve_model(req.model)
        prompt = chat_prompt(req, state.config.constrained)
        ids = await state.encode_chat(prompt)
        return JSONResponse({"input_tokens": len(ids)})

    return r
