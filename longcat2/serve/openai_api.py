"""OpenAI-compatible endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`.

Design choices:
- Requests become OpenAI-style message dicts for `longcat2.chat.render` almost unchanged (text content
  parts are joined; image/audio parts are a 400). Tool-call arguments may be JSON strings (the API) or
  dicts (LongCat's own convention).
- Thinking: `thinking: {"type": "enabled"|"disabled"}` (LongCat API), `thinking: true/false`,
  `enable_thinking`, `chat_template_kwargs.enable_thinking`, or `reasoning_effort` ("none"/"minimal" =
  off, other values = on). When none is given, thinking follows the conversation (on when the reply being
  continued carries `reasoning_content`). Reasoning comes back as `reasoning_content`, streamed as
  `delta.reasoning_content`.
- Streamed tool calls are sent as one chunk per call holding the id, name and the complete JSON-string
  arguments (clients concatenate argument fragments, so one fragment is valid), after the call's closing
  tag has been parsed; partial tags never reach the client.
- `stream_options.include_usage` adds `"usage": null` to every chunk and a final chunk with empty
  `choices` and the usage, as the API does. Errors after the stream started are sent as a
  `data: {"error": ...}` event before `data: [DONE]`.
- `/v1/completions` is raw text in, raw text out (no chat template): the caller writes the whole prompt,
  so special-token spellings in it are encoded as special tokens (as a template would); a prompt may be
  a string or token ids (a list of one prompt is accepted; batches are a 400, as is n > 1). Chat
  requests never are: there only the template writes control tokens (see `chat.render_parts`).
- `logit_bias` follows OpenAI: string token ids → biases in [-100, 100] added to the logits (greedy
  decoding included); a key that is not a token id of this tokenizer is a 400.
"""

from __future__ import annotations

import json
import time
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
    raise_for_finish,
    respond_chat,
    wait_or_disconnect,
)
from longcat2.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    OAIMessage,
    OAINamedToolChoice,
    openai_error_body,
)
from longcat2.serve.sse import SSEResponse, sse_data

# ------------------------------------------------------------------------------------- conversion


def _content_text(m: OAIMessage, i: int) -> str | None:
    if m.content is None or isinstance(m.content, str):
        return m.content
    out = []
    for j, part in enumerate(m.content):
        if part.type in ("text", "input_text", "output_text") and part.text is not None:
            out.append(part.text)
        elif part.type in ("text", "input_text", "output_text"):
            raise APIError(
                400, f"messages.{i}.content.{j}.text: Field required", param=f"messages.{i}.content"
            )
        else:
            raise APIError(
                400,
                f"messages.{i}.content.{j}: content parts of type {part.type!r} are not supported "
                "(this model reads text only)",
                param=f"messages.{i}.content",
            )
    return "".join(out)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as `chat.render` input."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        d: dict[str, Any] = {"role": m.role, "content": _content_text(m, i)}
        if m.role == "assistant":
            if m.tool_calls:
                d["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments},
                    }
                    for c in m.tool_calls
                ]
            if m.reasoning_content:
                d["reasoning_content"] = m.reasoning_content
        out.append(d)
    return out


def chat_tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    if not req.tools:
        return None
    return [
        {
            "type": "function",
            "function": {
                "name": t.function.name,
                **({"description": t.function.description} if t.function.description else {}),
                "parameters": t.function.parameters or {"type": "object", "properties": {}},
            },
        }
        for t in req.tools
    ]


def thinking_flag(req: ChatCompletionRequest) -> bool | None:
    if isinstance(req.thinking, bool):
        return req.thinking
    if req.thinking is not None:
        return req.thinking.type != "disabled"
    if req.enable_thinking is not None:
        return req.enable_thinking
    kwargs = req.chat_template_kwargs or {}
    for key in ("enable_thinking", "thinking"):
        if isinstance(kwargs.get(key), bool):
            return kwargs[key]
    if req.reasoning_effort is not None:
        return req.reasoning_effort not in ("none", "minimal")
    return None


def response_schema(fmt: Any, param: str) -> dict[str, Any] | None:
    """The JSON schema a `response_format` (chat) / `text.format` (Responses) asks the content to follow:
    None for text, `{"type": "object"}` for json_object."""
    if fmt is None:
        return None
    d = fmt if isinstance(fmt, dict) else {"type": fmt.type, **(fmt.model_extra or {})}
    kind = d.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = d.get("json_schema", d)  # chat nests {"name", "schema"}; Responses puts them at the top
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, f"{param}.json_schema.schema: a JSON schema object is required", param=param)
        return schema
    raise APIError(
        400,
        f"{param}: type {kind!r} is not supported (use 'text', 'json_object' or 'json_schema')",
        param=param,
    )


