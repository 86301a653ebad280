"""What the OpenAI and Anthropic front ends share: server configuration and state, authentication, model
names, prompt encoding with context checks, sampling parameters, and one generation loop that turns engine
chunks into chat events.

Design choices:
- Both APIs reduce a request to (OpenAI-style messages, tools, thinking flag), render it with
  `longcat2.chat.render`, and parse the reply with one `chat.StreamParser` per request, so tool calls are
  recognised identically in both APIs, streamed or not, and a tag split across tokens is never leaked.
- Constrained decoding (`ServerConfig.constrained`, on by default): every chat request carries the grammar
  of its reply (`reply_grammar`: offered tools with schema-valid arguments, the `tool_choice` form,
  `parallel_tool_calls`, JSON response formats; thinking stays free), compiled once per request and
  applied by the engine's sampler. Without it, forced tool use is done by prefilling the reply with
  `<longcat_tool_call>` (plus `NAME\\n` for a named tool), fed to the parser first. `tool_choice: none`
  renders the prompt without tools. Text that still does not parse (a reply cut off inside a call) is
  returned with its markup tags removed, never as tags or a half call.
- Context: `context_len` is the model's `max_position_embeddings` (or `--max-model-len`). A prompt that
  leaves no room for output is a 400 that gives both numbers; the output budget is `min(max_tokens,
  context - prompt)` (agents ask for 32000+), and reaching it ends the reply with finish reason "length" /
  stop reason "max_tokens"; with `--strict-max-tokens` a `max_tokens` larger than the context is a 400.
- Model names: a server with one served name answers any requested name with it (agents insist on their
  own ids); several names (or `--strict-model-names`) make an unknown name a 404.
- Request hygiene (`parse_body`): a body over `max_request_bytes` is a 413 as soon as that is known
  (Content-Length, else while it streams in); bodies that are not UTF-8, nest deeper than `MAX_JSON_DEPTH`
  or carry lone UTF-16 surrogates are 400s before validation, so nothing downstream (pydantic, the
  tokenizer) meets them.
- Prompts: chat prompts are encoded from `chat.render_parts`, so only the template's tags become control
  tokens and all request text is encoded as text. A prompt whose length alone proves it cannot fit the
  context (characters / the tokenizer's longest token) is refused before tokenising; prompts longer than
  `INLINE_TOKENIZE_CHARS` are tokenised in a worker thread by a tokenizer call that releases the GIL, so
  neither the event loop nor the engine thread stalls. `count_tokens` applies the same refusal.
- Authentication: with an API key set, every `/v1/...` route needs `Authorization: Bearer KEY` or
  `x-api-key: KEY` (compared in constant time); `/health` and `/metrics` stay open for probes (with a key
  set, `/health` does not list the served models: that is `/v1/models`, behind the key).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from longcat2 import chat
from longcat2.model_dir import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME  # noqa: F401 (re-exported)
from longcat2.serve import access_log
from longcat2.serve.protocol import APIError, validation_message
from longcat2.serve.reply_grammar import reply_grammar
from longcat2.serve.worker import EngineWorker, Metrics, QueueFull, RequestHandle, ShuttingDown

ModelT = TypeVar("ModelT", bound=BaseModel)
INLINE_TOKENIZE_CHARS = 20_000  # longer prompts are tokenised in a worker thread


@dataclass
class ServerConfig:
    model_dir: Path | None = None  # None: the embedded default model
    served_model_names: list[str] = field(default_factory=list)  # empty: derived from the model
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_model_len: int | None = None
    default_max_tokens: int | None = None
    default_temperature: float | None = None
    clamp_max_tokens: bool = True  # False (--strict-max-tokens): a max_tokens beyond the context is a 400
    constrained: bool = True  # grammar-constrained replies (tool calls, tool_choice, JSON formats)
    any_model: bool | None = None  # None: accept any name when the server has a single served name
    speculative: bool = False
    num_draft_tokens: int | None = None
    dtype: str = "auto"
    tp: int = 1  # tensor-parallel degree (launch with torchrun; longcat2.parallel.serving)
    ep: int = 1  # expert-parallel degree
    dequantize_fp8: bool = False  # load an FP8 checkpoint dequantised (default: FP8-resident)
    max_step_tokens: int = 512
    shutdown_timeout: float = 30.0
    access_log: bool = True  # one log line per request (serve/access_log.py)
    max_request_bytes: int = 32 * 1024 * 1024  # larger bodies are a 413
    prefix_cache_bytes: int = 1 << 30  # cache blocks kept for prefix reuse after requests end; 0: off
    index_dtype: str | None = None  # index-key cache: "bf16" | "fp8" | None (the KV cache dtype)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # inference-time config (HI settings)


@dataclass
class ServerState:
    """Everything a request handler needs. Built by `app.load_state` (real model) or directly in tests."""

    tokenizer: Any  # longcat2.tokenizer.Tokenizer (encode / decode / decode_stream / eos_id)
    worker: EngineWorker
    model_names: list[str]
    context_len: int
    config: ServerConfig = field(default_factory=ServerConfig)
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    model_info: dict[str, Any] = field(default_factory=dict)
    _grammars: Any = None  # longcat2.engine.grammar.Grammars, built on first use

    # ------------------------------------------------------------------ requests

    def resolve_model(self, name: str) -> str:
        """The served name a request's `model` resolves to (replies state the model that served them)."""
        if name in self.model_names:
            return name
        any_model = self.config.any_model
        if any_model or (any_model is None and len(self.model_names) == 1):
            return self.model_names[0]
        raise APIError(
            404,
            f"The model '{name}' does not exist; this server serves: {', '.join(self.model_names)}",
            param="model",
            code="model_not_found",
        )

    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        if given is None:
            raise APIError(
                401,
                "Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "Invalid API key", code="invalid_api_key")

    def check_fits(self, num_chars: int, param: str) -> None:
        """Refuse, before tokenising it, a prompt of `num_chars` characters that cannot fit the context:
        it has at least num_chars / tokenizer.max_token_chars tokens."""
        at_least = -(-num_chars // max(1, self.tokenizer.max_token_chars))
        if at_least >= self.context_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_len} tokens, but the prompt "
                f"({num_chars} characters) is at least {at_least} tokens long. Please shorten the {param}.",
                param=param,
                code="context_length_exceeded",
            )

    async def _tokenize(self, num_chars: int, fn: Callable[[], list[int]]) -> list[int]:
        if num_chars > INLINE_TOKENIZE_CHARS:  # in a worker thread (the tokenizer releases the GIL)
            return await asyncio.to_thread(fn)
        return fn()

    async def encode(self, text: str) -> list[int]:
        """Raw text (`/v1/completions`: the caller writes the whole template, special tokens included)."""
        self.check_fits(len(text), "prompt")
        tok = self.tokenizer
        return await self._tokenize(len(text), lambda: tok.encode_batch([text])[0])

    async def encode_chat(self, prompt: ChatPrompt) -> list[int]:
        """A rendered chat prompt: the template's tags become control tokens, all request text is text."""
        chars = sum(len(p) for p in prompt.parts)
        self.check_fits(chars, "messages")
        tok = self.tokenizer
        return await self._tokenize(
            chars, lambda: chat.encode_parts(prompt.parts, tok.encode_plain_batch, tok.special_ids)
        )

    def output_budget(self, prompt_len: int, requested: int | None, param: str) -> int:
        """Max new tokens for a prompt of `prompt_len` tokens (see the module docstring for the rules)."""
        ctx = self.context_len
        if prompt_len >= ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens, but the prompt is {prompt_len} tokens"
                f" long, leaving no room for output. Please shorten the messages.",
                param="messages",
                code="context_length_exceeded",
            )
        room = ctx - prompt_len
        if requested is None:
            limit = self.config.default_max_tokens
            return room if limit is None else min(room, limit)
        if requested > ctx and not self.config.clamp_max_tokens:
            raise APIError(
                400,
                f"{param} is too large: {requested}. This model's maximum context length is {ctx} tokens "
                f"(the prompt uses {prompt_len}, so at most {room} tokens can be generated).",
                param=param,
                code="max_tokens_too_large",
            )
        return min(requested, room)

    def sampling_params(
        self,
        *,
        max_new_tokens: int,
        temperature: float | None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool | None = None,
        logit_bias: dict[int, float] | None = None,
    ) -> Any:
        from longcat2.engine import SamplingParams

        if temperature is None:
            temperature = (
                self.config.default_temperature if self.config.default_temperature is not None else 1.0
            )
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            top_p=float(top_p) if top_p is not None else 1.0,
            top_k=max(0, top_k) if top_k is not None else 0,
            min_p=float(min_p or 0.0),
            presence_penalty=float(presence_penalty or 0.0),
            frequency_penalty=float(frequency_penalty or 0.0),
            repetition_penalty=float(repetition_penalty or 1.0),
            seed=seed,
            stop=list(stop),
            ignore_eos=bool(ignore_eos),
            logit_bias=dict(logit_bias or {}),
        )

    def constrain(self, params: Any, prompt: ChatPrompt) -> Any:
        """Attach the compiled grammar of `prompt` (if any) to the sampling `params`."""
        if prompt.grammar is None:
            return params
        from longcat2.engine.grammar import GrammarError, Grammars

        if self._grammars is None:
            vocab = self.worker.engine.cfg.vocab_size
            self._grammars = Grammars(self.tokenizer.backend.to_str(), vocab, self.tokenizer.eos_id)
        try:
            params.grammar = self._grammars.compile(prompt.grammar)
        except GrammarError as e:
            raise APIError(400, f"the tool or response schemas cannot be enforced: {e}", param="tools") from e
        return params

    def submit(self, prompt_ids: list[int], params: Any, stops: Sequence[str] = ()) -> RequestHandle:
        try:
            handle = self.worker.submit(prompt_ids, params, stops)
        except QueueFull as e:
            raise APIError(429, str(e), code="server_busy", headers={"retry-after": "1"}) from e
        except ShuttingDown as e:
            raise APIError(503, f"Service unavailable: {e}", code="unavailable") from e
        access_log.track(handle)  # its token counts go into the request's access-log line
        return handle


