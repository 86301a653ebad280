"""The LongCat chat format: render OpenAI-style messages to text (and to SFT ids + loss mask), parse model
output back into content / reasoning / tool calls, in one shot or streamed token by token.

Design choices (the exact LongCat-2.0 template is unpublished; this follows the LongCat family, spec §7.3):
- Turns: `<longcat_system>SYS<longcat_user>USER<longcat_assistant>REPLY</longcat_s>`; no BOS, no newlines
  between turns. A system turn is written only when there is a system message or tools; `developer` is
  an alias of `system`. The generation prompt is a bare `<longcat_assistant>`.
- Thinking: `thinking=True` appends ` /think_on` to the last user message (the last `user`, not a tool
  result) and the model then opens its reply with `<longcat_think>\\nREASONING\\n</longcat_think>\\n`. The
  prompt does not pre-open the think block, so the model's output always carries both tags and a
  parser needs no outside state. Reasoning of assistant turns before the last user message is dropped
  unless `keep_history_reasoning=True` (LongCat's `save_history_reasoning_content`).
- Tools are listed at the end of the system turn under a `# Tools` heading: one JSON object per line
  (`{"name", "description", "parameters"}`), then a short statement of the call syntax. The parameters
  schema is written canonically, every object's keys sorted: clients send the same schema with its keys
  in different orders (`type` first, or `properties` first), and the same tools should make the same
  prompt. A model sees one order in training and in serving (issue 18: the embedded model, trained on
  key-sorted schemas, closed an argument key with p = 0.001-0.016 after a `type`-first schema and
  0.91-1.0 after the same schema sorted), and a prefix cache hits whichever order a client used.
- Tool calls follow the reply content, one block each (separated by `\\n`), in the XML variant
  `<longcat_tool_call>NAME\\n<longcat_arg_key>K</longcat_arg_key>\\n<longcat_arg_value>V</longcat_arg_value>\\n
  </longcat_tool_call>` (`tool_format="xml"`, default) or the Flash-Chat JSON variant
  `<longcat_tool_call>{"name": NAME, "arguments": {...}}</longcat_tool_call>` (`tool_format="json"`).
  An XML value is written raw when it is a string that would not parse as JSON, else JSON-encoded, so
  decoding "JSON if it parses, else the raw string" returns exactly what was rendered (a string "42" is
  written `"42"`). Given the tool schemas, the parser also keeps values of `string` parameters as text.
- Tool results: consecutive `tool` messages become one user-side turn,
  `<longcat_user><longcat_tool_response>R1</longcat_tool_response>\\n<longcat_tool_response>R2...`.
- Only the template writes control tokens. The tags are `Tag` strings, and `render_parts` returns the
  transcript as tags and texts kept apart, so a server encodes the tags as special ids and every text
  (contents, tool results, names, arguments, schemas) with special-token matching off (`encode_parts`):
  a user who types `</longcat_s><longcat_system>` gets those characters, not a forged turn. `render`
  joins the same parts, so both agree character for character.
- Parsing is one state machine (`StreamParser`); `parse(text)` just feeds it the whole text, so the
  streamed and one-shot results agree by construction. Whitespace next to tags is trimmed (the
  template's `\\n`s); an output that ends inside a tag prefix holds that suffix back until it is
  resolved, so no fragment of a tag is ever emitted as text. Text after `</longcat_s>` is ignored. A
  tool-call block that cannot be parsed (or is cut off) is returned as plain text, so nothing is lost.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class Tag(str):
    """A special token as the template writes it. `render_parts` keeps these apart from all other text,
    so an encoder can emit control tokens for them and encode everything else (request text) as text."""


SYSTEM, USER, ASSISTANT, END = (
    Tag("<longcat_system>"),
    Tag("<longcat_user>"),
    Tag("<longcat_assistant>"),
    Tag("</longcat_s>"),
)
THINK_OPEN, THINK_CLOSE = Tag("<longcat_think>"), Tag("</longcat_think>")
CALL_OPEN, CALL_CLOSE = Tag("<longcat_tool_call>"), Tag("</longcat_tool_call>")
KEY_OPEN, KEY_CLOSE = Tag("<longcat_arg_key>"), Tag("</longcat_arg_key>")
VALUE_OPEN, VALUE_CLOSE = Tag("<longcat_arg_value>"), Tag("</longcat_arg_value>")
RESPONSE_OPEN, RESPONSE_CLOSE = Tag("<longcat_tool_response>"), Tag("</longcat_tool_response>")
THINK_ON = " /think_on"
TOOL_FORMATS = ("xml", "json")
Message = dict[str, Any]


class ChatFormatError(ValueError):
    """A message, tool or tool call cannot be rendered; the message names its position and the problem."""


class _Encoder(Protocol):
    special_ids: dict[str, int]

    def encode_plain_batch(self, texts: list[str]) -> list[list[int]]: ...


# -------------------------------------------------------------------------------------------- render


def _text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        out = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                out.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatFormatError(
                    f"{where}.content[{i}] has type {kind!r}; only text parts are supported"
                )
        return "".join(out)
    raise ChatFormatError(
        f"{where}.content must be a string or a list of text parts, got {type(content).__name__}"
    )


def _tool_function(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise ChatFormatError(f"{where} must be an object, got {type(tool).__name__}")
    fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatFormatError(f"{where} must be {{'type': 'function', 'function': {{'name': ...}}}}")
    out = {"name": fn["name"]}
    if fn.get("description"):
        out["description"] = fn["description"]
    out["parameters"] = _sorted_keys(fn.get("parameters") or {"type": "object", "properties": {}})
    return out


def _sorted_keys(value: Any) -> Any:
    """A copy of a JSON value with every object's keys in sorted order (the canonical schema; module doc)."""
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def _tools_parts(tools: Sequence[dict[str, Any]], tool_format: str) -> list[str]:
    lines = ["# Tools", "You may call one or more of these functions (JSON schemas, one per line):"]
    lines += [json.dumps(_tool_function(t, f"tools[{i}]"), ensure_ascii=False) for i, t in enumerate(tools)]
    if tool_format == "json":
        lines.append("To call a function, write one block per call:\n")
        syntax = [CALL_OPEN, '{"name": FUNCTION_NAME, "arguments": {ARGUMENTS}}', CALL_CLOSE]
        return ["\n".join(lines), *syntax]
    lines.append("To call a function, write one block per call, with one key/value pair per argument:\n")
    syntax = [CALL_OPEN, "FUNCTION_NAME\n", KEY_OPEN, "ARGUMENT_NAME", KEY_CLOSE, "\n", VALUE_OPEN, "VALUE"]
    syntax += [
        VALUE_CLOSE,
        "\n",
        CALL_CLOSE,
        "\nWrite string values as they are and all other values as JSON.",
    ]
    return ["\n".join(lines), *syntax]


