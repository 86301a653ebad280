"""`POST /v1/responses` driven by the unmodified `openai` SDK (`responses.create`, streamed and not) against
the real server and engine running the tiny model that memorised the scripted replies: a function-tool round
trip, reasoning items, the typed event sequence, budgets, tool kinds agents send, and clear errors."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serve_helpers import COUNTING, GREETING, THOUGHT, WEATHER_ANSWER, WEATHER_TOOL, wait_idle

MODEL = "longcat-test"
TOOL = {"type": "function", **WEATHER_TOOL["function"]}  # the Responses API's flat function tool
QUESTION = "What is the weather in Paris?"


@pytest.fixture
def oai(scripted_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=scripted_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _events(stream) -> list:
    return [ev for ev in stream]


def test_function_tool_round_trip(oai, scripted_server):
    r = oai.responses.create(model=MODEL, input=QUESTION, tools=[TOOL])
    assert r.status == "completed" and r.model == MODEL
    kinds = [item.type for item in r.output]
    assert kinds == ["message", "function_call"], r.output
    assert r.output[0].content[0].text == "Let me check."
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and r.usage.output_tokens > 0
    # the client sends the output back with the tool's result, statelessly
    follow = oai.responses.create(
        model=MODEL,
        store=False,
        tools=[TOOL],
        input=[
            {"role": "user", "content": QUESTION},
            *[item.model_dump(exclude_none=True) for item in r.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 22 degrees"},
        ],
    )
    assert follow.output_text == WEATHER_ANSWER
    assert follow.usage.input_tokens > r.usage.input_tokens
    wait_idle(scripted_server.state)


def test_streamed_equals_non_streamed_with_typed_events(oai):
    kw = dict(model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}])
    r = oai.responses.create(**kw, tools=[TOOL])
    events = _events(oai.responses.create(**kw, tools=[TOOL], stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[2:-1] == [
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * types.count("response.output_text.delta"),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    final = events[-1].response
    assert [i.type for i in final.output] == [i.type for i in r.output]
    assert final.output[0].content[0].text == r.output[0].content[0].text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Let me check."
    assert final.output[1].arguments == r.output[1].arguments
    assert final.usage.output_tokens == r.usage.output_tokens
    # the SDK's own stream accumulator agrees
    with oai.responses.stream(**kw, tools=[TOOL]) as stream:
        got = stream.get_final_response()
    assert got.output[1].name == "get_weather"


def test_reasoning_items_and_instructions(oai):
    r = oai.responses.create(model=MODEL, input="hi", reasoning={"effort": "high"})
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == THOUGHT and r.output_text == GREETING
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    streamed = _events(
        oai.responses.create(model=MODEL, input="hi", reasoning={"effort": "high"}, stream=True)
    )
    assert "".join(e.delta for e in streamed if e.type == "response.reasoning_text.delta") == THOUGHT
    # instructions are the system message; effort "none" turns thinking off
    r = oai.responses.create(model=MODEL, instructions="Be brief.", input="hi", reasoning={"effort": "none"})
    assert [i.type for i in r.output] == ["message"] and r.output_text == GREETING


def test_budget_and_forced_tool(oai):
    r = oai.responses.create(model=MODEL, input="count", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and COUNTING.startswith(r.output_text)
    ev = _events(oai.responses.create(model=MODEL, input="count", max_output_tokens=3, stream=True))
    assert ev[-1].type == "response.incomplete"
    forced = oai.responses.create(
        model=MODEL, input="hi", tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"}
    )
    assert [i.type for i in forced.output] == ["function_call"]
    assert json.loads(forced.output[0].arguments) == {"city": "Paris"}
    none = oai.responses.create(model=MODEL, input="hi", tools=[TOOL], tool_choice="none")
    assert none.output_text == GREETING


def test_agent_tool_kinds_are_accepted(oai):
    """Hosted and custom tools are ignored, namespaces flattened: the request still works."""
    tools = [
        {"type": "web_search"},
        {"type": "local_shell"},
        {"type": "custom", "name": "apply_patch", "description": "patch", "format": {"type": "text"}},
        {"type": "namespace", "name": "weather", "tools": [TOOL]},
    ]
    r = oai.responses.create(
        model=MODEL, input=QUESTION, tools=tools, include=["reasoning.encrypted_content"]
    )
    assert [i.name for i in r.output if i.type == "function_call"] == ["get_weather"]
    assert [t.name for t in r.tools] == ["get_weather"]


def test_clear_errors(oai, scripted_server):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oai.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
    with pytest.raises(openai.BadRequestError, match="input.0.content.0"):
        oai.responses.create(
            model=MODEL, input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
        )
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        oai.responses.create(model=MODEL, input="hi", tool_choice="required")
    r = httpx.post(scripted_server.url + "/v1/responses", json={"model": MODEL, "input": 5})
    assert r.status_code == 400 and "input" in r.json()["error"]["message"]
