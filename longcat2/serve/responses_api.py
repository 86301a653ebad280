"""OpenAI Responses API: `POST /v1/responses`, streamed (typed SSE events) and not.

Design choices:
- Stateless: `store` is accepted but nothing is stored, so `previous_response_id` (and `item_reference`
  input items) are a 400 that says to send the whole conversation as `input` (as clients do with
  `store: false`). `include` is accepted and ignored (there is no encrypted reasoning to return).
- A request is reduced to the same (messages, tools, thinking flag, tool mode) as a chat completion and goes
  through `core.build_chat_prompt` / `core.chat_events`, so parsing, forced tool use and cancellation are
  shared with the other APIs. Input items map to chat messages: `message` (roles user / assistant / system
  / developer; `input_text` / `output_text` parts), `function_call` (joined onto the preceding assistant
  turn), `function_call_output` (a tool turn), `reasoning` (the next assistant turn's reasoning);
  `instructions` becomes the leading system message.
- Tools: `function` tools are used; a `namespace` (or any tool that nests a `tools` list) is flattened into
  its function tools; every other kind clients send (`web_search`, `local_shell`, `custom`, MCP...) is
  accepted and ignored, since a 4xx would stop the client. `tool_choice` takes every form of the API:
  "none" / "auto" / "required", `{"type": "function", "name"}`, `{"type": "allowed_tools", "mode", "tools"}`
  (which narrows the offered tools), hosted-tool choices (treated as "auto").
- `reasoning.effort` drives the thinking switch ("none"/"minimal" off, any other effort on; absent: follow
  the conversation); reasoning comes back as a `reasoning` item with `reasoning_text` content.
- `parallel_tool_calls: false` allows one call (the grammar; without it, the first call is kept).
  `text.format` json_object / json_schema constrains the content like chat's `response_format`.
- One `_Output` state machine turns chat events into output items and, when streaming, into the event
  sequence the `openai` SDK parses: `response.created`, `response.in_progress`, then per item
  `output_item.added` → (`content_part.added` → `output_text.delta`* / `reasoning_text.delta`* →
  `*.done` → `content_part.done`) or `function_call_arguments.delta` / `.done` → `output_item.done`,
  and finally `response.completed`, `response.incomplete` (output budget reached) or `response.failed`.
  The non-streamed reply is the same machine's final response object, so both agree by construction.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from longcat2 import chat
from longcat2.serve.core import (
    ChatPrompt,
    Finished,
    ServerState,
    build_chat_prompt,
    chat_events,
    new_id,
    parse_body,
    respond_chat,
)
from longcat2.serve.openai_api import response_schema
from longcat2.serve.protocol import APIError
from longcat2.serve.sse import sse_event

# --------------------------------------------------------------------------------------------- request


class ResponsesRequest(BaseModel):
    """The fields of `POST /v1/responses` this server reads; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    input: str | list[dict[str, Any]] = Field(default_factory=list)
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    text: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool | None = False
    store: bool | None = None
    previous_response_id: str | None = None
    include: list[str] | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None


_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


def _parts_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where}: expected a string or a list of content parts", param=where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind == "refusal":
            out.append(str(part.get("refusal", "")))
        else:
            raise APIError(
                400,
                f"{where}.{j}: content parts of type {kind!r} are not supported (this model reads text only)",
                param=where,
            )
    return "".join(out)