def format_tools(tools: Sequence[dict[str, Any]], tool_format: str = "xml") -> str:
    """The `# Tools` block appended to the system turn."""
    return "".join(_tools_parts(tools, tool_format))


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


def _value_text(v: Any) -> str:
    if isinstance(v, str) and not _is_json(v):
        return v
    return json.dumps(v, ensure_ascii=False)


def _call_parts(call: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(call, dict):
        raise ChatFormatError(f"{where} must be an object, got {type(call).__name__}")
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"{where}.function.name is missing or empty")
    args = fn.get("arguments", {})
    if args is None or args == "":
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ChatFormatError(
                f"{where}.function.arguments is not valid JSON ({e.msg}): {args[:80]!r}"
            ) from e
    if not isinstance(args, dict):
        raise ChatFormatError(f"{where}.function.arguments must be a JSON object, got {type(args).__name__}")
    return name, args


def _tool_call_parts(name: str, arguments: dict[str, Any], tool_format: str) -> list[str]:
    if tool_format == "json":
        return [CALL_OPEN, json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False), CALL_CLOSE]
    if tool_format != "xml":
        raise ChatFormatError(f"tool_format must be one of {TOOL_FORMATS}, got {tool_format!r}")
    parts = [CALL_OPEN, name + "\n"]
    for k, v in arguments.items():
        parts += [KEY_OPEN, k, KEY_CLOSE, "\n", VALUE_OPEN, _value_text(v), VALUE_CLOSE, "\n"]
    return [*parts, CALL_CLOSE]


def format_tool_call(name: str, arguments: dict[str, Any], tool_format: str = "xml") -> str:
    """One `<longcat_tool_call>...</longcat_tool_call>` block."""
    return "".join(_tool_call_parts(name, arguments, tool_format))


def _reasoning_of(m: Message) -> str:
    r = m.get("reasoning_content", m.get("reasoning"))
    return r if isinstance(r, str) else ""


