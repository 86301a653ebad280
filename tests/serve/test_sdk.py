"""The unmodified `openai` and `anthropic` SDKs against a real server on the real engine, running a tiny model
that memorised the scripted replies (deterministic under greedy decoding, so tool calls, thinking and stop
reasons are checked exactly)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from serve_helpers import (
    COUNTING,
    GREETING,
    THOUGHT,
    WEATHER_ANSWER,
    WEATHER_TOOL,
    wait_idle,
)

MODEL = "longcat-test"
ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}


@pytest.fixture
def oai(scripted_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=scripted_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def ant(scripted_server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=scripted_server.url, api_key="unused", max_retries=0, timeout=30)


def _prompt_tokens(server, messages, tools=None, thinking=False) -> int:
    from longcat2 import chat

    return len(server.state.tokenizer.encode(chat.render(messages, tools, True, thinking)))


# ------------------------------------------------------------------------------------------- OpenAI


def test_openai_models(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids == ["longcat-test", "alias"]
    assert oai.models.retrieve("alias").id == "alias"


def test_openai_chat_and_usage(oai, scripted_server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=200)
    assert r.choices[0].message.content == GREETING
    assert r.choices[0].finish_reason == "stop"
    assert r.model == MODEL and r.object == "chat.completion"
    reply_tokens = len(scripted_server.state.tokenizer.encode(GREETING)) + 1  # + EOS
    assert r.usage.prompt_tokens == _prompt_tokens(scripted_server, messages)
    assert r.usage.completion_tokens == reply_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + reply_tokens


def test_openai_stream_with_usage(oai, scripted_server):
    messages = [{"role": "user", "content": "please count"}]
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=200,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == COUNTING
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.prompt_tokens == _prompt_tokens(scripted_server, messages)
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_length_and_stop(oai):
    r = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=3
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=100, stop=["four"]
    )
    assert r.choices[0].message.content == "one two three"
    assert r.choices[0].finish_reason == "stop"
    stream = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=100, stop="five", stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "one two three four"


def test_openai_tool_call_round_trip(oai):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=300)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Let me check."
    assert len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(call.function.arguments, str) and json.loads(call.function.arguments) == {
        "city": "Paris"
    }
    messages += [
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "temp_c": 22})},
    ]
    r2 = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=300)
    assert r2.choices[0].message.content == WEATHER_ANSWER
    assert r2.choices[0].finish_reason == "stop" and not r2.choices[0].message.tool_calls


def test_openai_streamed_tool_call(oai):
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],
        max_tokens=300,
        stream=True,
    )
    content, calls, finish = "", {}, None
    for c in stream:
        d = c.choices[0].delta
        assert "<longcat" not in (d.content or "")  # no tag fragment ever leaks as text
        content += d.content or ""
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert content == "Let me check."
    assert finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_openai_forced_tool_choice(oai):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            tools=[WEATHER_TOOL],
            tool_choice=choice,
        )
        assert r.choices[0].finish_reason == "tool_calls"
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_openai_reasoning_content(oai):
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"thinking": {"type": "enabled"}},
    )
    msg = r.choices[0].message
    assert msg.content == GREETING
    assert msg.model_extra["reasoning_content"] == THOUGHT
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"enable_thinking": True},
    )
    reasoning = content = ""
    for c in stream:
        if c.choices:
            reasoning += (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
            content += c.choices[0].delta.content or ""
    assert (reasoning, content) == (THOUGHT, GREETING)


def test_openai_completions(oai):
    r = oai.completions.create(model=MODEL, prompt="please count", max_tokens=200)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    chunks = list(oai.completions.create(model=MODEL, prompt="please count", max_tokens=5, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


# ---------------------------------------------------------------------------------------- Anthropic


def test_anthropic_message_and_usage(ant, scripted_server):
    r = ant.messages.create(
        model=MODEL, max_tokens=200, system="Be brief.", messages=[{"role": "user", "content": "hi"}]
    )
    assert r.type == "message" and r.role == "assistant" and r.model == MODEL
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == GREETING
    assert r.stop_reason == "end_turn" and r.stop_sequence is None
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert r.usage.input_tokens == _prompt_tokens(scripted_server, msgs)
    assert r.usage.output_tokens == len(scripted_server.state.tokenizer.encode(GREETING)) + 1
    count = ant.messages.count_tokens(
        model=MODEL, system="Be brief.", messages=[{"role": "user", "content": "hi"}]
    )
    assert count.input_tokens == r.usage.input_tokens


def test_anthropic_stream_event_sequence(ant):
    with ant.messages.stream(
        model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "please count"}]
    ) as stream:
        kinds = [ev.type for ev in stream if ev.type not in ("text",)]
        final = stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert final.content[0].text == COUNTING and final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


def test_anthropic_stop_sequence_and_max_tokens(ant):
    r = ant.messages.create(
        model=MODEL, max_tokens=100, stop_sequences=["four"], messages=[{"role": "user", "content": "count"}]
    )
    assert r.content[0].text == "one two three"
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "four"
    r = ant.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "count"}])
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 2


def test_anthropic_tool_use_round_trip(ant):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = ant.messages.create(model=MODEL, max_tokens=300, tools=[ANTHROPIC_TOOL], messages=messages)
    assert r.stop_reason == "tool_use"
    assert [b.type for b in r.content] == ["text", "tool_use"]
    use = r.content[1]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("toolu_")
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 22 degrees"}],
        },
    ]
    r2 = ant.messages.create(model=MODEL, max_tokens=300, tools=[ANTHROPIC_TOOL], messages=messages)
    assert r2.stop_reason == "end_turn" and r2.content[0].text == WEATHER_ANSWER


def test_anthropic_streamed_tool_use(ant):
    with ant.messages.stream(
        model=MODEL,
        max_tokens=300,
        tools=[ANTHROPIC_TOOL],
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["text", "tool_use"]
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)
    assert final.stop_reason == "tool_use"
    assert final.content[1].input == {"city": "Paris"} and final.content[0].text == "Let me check."


def test_anthropic_forced_tool(ant):
    r = ant.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=[ANTHROPIC_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "hi"}],
    )
    assert r.stop_reason == "tool_use" and r.content[-1].input == {"city": "Paris"}


def test_anthropic_thinking_blocks(ant):
    thinking = {"type": "enabled", "budget_tokens": 1024}
    r = ant.messages.create(
        model=MODEL, max_tokens=300, thinking=thinking, messages=[{"role": "user", "content": "hi"}]
    )
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking == THOUGHT and r.content[0].signature
    assert r.content[1].text == GREETING
    with ant.messages.stream(
        model=MODEL, max_tokens=300, thinking=thinking, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert "thinking_delta" in deltas and "signature_delta" in deltas and "text_delta" in deltas
    assert final.content[0].thinking == THOUGHT and final.content[0].signature == r.content[0].signature
    # a thinking block sent back in the history is accepted
    r2 = ant.messages.create(
        model=MODEL,
        max_tokens=300,
        thinking=thinking,
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [b.model_dump() for b in r.content]},
            {"role": "user", "content": "count"},
        ],
    )
    assert r2.content[-1].text == COUNTING


def test_anthropic_models_list(ant):
    assert [m.id for m in ant.models.list()] == ["longcat-test", "alias"]


def test_all_requests_finished(scripted_server):
    wait_idle(scripted_server.state)