def input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's `instructions` and `input` as `chat.render` messages."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
        return messages
    reasoning = ""

    def assistant() -> dict[str, Any]:
        """The assistant turn new output joins: the last message if it is one without a tool result after."""
        nonlocal reasoning
        if not messages or messages[-1]["role"] != "assistant":
            messages.append({"role": "assistant", "content": None})
        if reasoning:
            messages[-1]["reasoning_content"] = reasoning
            reasoning = ""
        return messages[-1]

    for i, item in enumerate(req.input):
        where = f"input.{i}"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(
                    400,
                    f"{where}.role: expected 'user', 'assistant', 'system' or 'developer', got {role!r}",
                    param=f"{where}.role",
                )
            text = _parts_text(item.get("content"), f"{where}.content")
            if role == "assistant":
                turn = assistant()
                if turn.get("tool_calls"):  # text after calls starts a new turn
                    messages.append({"role": "assistant", "content": text})
                else:
                    turn["content"] = (turn["content"] or "") + text
            else:
                messages.append({"role": role, "content": text})
        elif kind in ("function_call", "custom_tool_call"):
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise APIError(400, f"{where}.name: a function_call needs a name", param=f"{where}.name")
            if kind == "custom_tool_call":
                args: Any = json.dumps({"input": item.get("input", "")})
            else:
                args = item.get("arguments", "{}")
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": name, "arguments": args},
            }
            assistant().setdefault("tool_calls", []).append(call)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output", "")
            text = output if isinstance(output, str) else _parts_text(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning += _parts_text(parts, f"{where}.content")
        elif kind == "item_reference":
            raise APIError(
                400,
                f"{where}: item_reference needs stored responses; this server is stateless (store: false), "
                "so send the items themselves",
                param=where,
            )
        else:
            raise APIError(400, f"{where}.type: input items of type {kind!r} are not supported", param=where)
    return messages


def function_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The request's function tools in chat-completions form; namespaces are flattened, other kinds ignored."""
    out: list[dict[str, Any]] = []
    for i, t in enumerate(tools or []):
        if t.get("type") == "function":
            name = t.get("name")
            if not isinstance(name, str) or not name:
                raise APIError(400, f"tools.{i}.name: a function tool needs a name", param=f"tools.{i}.name")
            fn: dict[str, Any] = {"name": name}
            if t.get("description"):
                fn["description"] = t["description"]
            fn["parameters"] = t.get("parameters") or {"type": "object", "properties": {}}
            out.append({"type": "function", "function": fn})
        elif isinstance(t.get("tools"), list):  # namespace (and any kind that nests function tools)
            out += function_tools(t["tools"])
    return out


def _tool_mode(
    choice: str | dict[str, Any] | None, tools: list[dict[str, Any]]
) -> tuple[str, str | None, list[dict[str, Any]]]:
    """(tool mode for `build_chat_prompt`, forced name, offered tools) for a Responses `tool_choice`."""
    if choice is None or choice == "auto":
        return "auto", None, tools
    if choice in ("none", "required"):
        return str(choice), None, tools
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function":
            return "named", choice.get("name"), tools
        if kind == "allowed_tools":
            allowed = {t.get("name") for t in choice.get("tools") or [] if isinstance(t, dict)}
            narrowed = [t for t in tools if t["function"]["name"] in allowed]
            return ("required" if choice.get("mode") == "required" else "auto"), None, narrowed
        return "auto", None, tools  # a hosted tool (web_search...) this server does not run
    raise APIError(
        400,
        f"tool_choice: expected 'none', 'auto', 'required' or an object, got {choice!r}",
        param="tool_choice",
    )


def _thinking(reasoning: dict[str, Any] | None) -> bool | None:
    effort = (reasoning or {}).get("effort")
    if effort is None:
        return None
    return effort not in ("none", "minimal")


def _check(req: ResponsesRequest) -> None:
    if req.previous_response_id:
        raise APIError(
            400,
            "previous_response_id: this server does not store responses (store: false); send the whole "
            "conversation as input items instead",
            param="previous_response_id",
        )


def responses_prompt(req: ResponsesRequest, constrained: bool = False) -> ChatPrompt:
    mode, forced, tools = _tool_mode(req.tool_choice, function_tools(req.tools))
    return build_chat_prompt(
        input_messages(req),
        tools or None,
        _thinking(req.reasoning),
        mode,
        forced,
        constrained=constrained,
        parallel=req.parallel_tool_calls is not False,
        json_schema=response_schema((req.text or {}).get("format"), "text.format"),
    )


# ---------------------------------------------------------------------------------------------- output


class _Output:
    """Chat events → Responses output items and stream events (see the module docstring)."""

    def __init__(self, base: dict[str, Any], count_tokens: Callable[[str], int], one_call: bool) -> None:
        self.base = base
        self.count_tokens = count_tokens
        self.one_call = one_call
        self.output: list[dict[str, Any]] = []
        self.seq = 0
        self.open: dict[str, Any] | None = None  # the item being written (reasoning or message)
        self.text = ""
        self.calls = 0
        self.reasoning = ""

    def _ev(self, kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return kind, ev

    def response(self, status: str, fin: Finished | None = None) -> dict[str, Any]:
        body = {**self.base, "status": status, "output": list(self.output)}
        if fin is not None:
            body["completed_at"] = int(time.time()) if status == "completed" else None
            if status == "incomplete":
                body["incomplete_details"] = {"reason": "max_output_tokens"}
            if status == "failed":
                body["error"] = {"code": "server_error", "message": fin.error or "generation failed"}
            reasoning_tokens = min(self.count_tokens(self.reasoning), fin.completion_tokens)
            body["usage"] = {
                "input_tokens": fin.prompt_tokens,
                "input_tokens_details": {"cached_tokens": fin.cached_tokens},
                "output_tokens": fin.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": fin.prompt_tokens + fin.completion_tokens,
            }
        return body

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        return [
            self._ev("response.created", response=self.response("in_progress")),
            self._ev("response.in_progress", response=self.response("in_progress")),
        ]

    @staticmethod
    def _part(item_type: str, text: str) -> dict[str, Any]:
        if item_type == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _close(self, status: str) -> list[tuple[str, dict[str, Any]]]:
        item, self.open = self.open, None
        if item is None:
            return []
        idx = len(self.output)
        part = {"content_index": 0, "item_id": item["id"], "output_index": idx}
        done_part = self._part(item["type"], self.text)
        item.update(status=status, content=[done_part])
        self.output.append(item)
        text_done = (
            self._ev("response.reasoning_text.done", **part, text=self.text)
            if item["type"] == "reasoning"
            else self._ev("response.output_text.done", **part, text=self.text, logprobs=[])
        )
        self.text = ""
        return [
            text_done,
            self._ev("response.content_part.done", **part, part=done_part),
            self._ev("response.output_item.done", output_index=idx, item=item),
        ]

    def _delta(self, item_type: str, delta: str) -> list[tuple[str, dict[str, Any]]]:
        evs: list[tuple[str, dict[str, Any]]] = []
        if self.open is not None and self.open["type"] != item_type:
            evs += self._close("completed")
        idx = len(self.output)
        if self.open is None:
            if item_type == "reasoning":
                self.open = {"id": new_id("rs_"), "type": "reasoning", "summary": [], "content": []}
            else:
                self.open = {"id": new_id("msg_"), "type": "message", "role": "assistant", "content": []}
            added = {**self.open, "status": "in_progress"}
            evs.append(self._ev("response.output_item.added", output_index=idx, item=added))
            part = {"content_index": 0, "item_id": self.open["id"], "output_index": idx}
            evs.append(self._ev("response.content_part.added", **part, part=self._part(item_type, "")))
        part = {"content_index": 0, "item_id": self.open["id"], "output_index": idx}
        self.text += delta
        if item_type == "reasoning":
            self.reasoning += delta
            evs.append(self._ev("response.reasoning_text.delta", **part, delta=delta))
        else:
            evs.append(self._ev("response.output_text.delta", **part, delta=delta, logprobs=[]))
        return evs

    def _call(self, ev: chat.ToolCallEvent) -> list[tuple[str, dict[str, Any]]]:
        if self.one_call and self.calls:
            return []  # parallel_tool_calls: false
        self.calls += 1
        evs = self._close("completed")
        idx = len(self.output)
        args = json.dumps(ev.arguments, ensure_ascii=False)
        item = {"id": new_id("fc_"), "type": "function_call", "call_id": ev.id, "name": ev.name}
        evs.append(
            self._ev(
                "response.output_item.added",
                output_index=idx,
                item={**item, "arguments": "", "status": "in_progress"},
            )
        )
        ref = {"item_id": item["id"], "output_index": idx}
        evs.append(self._ev("response.function_call_arguments.delta", **ref, delta=args))
        evs.append(self._ev("response.function_call_arguments.done", **ref, arguments=args, name=ev.name))
        done = {**item, "arguments": args, "status": "completed"}
        self.output.append(done)
        evs.append(self._ev("response.output_item.done", output_index=idx, item=done))
        return evs

    def feed(self, ev: Any) -> list[tuple[str, dict[str, Any]]]:
        if isinstance(ev, chat.ReasoningDelta):
            return self._delta("reasoning", ev.text)
        if isinstance(ev, chat.TextDelta):
            return self._delta("message", ev.text)
        if isinstance(ev, chat.ToolCallEvent):
            return self._call(ev)
        return []

    def finish(self, fin: Finished) -> list[tuple[str, dict[str, Any]]]:
        if fin.reason in ("error", "abort"):
            evs = self._close("incomplete")
            return evs + [self._ev("response.failed", response=self.response("failed", fin))]
        status = "incomplete" if fin.reason == "length" else "completed"
        evs = self._close(status)
        return evs + [self._ev(f"response.{status}", response=self.response(status, fin))]


# ---------------------------------------------------------------------------------------------- router


def _echo_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "name": t["function"]["name"],
            "description": t["function"].get("description"),
            "parameters": t["function"]["parameters"],
            "strict": False,
        }
        for t in tools
    ]