def chat_prompt(req: ChatCompletionRequest, constrained: bool = False) -> ChatPrompt:
    tools = chat_tools(req)
    choice = req.tool_choice
    forced = None
    if isinstance(choice, OAINamedToolChoice):
        mode, forced = "named", choice.function.name
    elif choice in ("none", "required"):
        mode = choice
    else:
        mode = "auto"
    return build_chat_prompt(
        chat_messages(req),
        tools,
        thinking_flag(req),
        mode,
        forced,
        constrained=constrained,
        parallel=req.parallel_tool_calls is not False,
        json_schema=response_schema(req.response_format, "response_format"),
    )


def _check_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    if req.n is not None and req.n != 1:
        raise APIError(400, f"n: only n=1 is supported, got {req.n}", param="n")
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs or req.top_logprobs:
            raise APIError(400, "logprobs: log probabilities are not supported", param="logprobs")
    else:
        if req.logprobs:
            raise APIError(400, "logprobs: log probabilities are not supported", param="logprobs")
        if req.suffix:
            raise APIError(400, "suffix: insertion (suffix) is not supported", param="suffix")
        if req.best_of is not None and req.best_of != 1:
            raise APIError(400, f"best_of: only best_of=1 is supported, got {req.best_of}", param="best_of")


# ---------------------------------------------------------------------------------------- builders


def finish_reason(fin: Finished) -> str:
    return {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}.get(fin.reason, "stop")


def usage(fin: Finished) -> dict[str, Any]:
    """`prompt_tokens_details.cached_tokens`: prompt tokens served from the engine's prefix cache."""
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
    }


def _sampling_params(state: ServerState, req: Any, budget: int, stops: list[str]) -> Any:
    """Engine sampling parameters from the fields both OpenAI request types share."""
    return state.sampling_params(
        max_new_tokens=budget,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=stops,
        ignore_eos=req.ignore_eos,
        logit_bias=logit_bias(state, req.logit_bias),
    )


def logit_bias(state: ServerState, bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's `logit_bias` ({"token id": bias in [-100, 100]}, the range checked by the request model)
    with the ids checked against the tokenizer."""
    out: dict[int, float] = {}
    vocab = state.tokenizer.vocab_size
    for key, value in (bias or {}).items():
        tid = int(key) if key.strip().lstrip("-").isdigit() else None
        if tid is None or not 0 <= tid < vocab:
            raise APIError(
                400, f"logit_bias: {key!r} is not a token id (an integer in [0, {vocab}))", param="logit_bias"
            )
        out[tid] = float(value)
    return out


def tool_call_dict(ev: chat.ToolCallEvent, with_index: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": ev.id,
        "type": "function",
        "function": {"name": ev.name, "arguments": json.dumps(ev.arguments, ensure_ascii=False)},
    }
    return {"index": ev.index, **d} if with_index else d


def chat_completion_response(
    events: list[chat.TextDelta | chat.ReasoningDelta | chat.ToolCallEvent],
    fin: Finished,
    rid: str,
    model: str,
) -> dict[str, Any]:
    """The non-streamed `chat.completion` object for a finished generation."""
    out = chat.collect(e for e in events)
    message: dict[str, Any] = {"role": "assistant", "content": out.content or None}
    if out.reasoning:
        message["reasoning_content"] = out.reasoning
    calls = [e for e in events if isinstance(e, chat.ToolCallEvent)]
    if calls:
        message["tool_calls"] = [tool_call_dict(c) for c in calls]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(fin)}],
        "usage": usage(fin),
    }


def _chunk(
    rid: str, created: int, model: str, delta: dict[str, Any], finish: str | None, with_usage: bool
) -> bytes:
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage:
        body["usage"] = None
    return sse_data(body)


async def chat_completion_stream(
    events: AsyncIterator[Any], rid: str, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE chunks of a streamed chat completion, ending in `data: [DONE]`."""
    created = int(time.time())
    yield _chunk(rid, created, model, {"role": "assistant", "content": ""}, None, include_usage)
    async for ev in events:
        if isinstance(ev, chat.TextDelta):
            yield _chunk(rid, created, model, {"content": ev.text}, None, include_usage)
        elif isinstance(ev, chat.ReasoningDelta):
            yield _chunk(rid, created, model, {"reasoning_content": ev.text}, None, include_usage)
        elif isinstance(ev, chat.ToolCallEvent):
            yield _chunk(rid, created, model, {"tool_calls": [tool_call_dict(ev, True)]}, None, include_usage)
        elif isinstance(ev, Finished):
            if ev.reason in ("error", "abort"):
                err = APIError(500 if ev.reason == "error" else 503, ev.error or "the request was cancelled")
                yield sse_data(openai_error_body(err))
                break
            yield _chunk(rid, created, model, {}, finish_reason(ev), include_usage)
            if include_usage:
                yield sse_data(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": usage(ev),
                    }
                )
    yield b"data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------- handlers