def check_stops(stop: str | list[str] | None, param: str, limit: int = 16) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limit:
        raise APIError(400, f"{param}: at most {limit} stop sequences are supported", param=param)
    if any(not s for s in stops):
        raise APIError(400, f"{param}: stop sequences must be non-empty strings", param=param)
    return stops


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------------------------------------- prompts


@dataclass
class ChatPrompt:
    """A rendered chat request: the prompt as `chat.render_parts` (template tags kept apart from request
    text), what to feed the parser first, and parsing options."""

    parts: list[str]
    prefix: str = ""  # forced reply start (tool_choice), fed to the parser before the model's output
    tools: list[dict[str, Any]] | None = None  # tools for the parser (string-typed XML arguments)
    calls_as_text: bool = False  # tool_choice "none": a call the model writes anyway stays text
    grammar: str | None = None  # Lark grammar of the reply (constrained decoding)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def build_chat_prompt(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    thinking: bool | None,
    tool_mode: str,
    forced_name: str | None = None,
    *,
    constrained: bool = False,
    parallel: bool = True,
    json_schema: dict[str, Any] | None = None,
) -> ChatPrompt:
    """tool_mode: "auto" | "none" | "required" | "named" (with `forced_name`). `constrained`: give the
    prompt its reply grammar instead of prefilling forced calls; `json_schema`: JSON content."""
    if tool_mode in ("required", "named") and not tools:
        raise APIError(400, "tool_choice requires a tool, but no tools were given", param="tool_choice")
    if tool_mode == "named":
        names = [t["function"]["name"] for t in tools or []]
        if forced_name not in names:
            raise APIError(
                400,
                f"tool_choice names the tool {forced_name!r}, which is not in tools ({', '.join(names)})",
                param="tool_choice",
            )
    try:
        parts = chat.render_parts(messages, tools if tool_mode != "none" else None, thinking)
    except chat.ChatFormatError as e:
        raise APIError(400, str(e), param="messages") from e
    if constrained:
        if thinking is None:  # the grammar must know what chat.render decides
            thinking = chat.auto_thinking(messages)
        grammar = reply_grammar(
            tools, tool_mode, forced_name, parallel=parallel, thinking=thinking, json_schema=json_schema
        )
        return ChatPrompt(parts, "", tools, calls_as_text=tool_mode == "none", grammar=grammar)
    forced = [] if tool_mode not in ("required", "named") else [chat.CALL_OPEN]
    if tool_mode == "named":
        forced.append(f"{forced_name}\n")
    parts = chat.merge_parts([*parts, *forced])
    return ChatPrompt(parts, "".join(forced), tools, calls_as_text=tool_mode == "none")