def router(state: ServerState) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/responses")
    async def responses(request: Request) -> Any:
        state.check_auth(request)
        req = await parse_body(request, ResponsesRequest, state.config.max_request_bytes)
        model = state.resolve_model(req.model)
        _check(req)
        prompt = responses_prompt(req, state.config.constrained)
        ids = await state.encode_chat(prompt)
        budget = state.output_budget(len(ids), req.max_output_tokens, "max_output_tokens")
        params = state.sampling_params(
            max_new_tokens=budget, temperature=req.temperature, top_p=req.top_p, seed=req.seed
        )
        handle = state.submit(ids, state.constrain(params, prompt))
        events = chat_events(handle, prompt, lambda: new_id("call_"))
        choice: Any = req.tool_choice if req.tool_choice is not None else "auto"
        base: dict[str, Any] = {
            "id": new_id("resp_"),
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
            "output": [],
            "error": None,
            "incomplete_details": None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
            "store": False,
            "temperature": params.temperature,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": choice,
            "tools": _echo_tools(prompt.tools or []),
            "top_p": params.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": req.user,
            "metadata": req.metadata or {},
        }
        out = _Output(
            base, lambda s: len(state.tokenizer.encode(s)) if s else 0, req.parallel_tool_calls is False
        )

        async def to_sse(evs: AsyncIterator[Any]) -> AsyncIterator[bytes]:
            for kind, body in out.start():
                yield sse_event(kind, body)
            async for ev in evs:
                batch = out.finish(ev) if isinstance(ev, Finished) else out.feed(ev)
                for kind, body in batch:
                    yield sse_event(kind, body)

        def to_json(got: list[Any], fin: Finished) -> dict[str, Any]:
            for ev in got:
                out.feed(ev)
            *_, (_, last) = out.finish(fin)
            return last["response"]

        return await respond_chat(request, handle, events, bool(req.stream), to_sse, to_json)

    return r