def router(state: ServerState) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        state.check_auth(request)
        if "anthropic-version" in request.headers:  # the Anthropic SDK's models.list()
            data = [
                {
                    "id": name,
                    "type": "model",
                    "display_name": name,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.created)),
                }
                for name in state.model_names
            ]
            return JSONResponse(
                {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
            )
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": state.created,
                        "owned_by": "longcat2",
                        **state.model_info,
                    }
                    for name in state.model_names
                ],
            }
        )

    @r.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        state.check_auth(request)
        name = state.resolve_model(model_id)
        return JSONResponse(
            {
                "id": name,
                "object": "model",
                "created": state.created,
                "owned_by": "longcat2",
                **state.model_info,
            }
        )

    @r.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        state.check_auth(request)
        req = await parse_body(request, ChatCompletionRequest, state.config.max_request_bytes)
        model = state.resolve_model(req.model)
        _check_unsupported(req)
        stops = check_stops(req.stop, "stop")
        prompt = chat_prompt(req, state.config.constrained)
        ids = await state.encode_chat(prompt)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        budget = state.output_budget(len(ids), requested, param)
        params = state.constrain(_sampling_params(state, req, budget, stops), prompt)
        handle = state.submit(ids, params, stops)
        rid = new_id("chatcmpl-")
        events = chat_events(handle, prompt, lambda: new_id("call_"))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await respond_chat(
            request,
            handle,
            events,
            bool(req.stream),
            lambda evs: chat_completion_stream(evs, rid, model, include_usage),
            lambda got, fin: chat_completion_response(got, fin, rid, model),
        )

    @r.post("/v1/completions")
    async def completions(request: Request) -> Any:
        state.check_auth(request)
        req = await parse_body(request, CompletionRequest, state.config.max_request_bytes)
        model = state.resolve_model(req.model)
        _check_unsupported(req)
        stops = check_stops(req.stop, "stop")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(
                    400, "prompt: batched prompts are not supported; send one prompt", param="prompt"
                )
            prompt = prompt[0]  # type: ignore[assignment]
        if isinstance(prompt, str):
            text = prompt
            ids = await state.encode(prompt)
        else:
            ids = list(prompt)  # type: ignore[arg-type]
            if len(ids) >= state.context_len:  # refused by its length before any pass over it
                state.output_budget(len(ids), None, "max_tokens")
            vocab = state.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            text = state.tokenizer.decode(ids)
        if not ids:
            raise APIError(400, "prompt: the prompt is empty", param="prompt")
        requested = req.max_tokens if req.max_tokens is not None else 16
        budget = state.output_budget(len(ids), requested, "max_tokens")
        params = _sampling_params(state, req, budget, stops)
        handle = state.submit(ids, params, stops)
        rid = new_id("cmpl-")
        created = int(time.time())
        echo = text if req.echo else ""

        def choice(t: str, finish: str | None) -> dict[str, Any]:
            return {"text": t, "index": 0, "logprobs": None, "finish_reason": finish}

        def obj(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
            }

        def comp_usage(n: int) -> dict[str, Any]:
            return usage(Finished("stop", None, len(ids), n, cached_tokens=handle.cached_tokens))

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def body() -> AsyncIterator[bytes]:
                try:
                    if echo:
                        yield sse_data(obj([choice(echo, None)]))
                    async for c in handle:
                        if c.finish_reason in ("error", "abort"):
                            err = APIError(500 if c.finish_reason == "error" else 503, c.error or "cancelled")
                            yield sse_data(openai_error_body(err))
                            break
                        if c.text or c.finished:
                            fr = (
                                None
                                if not c.finished
                                else ("length" if c.finish_reason == "length" else "stop")
                            )
                            yield sse_data(obj([choice(c.text, fr)]))
                        if c.finished and include_usage:
                            yield sse_data({**obj([]), "usage": comp_usage(c.completion_tokens)})
                    yield b"data: [DONE]\n\n"
                finally:
                    handle.cancel()

            return SSEResponse(body())

        async def run() -> dict[str, Any]:
            try:
                c = await handle.collect()
            finally:
                handle.cancel()
            fin = Finished(c.finish_reason or "stop", None, len(ids), c.completion_tokens, c.error)
            raise_for_finish(fin)
            fr = "length" if c.finish_reason == "length" else "stop"
            return {**obj([choice(echo + c.text, fr)]), "usage": comp_usage(c.completion_tokens)}

        return JSONResponse(await wait_or_disconnect(request, run()))

    return r
