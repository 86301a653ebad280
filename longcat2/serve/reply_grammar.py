"""The grammar of an assistant reply in the LongCat chat format, for constrained decoding (Lark, compiled by
llguidance through `longcat2.engine.grammar`).

Design choices:
- Reply = optional think block (free text, only when thinking is not off) + body. The body depends on the
  request: free text (no tools, or `tool_choice: none`), a JSON document (`response_format` json_object /
  json_schema, Responses `text.format`), text followed by zero or more tool calls ("auto"), one or more
  calls and no text ("required"), exactly one call of the named tool (named choice). With
  `parallel_tool_calls: false` at most one call is allowed. After the body only EOS (`</longcat_s>`)
  can follow, so nothing can leak after the last call.
- Tool calls use the XML variant the prompt teaches (`chat.format_tool_call`): the name is one of the
  offered tools; arguments are written in the schema's property order, required ones always, optional ones
  at most once, unknown ones never. A value whose schema is a plain `string` is raw text, a string enum is
  one of its raw values, anything else is JSON constrained by the property's schema (`%json`, with the
  root's `$defs` carried along) — so `chat.parse_tool_call` turns every completed call into arguments that
  validate against the tool's schema. A schema without `properties` accepts any key with a JSON value.
- Free text (content, reasoning, raw values) may not contain the chat tags, neither as the special tokens
  (lexemes never match them) nor spelled out in ordinary tokens (a lexeme negation), so text can never be
  read back as markup.
"""

from __future__ import annotations

import json
from typing import Any

_FREE = r"/(.|\n)*/ & ~/(.|\n)*<\/?longcat_(.|\n)*/"  # any text that spells no chat tag
_STRING_KEYS = ("type", "description", "title", "default", "examples")


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _json(schema: Any) -> str:
    """`%json` of a schema, spaced as `json.dumps` (and the chat template) writes JSON: fixed separators,
    since flexible whitespace lets a weak model pad forever. Lenient: a keyword llguidance does not
    implement (`propertyNames`, which Claude Code's tools send; some `format`s) is not enforced instead of
    failing the whole request with a 400 that stops the client; every keyword it implements still is."""
    sub = schema if isinstance(schema, dict) else {}
    guide = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
    return "%json " + json.dumps({**sub, "x-guidance": guide}, ensure_ascii=False)


def _value_rule(schema: Any, defs: dict[str, Any]) -> str:
    """The Lark expression of one XML argument value for its property schema."""
    if isinstance(schema, dict) and schema.get("type") == "string":
        if set(schema) <= set(_STRING_KEYS):
            return "FREE"
        if set(schema) <= {*_STRING_KEYS, "enum"} and all(isinstance(v, str) for v in schema["enum"]):
            return "(" + " | ".join(_lit(v) for v in schema["enum"]) + ")" if schema["enum"] else "FREE"
    return _json({**defs, **schema} if isinstance(schema, dict) else {})


def _tool_rules(i: int, fn: dict[str, Any]) -> list[str]:
    """Rules `call{i}` (one call of tool i) and its arguments."""
    params = fn.get("parameters") or {}
    defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
    props = params.get("properties")
    required = set(params.get("required") or [])
    rules = []
    head = f"call{i}: <longcat_tool_call> {_lit(fn['name'] + chr(10))}"
    if not isinstance(props, dict) or not props:
        if props is None and params.get("additionalProperties", True) is not False:
            rules.append(
                f'any_arg{i}: <longcat_arg_key> ARGKEY </longcat_arg_key> "\\n" <longcat_arg_value> {_json({})} '
                '</longcat_arg_value> "\\n"'
            )
            rules.append(f"{head} any_arg{i}* </longcat_tool_call>")
        else:
            rules.append(f"{head} </longcat_tool_call>")
        return rules
    parts = []
    for j, (key, schema) in enumerate(props.items()):
        rules.append(
            f'arg{i}_{j}: <longcat_arg_key> {_lit(key)} </longcat_arg_key> "\\n" <longcat_arg_value> '
            f'{_value_rule(schema, defs)} </longcat_arg_value> "\\n"'
        )
        parts.append(f"arg{i}_{j}" + ("" if key in required else "?"))
    rules.append(f"{head} {' '.join(parts)} </longcat_tool_call>")
    return rules


def reply_grammar(
    tools: list[dict[str, Any]] | None,
    tool_mode: str,
    forced_name: str | None = None,
    *,
    parallel: bool = True,
    thinking: bool | None = None,
    json_schema: dict[str, Any] | None = None,
) -> str:
    """Lark grammar of a reply. tools: chat-completions tools; tool_mode: "auto" | "none" | "required" |
    "named"; json_schema: the content must be JSON matching it (`{"type": "object"}` for json_object)."""
    fns = [t.get("function", t) for t in tools or []] if tool_mode != "none" else []
    if tool_mode == "named":
        fns = [f for f in fns if f["name"] == forced_name]
    content = "FREE" if json_schema is None else _json(json_schema)
    rules = [f"FREE: {_FREE}", "ARGKEY: /[A-Za-z0-9_.\\-]+/"]
    if fns:
        for i, fn in enumerate(fns):
            rules += _tool_rules(i, fn)
        rules.append("call: " + " | ".join(f"call{i}" for i in range(len(fns))))
        rules.append('calls: call ("\\n" call)*' if parallel and tool_mode != "named" else "calls: call")
    if not fns:
        body = content
    elif tool_mode in ("required", "named"):
        body = "calls"
    elif json_schema is None:
        body = "FREE calls?"
    else:
        body = f'{content} ("\\n" calls)? | calls'
    if thinking is False:
        rules.insert(0, "start: body")
    else:
        rules.insert(0, "start: think? body")
        rules.append('think: <longcat_think> FREE </longcat_think> "\\n"?')
    rules.append(f"body: {body}")
    return "\n".join(rules) + "\n"