def auto_thinking(messages: Sequence[Message]) -> bool:
    """Thinking's auto rule: on when an assistant reply after the last user message carries reasoning."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    return any(m.get("role") == "assistant" and _reasoning_of(m) for m in messages[last_user + 1 :])


def _segments(
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None,
    add_generation_prompt: bool,
    thinking: bool | None,
    tool_format: str,
    keep_history_reasoning: bool,
) -> list[tuple[str, bool]]:
    """The transcript as (text, produced_by_assistant) pieces; joined, they are `render`'s output."""
    if tool_format not in TOOL_FORMATS:
        raise ChatFormatError(f"tool_format must be one of {TOOL_FORMATS}, got {tool_format!r}")
    if isinstance(messages, dict) or not isinstance(messages, Sequence):
        raise ChatFormatError("messages must be a list of message objects")
    roles = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise ChatFormatError(f"messages[{i}].role is {role!r}; expected system, user, assistant or tool")
        roles.append(role)
    last_user = max((i for i, r in enumerate(roles) if r == "user"), default=-1)
    if thinking is None:
        thinking = auto_thinking(messages)

    segs: list[tuple[list[str], bool]] = []
    start = 0
    system: list[str] = []
    if roles and roles[0] == "system":
        system, start = [_text_of(messages[0].get("content"), "messages[0]")], 1
    if tools:
        block = _tools_parts(tools, tool_format)
        system = [system[0], "\n\n", *block] if system and system[0] else block
    if start or tools:
        segs.append(([SYSTEM, *system], False))
    i = start
    while i < len(messages):
        m, role, where = messages[i], roles[i], f"messages[{i}]"
        if role == "system":
            segs.append(([SYSTEM, _text_of(m.get("content"), where)], False))
        elif role == "user":
            text = _text_of(m.get("content"), where)
            segs.append(([USER, text + (THINK_ON if thinking and i == last_user else "")], False))
        elif role == "tool":
            results: list[str] = []
            while i < len(messages) and roles[i] == "tool":
                text = _text_of(messages[i].get("content"), f"messages[{i}]")
                results += [*(["\n"] if results else []), RESPONSE_OPEN, text, RESPONSE_CLOSE]
                i += 1
            segs.append(([USER, *results], False))
            continue
        else:  # assistant
            body: list[str] = []
            reasoning = _reasoning_of(m)
            if reasoning and (i > last_user or keep_history_reasoning):
                body += [THINK_OPEN, f"\n{reasoning}\n", THINK_CLOSE, "\n"]
            content = _text_of(m.get("content"), where)
            body.append(content)
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ChatFormatError(f"{where}.tool_calls must be a list, got {type(calls).__name__}")
            for j, c in enumerate(calls):
                name, args = _call_parts(c, f"{where}.tool_calls[{j}]")
                if j or content:
                    body.append("\n")
                body += _tool_call_parts(name, args, tool_format)
            segs.append(([ASSISTANT], False))
            segs.append(([*body, END], bool(m.get("train", True))))
        i += 1
    if add_generation_prompt:
        segs.append(([ASSISTANT], False))
    return segs


def render(
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    thinking: bool | None = False,
    *,
    tool_format: str = "xml",
    keep_history_reasoning: bool = False,
) -> str:
    """Render OpenAI-style messages as LongCat text. `thinking=None` turns thinking on when an assistant
    reply after the last user message has `reasoning_content`."""
    segs = _segments(messages, tools, add_generation_prompt, thinking, tool_format, keep_history_reasoning)
    return "".join(p for parts, _ in segs for p in parts)


def render_parts(
    messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None, thinking: bool | None
) -> list[str]:
    """`render(messages, tools, True, thinking)` (a generation prompt) as a list whose items are either a
    `Tag` the template wrote or text (which may spell a tag when a request's text does: it must be encoded
    as text). Adjacent texts are merged."""
    segs = _segments(messages, tools, True, thinking, "xml", False)
    return merge_parts(p for parts, _ in segs for p in parts)


def merge_parts(parts: Iterable[str]) -> list[str]:
    """Merge adjacent non-`Tag` items and drop empty ones."""
    out: list[str] = []
    for p in parts:
        if not p:
            continue
        if isinstance(p, Tag) or not out or isinstance(out[-1], Tag):
            out.append(p)
        else:
            out[-1] = out[-1] + p
    return out


def encode_parts(
    parts: Sequence[str], encode_texts: Callable[[list[str]], list[list[int]]], tag_ids: dict[str, int]
) -> list[int]:
    """Token ids of `render_parts` output: a control token per `Tag`, and `encode_texts` (a batch encoder
    that must encode special-token spellings as plain text) for everything else."""
    encoded = iter(encode_texts([p for p in parts if not isinstance(p, Tag)]))
    ids: list[int] = []
    for p in parts:
        ids += [tag_ids[p]] if isinstance(p, Tag) else next(encoded)
    return ids


