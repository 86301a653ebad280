"""The reply grammar accepts exactly the replies the API contract allows: replies rendered by the chat
template (`chat.format_tool_call`) with valid arguments, per `tool_choice` / parallel setting, and rejects
unoffered tools, missing or invalid arguments, extra calls and spelled-out markup."""

from __future__ import annotations

import pytest

from longcat2 import chat
from longcat2.engine.grammar import Grammars
from longcat2.serve.core import DEFAULT_MODEL_DIR
from longcat2.serve.reply_grammar import reply_grammar
from longcat2.tokenizer import load_tokenizer

pytest.importorskip("llguidance")
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "where": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]},
            },
            "required": ["city"],
        },
    },
}
NOTE = {"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {}}}}
CALL = chat.format_tool_call("get_weather", {"city": "Paris", "unit": "c", "days": 3, "where": {"lat": 48.8}})
THINK = f"{chat.THINK_OPEN}\nhmm\n{chat.THINK_CLOSE}\n"


@pytest.fixture(scope="module")
def accepts():
    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    grammars = Grammars(tok.backend.to_str(), 4096, tok.eos_id)

    def run(grammar: str, text: str) -> bool:
        m = grammars.compile(grammar).matcher
        return m.consume_tokens(tok.encode(text) + [tok.eos_id]) and not m.is_error()

    return run


def test_auto(accepts):
    g = reply_grammar([WEATHER, NOTE], "auto")
    assert accepts(g, "Sure.\n" + CALL)
    assert accepts(g, CALL + "\n" + chat.format_tool_call("note", {}))
    assert accepts(g, THINK + "Just text.")
    assert accepts(g, chat.format_tool_call("get_weather", {"city": "42"}))  # a string that looks like JSON
    assert not accepts(g, chat.format_tool_call("calculator", {"x": 1}))  # not offered
    assert not accepts(g, chat.format_tool_call("get_weather", {"unit": "c"}))  # required city missing
    assert not accepts(g, chat.format_tool_call("get_weather", {"city": "P", "unit": "k"}))  # not in enum
    assert not accepts(g, chat.format_tool_call("get_weather", {"city": "P", "days": 9}))  # above maximum
    assert not accepts(g, chat.format_tool_call("get_weather", {"city": "P", "where": {}}))  # nested required
    assert not accepts(g, chat.format_tool_call("get_weather", {"city": "P", "x": 1}))  # unknown argument
    assert not accepts(g, CALL + "trailing text")
    assert not accepts(g, "I will write <longcat_tool_call" + ">get_weather")  # never spelled out either


def test_tool_choice_forms(accepts):
    assert not accepts(reply_grammar([WEATHER], "none"), CALL)
    assert not accepts(reply_grammar(None, "auto"), CALL)
    assert accepts(reply_grammar(None, "auto"), "Hello!")
    required = reply_grammar([WEATHER, NOTE], "required")
    assert accepts(required, CALL) and accepts(required, THINK + CALL)
    assert not accepts(required, "No call.") and not accepts(required, "Text first.\n" + CALL)
    named = reply_grammar([WEATHER, NOTE], "named", "note")
    assert accepts(named, chat.format_tool_call("note", {})) and not accepts(named, CALL)
    assert not accepts(named, chat.format_tool_call("note", {}) + "\n" + chat.format_tool_call("note", {}))
    single = reply_grammar([WEATHER, NOTE], "auto", parallel=False)
    assert accepts(single, CALL) and not accepts(single, CALL + "\n" + chat.format_tool_call("note", {}))
    assert not accepts(reply_grammar([WEATHER], "auto", thinking=False), THINK + "x")


def test_json_content(accepts):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    g = reply_grammar(None, "auto", json_schema=schema)
    assert accepts(g, '{"n": 3}') and accepts(g, THINK + '{"n": 3}')
    assert not accepts(g, '{"n": "3"}') and not accepts(g, "n is 3")
    assert accepts(reply_grammar([WEATHER], "auto", json_schema=schema), CALL)


def test_unimplemented_schema_keywords_do_not_fail_the_request(accepts):
    """Claude Code's tools carry `propertyNames` (not implemented by llguidance): the grammar still compiles,
    enforcing the rest of the schema (the type of the map's values, required arguments)."""
    task = {
        "type": "function",
        "function": {
            "name": "task_create",
            "parameters": {
                "type": "object",
                "properties": {
                    "subject": {"type": "string"},
                    "metadata": {
                        "type": "object",
                        "propertyNames": {"type": "string"},
                        "additionalProperties": {},
                    },
                    "count": {"type": "integer", "format": "int64-ish"},
                },
                "required": ["subject"],
            },
        },
    }
    g = reply_grammar([task], "auto")
    assert accepts(
        g, chat.format_tool_call("task_create", {"subject": "x", "metadata": {"k": 1}, "count": 2})
    )
    assert not accepts(g, chat.format_tool_call("task_create", {"subject": "x", "metadata": [1]}))
    assert not accepts(g, chat.format_tool_call("task_create", {"metadata": {"k": 1}}))