# -------------------------------------------------------------------------------------------- generation


@dataclass
class Finished:
    """The end of a chat generation. reason: "stop" | "length" | "tool_calls" | "abort" | "error"."""

    reason: str
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    cache_written_tokens: int = 0  # prompt tokens added to the prefix cache


ChatEvent = chat.TextDelta | chat.ReasoningDelta | chat.ToolCallEvent | Finished
_MARKUP = re.compile(r"</?longcat_[a-z_]+>")


async def chat_events(
    handle: RequestHandle, prompt: ChatPrompt, make_id: Callable[[], str]
) -> AsyncIterator[ChatEvent]:
    """Parse a request's output into chat events, ending with one `Finished`. Cancels the request when the
    consumer stops early (client disconnect, handler cancelled)."""
    parser = chat.StreamParser(prompt.tools, make_id=make_id)
    calls = 0
    done = False

    def convert(events: list[chat.Event]) -> list[chat.Event]:
        nonlocal calls
        out: list[chat.Event] = []
        for ev in events:
            if isinstance(ev, chat.ToolCallEvent):
                if prompt.calls_as_text:
                    ev = chat.TextDelta(chat.format_tool_call(ev.name, ev.arguments))
                else:
                    calls += 1
            if isinstance(ev, (chat.TextDelta, chat.ReasoningDelta)) and "longcat_" in ev.text:
                text = _MARKUP.sub("", ev.text)  # an unparsed (cut-off) call: plain text, no tags
                if not text:
                    continue
                ev = type(ev)(text)
            out.append(ev)
        return out

    try:
        for ev in convert(parser.feed(prompt.prefix) if prompt.prefix else []):
            yield ev
        async for chunk in handle:
            for ev in convert(parser.feed(chunk.text)):
                yield ev
            if chunk.finished:
                for ev in convert(parser.finish()):
                    yield ev
                reason = chunk.finish_reason or "stop"
                stop_seq = chunk.stop_reason if isinstance(chunk.stop_reason, str) else None
                if reason == "stop" and calls and stop_seq is None:
                    reason = "tool_calls"
                done = True
                yield Finished(
                    reason,
                    stop_seq,
                    handle.prompt_tokens,
                    chunk.completion_tokens,
                    chunk.error,
                    handle.cached_tokens,
                    handle.cache_written_tokens,
                )
                return
    finally:
        if not done:
            handle.cancel()