def render_with_mask(
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None,
    tokenizer: _Encoder,
    *,
    thinking: bool | None = None,
    tool_format: str = "xml",
    keep_history_reasoning: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids of the full transcript (no generation prompt) and a loss mask that is 1 exactly on what the
    assistant produces: reasoning block, content, tool calls and the closing `</longcat_s>` of each reply
    (a reply with `"train": False` stays 0). Only the template's tags become special ids: message text is
    encoded with `tokenizer.encode_plain_batch` (special-token spellings stay text), so the ids equal
    `tokenizer.encode(render(messages, tools, add_generation_prompt=False, thinking=...))` whenever no
    message spells a tag. Pieces are cut at tags, so the masking changes no token boundary."""
    segs = _segments(messages, tools, False, thinking, tool_format, keep_history_reasoning)
    merged: list[tuple[list[str], bool]] = []
    for parts, train in segs:
        if merged and merged[-1][1] == train:
            merged[-1][0].extend(parts)
        else:
            merged.append((list(parts), train))
    ids: list[int] = []
    mask: list[int] = []
    for parts, train in merged:
        piece = encode_parts(merge_parts(parts), tokenizer.encode_plain_batch, tokenizer.special_ids)
        ids += piece
        mask += [int(train)] * len(piece)
    return ids, mask


# --------------------------------------------------------------------------------------------- parse


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    index: int
    id: str
    name: str
    arguments: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


Event = TextDelta | ReasoningDelta | ToolCallEvent


@dataclass
class ParsedOutput:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"id", "name", "arguments": dict}

    def to_message(self) -> Message:
        """An OpenAI assistant message (tool-call arguments as JSON strings, as the API returns them)."""
        msg: Message = {"role": "assistant", "content": self.content or None}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {
                        "name": c["name"],
                        "arguments": json.dumps(c["arguments"], ensure_ascii=False),
                    },
                }
                for c in self.tool_calls
            ]
        return msg


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _string_params(tools: Iterable[dict[str, Any]] | None) -> dict[str, set[str]]:
    """Function name -> names of its parameters whose schema type is exactly `string`."""
    out: dict[str, set[str]] = {}
    for t in tools or ():
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        props = props if isinstance(props, dict) else {}
        out[fn["name"]] = {k for k, s in props.items() if isinstance(s, dict) and s.get("type") == "string"}
    return out


_ARG_RE = re.compile(
    re.escape(KEY_OPEN) + r"(.*?)" + re.escape(KEY_CLOSE) + r"\s*" + re.escape(VALUE_OPEN) + r"(.*?)"
    r"" + re.escape(VALUE_CLOSE),
    re.DOTALL,
)


def parse_tool_call(inner: str, string_params: dict[str, set[str]] | None = None) -> tuple[str, dict] | None:
    """(name, arguments) from the text between `<longcat_tool_call>` and `</longcat_tool_call>`, in the
    JSON or the XML variant; None when it is neither."""
    s = inner.strip()
    if s.startswith("{"):
        try:
            obj = json.loads(s)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                return None
        return (obj["name"], args) if isinstance(args, dict) else None
    head, sep, _ = s.partition(KEY_OPEN)
    name = head.strip()
    if not name or "<" in name or "\n" in name:
        return None
    pairs = _ARG_RE.findall(s[len(head) :])
    leftover = _ARG_RE.sub("", s[len(head) :]).strip()
    if leftover:
        return None
    strings = (string_params or {}).get(name, set())
    args: dict[str, Any] = {}
    for key, raw in pairs:
        key = key.strip()
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if key in strings and not isinstance(value, str):
            value = raw
        args[key] = value
    return name, args


_TEXT, _REASONING, _CALL, _DONE = "text", "reasoning", "call", "done"
_TAGS = {
    _TEXT: (THINK_OPEN, CALL_OPEN, END, THINK_CLOSE),  # a stray </longcat_think> is dropped
    _REASONING: (THINK_CLOSE, END),
}
_TAG_RE = {mode: re.compile("|".join(re.escape(t) for t in tags)) for mode, tags in _TAGS.items()}
_PREFIXES = {mode: {t[:k] for t in tags for k in range(1, len(t))} for mode, tags in _TAGS.items()}
_MAX_TAG = max(len(t) for tags in _TAGS.values() for t in tags)


class StreamParser:
    """Incremental parser of one assistant reply. `feed(delta)` returns the events that delta completes;
    `finish()` flushes whatever is held back and returns the last events.

    Events: `TextDelta` (content), `ReasoningDelta`, `ToolCallEvent` (a whole call, when its closing tag
    arrives). `tools` (OpenAI tool list) lets XML values of `string` parameters stay strings.
    `start_in_reasoning=True` is for prompts that pre-open `<longcat_think>`.
    """

    def __init__(
        self,
        tools: Sequence[dict[str, Any]] | None = None,
        *,
        start_in_reasoning: bool = False,
        make_id: Callable[[], str] = _new_call_id,
    ) -> None:
        self._strings = _string_params(tools)
        self._make_id = make_id
        self._mode = _REASONING if start_in_reasoning else _TEXT
        self._buf = ""
        self._held = ""  # trailing whitespace of the current channel, dropped if a tag follows
        self._lstrip = True  # drop leading whitespace of the next text/reasoning run
        self._text_started = False
        self._calls = 0
        self._pre_call = ""
        self._finished = False

    def feed(self, delta: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("StreamParser.feed() called after finish()")
        self._buf += delta
        events: list[Event] = []
        self._run(events, final=False)
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if not self._finished:
            self._finished = True
            self._run(events, final=True)
        return events

    # -- internals

    def _emit(self, events: list[Event], text: str, boundary: bool) -> str:
        """Emit `text` on the current channel; returns the whitespace trimmed at a boundary."""
        text = self._held + text
        self._held = trimmed = ""
        if self._lstrip:
            text = text.lstrip()
        if boundary:
            kept = text.rstrip()
            trimmed, text = text[len(kept) :], kept
        else:
            kept = text.rstrip()
            self._held, text = text[len(kept) :], kept
        if not text:
            return trimmed
        self._lstrip = False
        if self._mode == _REASONING:
            events.append(ReasoningDelta(text))
        else:
            self._text_started = True
            events.append(TextDelta(text))
        return trimmed

    def _run(self, events: list[Event], final: bool) -> None:
        while True:
            if self._mode == _DONE:
                self._buf = ""
                return
            if self._mode == _CALL:
                end = self._buf.find(CALL_CLOSE)
                if end < 0:
                    if final:  # cut off inside a call: keep what the model wrote, as text
                        self._mode = _TEXT
                        self._emit(events, self._pre_call + CALL_OPEN + self._buf, boundary=True)
                        self._buf = ""
                    return
                inner, self._buf = self._buf[:end], self._buf[end + len(CALL_CLOSE) :]
                self._mode = _TEXT
                parsed = parse_tool_call(inner, self._strings)
                if parsed is None:
                    self._emit(events, self._pre_call + CALL_OPEN + inner + CALL_CLOSE, boundary=False)
                else:
                    events.append(ToolCallEvent(self._calls, self._make_id(), parsed[0], parsed[1]))
                    self._calls += 1
                    self._held = ""
                    self._lstrip = not self._text_started
                continue
            match = _TAG_RE[self._mode].search(self._buf)
            if match is None:
                if final:
                    self._emit(events, self._buf, boundary=True)
                    self._buf = ""
                    return
                hold = self._held_back(self._buf)
                self._emit(events, self._buf[: len(self._buf) - hold], boundary=False)
                self._buf = self._buf[len(self._buf) - hold :]
                return
            tag = match.group()
            trimmed = self._emit(events, self._buf[: match.start()], boundary=True)
            self._buf = self._buf[match.end() :]
            if tag == END:
                self._mode = _DONE
            elif tag == THINK_OPEN:
                self._mode, self._lstrip = _REASONING, True
            elif tag == THINK_CLOSE:
                self._mode, self._lstrip = _TEXT, True
            elif tag == CALL_OPEN:
                self._mode, self._pre_call = _CALL, trimmed  # restored if the block is not a valid call

    def _held_back(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a tag of the current mode."""
        prefixes = _PREFIXES[self._mode]
        for k in range(min(len(buf), _MAX_TAG - 1), 0, -1):
            if buf[-k:] in prefixes:
                return k
        return 0


def collect(events: Iterable[Event], into: ParsedOutput | None = None) -> ParsedOutput:
    """Accumulate events into a `ParsedOutput`."""
    out = into if into is not None else ParsedOutput()
    for e in events:
        if isinstance(e, TextDelta):
            out.content += e.text
        elif isinstance(e, ReasoningDelta):
            out.reasoning += e.text
        else:
            out.tool_calls.append(e.as_dict())
    return out


def parse(
    text: str,
    tools: Sequence[dict[str, Any]] | None = None,
    *,
    start_in_reasoning: bool = False,
    make_id: Callable[[], str] = _new_call_id,
) -> ParsedOutput:
    """Parse one assistant reply (the text after `<longcat_assistant>`, with or without `</longcat_s>`)."""
    p = StreamParser(tools, start_in_reasoning=start_in_reasoning, make_id=make_id)
    out = collect(p.feed(text))
    return collect(p.finish(), out)