def raise_for_finish(fin: Finished) -> None:
    """A generation that ended in error or was cancelled becomes the API error of a non-streamed reply."""
    if fin.reason == "error":
        raise APIError(500, fin.error or "generation failed")
    if fin.reason == "abort":
        raise APIError(503, "The request was cancelled because the server is shutting down")


async def respond_chat(
    request: Request,
    handle: RequestHandle,
    events: AsyncIterator[ChatEvent],
    stream: bool,
    to_sse: Callable[[AsyncIterator[ChatEvent]], AsyncIterator[bytes]],
    to_json: Callable[[list[Any], Finished], dict[str, Any]],
) -> Any:
    """The shape both chat APIs share: stream the events through `to_sse`, or collect them and build the
    reply with `to_json`. Either way the request is cancelled (its engine slot freed) when the client goes."""
    from fastapi.responses import JSONResponse

    from longcat2.serve.sse import SSEResponse

    if stream:

        async def body() -> AsyncIterator[bytes]:
            try:
                async for b in to_sse(events):
                    yield b
            finally:
                handle.cancel()
                await events.aclose()  # type: ignore[attr-defined]

        return SSEResponse(body())

    async def run() -> dict[str, Any]:
        got: list[Any] = []
        fin: Finished | None = None
        try:
            async for ev in events:
                if isinstance(ev, Finished):
                    fin = ev
                else:
                    got.append(ev)
        finally:
            handle.cancel()
        assert fin is not None
        raise_for_finish(fin)
        return to_json(got, fin)

    return JSONResponse(await wait_or_disconnect(request, run()))


async def wait_or_disconnect(request: Request, coro: Any) -> Any:
    """Await `coro`; if the client disconnects first, cancel it (its `finally` frees the request) and raise
    `asyncio.CancelledError`."""
    task = asyncio.ensure_future(coro)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


MAX_JSON_DEPTH = 100  # deeper request bodies are a 400 (nothing legitimate nests this deep)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed `max_bytes` (from Content-Length, else
    while it streams in), so an oversized body is never held in memory."""

    def too_large() -> APIError:
        return APIError(
            413,
            f"The request body is larger than this server's limit of {max_bytes} bytes "
            "(serve --max-request-bytes)",
            code="request_too_large",
        )

    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large()
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > max_bytes:
            raise too_large()
        parts.append(part)
    return b"".join(parts)


def _where(loc: tuple | None) -> str:
    keys: list[str] = []
    while loc is not None:
        keys.append(str(loc[0]))
        loc = loc[1]
    return ".".join(reversed(keys))


def check_json(data: Any) -> None:
    """Reject what json.loads accepts but nothing downstream can handle: nesting deeper than
    `MAX_JSON_DEPTH` and strings with lone UTF-16 surrogates (`"\\ud800"`: not encodable as UTF-8, so no
    tokenizer can read them). Iterative, so a deep body cannot exhaust the interpreter's stack."""
    stack: list[tuple[Any, int, tuple | None]] = [(data, 1, None)]
    while stack:
        obj, depth, loc = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(
                400, f"The request body is nested more than {MAX_JSON_DEPTH} levels deep", param=_where(loc)
            )
        if isinstance(obj, dict):
            for k, v in obj.items():
                _check_text(k, loc)
                if isinstance(v, (dict, list, str)):
                    stack.append((v, depth + 1, (k, loc)))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                if isinstance(v, (dict, list, str)):
                    stack.append((v, depth + 1, (i, loc)))
        elif isinstance(obj, str):
            _check_text(obj, loc)


def _check_text(s: str, loc: tuple | None) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        where = _where(loc)
        raise APIError(
            400,
            f"{where or 'The request body'}: the text contains a lone UTF-16 surrogate "
            f"({s[e.start : e.end].encode('utf-8', 'surrogatepass')!r} at character {e.start}), which is not "
            "valid Unicode",
            param=where or None,
        ) from None


async def parse_body(request: Request, model: type[ModelT], max_bytes: int) -> ModelT:
    """Read and validate a JSON body: too large is a 413; not UTF-8, malformed or too deeply nested JSON,
    lone surrogates, a non-object body or invalid fields are 400s."""
    raw = await read_body(request, max_bytes)
    if not raw.strip():
        raise APIError(400, "The request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"The request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"Malformed JSON in the request body: {e}") from e
    except RecursionError:
        raise APIError(400, f"The request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}")
    check_json(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        msg, loc = validation_message(e)
        raise APIError(400, f"Invalid request: {msg}", param=loc) from e
