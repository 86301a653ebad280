"""Unit tests without a server: request conversion for both APIs, response builders fed with `chat.parse`
output, the exact SSE sequences of both streaming protocols, stop strings, and the engine worker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from serve_helpers import COUNTING, LONG_STORY, TOOL_CALL_TEXT, WEATHER_TOOL, load_engine

from longcat2 import chat
from longcat2.engine import SamplingParams
from longcat2.serve import anthropic_api, openai_api
from longcat2.serve.core import ChatPrompt, Finished, build_chat_prompt
from longcat2.serve.protocol import APIError, ChatCompletionRequest, MessagesRequest
from longcat2.serve.worker import EngineWorker, QueueFull, ShuttingDown, StopMatcher

# ------------------------------------------------------------------------------------- conversion


def test_openai_request_to_prompt():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "weather in "}, {"type": "text", "text": "Paris?"}],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "tools": [WEATHER_TOOL],
        }
    )
    prompt = openai_api.chat_prompt(req)
    expected = chat.render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "content": "sunny"},
        ],
        [WEATHER_TOOL],
    )
    assert prompt.text == expected and prompt.prefix == ""
    assert "<longcat_tool_response>sunny</longcat_tool_response>" in prompt.text


@pytest.mark.parametrize(
    "extra,expected",
    [
        ({}, None),
        ({"thinking": {"type": "enabled"}}, True),
        ({"thinking": {"type": "disabled"}}, False),
        ({"thinking": True}, True),
        ({"enable_thinking": True}, True),
        ({"chat_template_kwargs": {"enable_thinking": False}}, False),
        ({"reasoning_effort": "high"}, True),
        ({"reasoning_effort": "none"}, False),
    ],
)
def test_openai_thinking_flag(extra, expected):
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    )
    assert openai_api.thinking_flag(req) is expected


def test_tool_choice_prefixes():
    msgs = [{"role": "user", "content": "hi"}]
    assert build_chat_prompt(msgs, [WEATHER_TOOL], None, "required").text.endswith(
        "<longcat_assistant><longcat_tool_call>"
    )
    named = build_chat_prompt(msgs, [WEATHER_TOOL], None, "named", "get_weather")
    assert (
        named.text.endswith("<longcat_tool_call>get_weather\n")
        and named.prefix == "<longcat_tool_call>get_weather\n"
    )
    none = build_chat_prompt(msgs, [WEATHER_TOOL], None, "none")
    assert "# Tools" not in none.text and none.calls_as_text
    with pytest.raises(APIError, match="not in tools"):
        build_chat_prompt(msgs, [WEATHER_TOOL], None, "named", "other")


def test_anthropic_request_to_messages():
    req = MessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 10,
            "system": [{"type": "text", "text": "You are helpful."}, {"type": "text", "text": "Be brief."}],
            "tools": [
                {
                    "name": "get_weather",
                    "description": "d",
                    "input_schema": WEATHER_TOOL["function"]["parameters"],
                }
            ],
            "messages": [
                {"role": "user", "content": "weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "need a tool", "signature": "s"},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [{"type": "text", "text": "sunny"}],
                        },
                        {"type": "tool_result", "tool_use_id": "t2", "content": "boom", "is_error": True},
                        {"type": "text", "text": "thanks"},
                    ],
                },
            ],
        }
    )
    msgs = anthropic_api.chat_messages(req)
    assert msgs == [
        {"role": "system", "content": "You are helpful.\n\nBe brief."},
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "need a tool",
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "t2", "content": "Error: boom"},
        {"role": "user", "content": "thanks"},
    ]
    tools = anthropic_api.chat_tools(req)
    assert tools[0]["function"]["parameters"] == WEATHER_TOOL["function"]["parameters"]
    text = anthropic_api.chat_prompt(req).text
    assert text.startswith("<longcat_system>You are helpful.\n\nBe brief.\n\n# Tools")
    assert TOOL_CALL_TEXT in text


# ---------------------------------------------------------------------------------------- builders

REPLY = (
    "<longcat_think>\nCheck the tool.\n</longcat_think>\nLet me check.\n" + TOOL_CALL_TEXT + "</longcat_s>"
)


def _ids():
    n = iter(range(100))
    return lambda: f"call_{next(n)}"


def _events(text: str, pieces: int = 1) -> list[Any]:
    """Parser events for `text` fed in chunks of `pieces` characters (1 = the worst case for tags)."""
    p = chat.StreamParser([WEATHER_TOOL], make_id=_ids())
    out = []
    for i in range(0, len(text), pieces):
        out += p.feed(text[i : i + pieces])
    return out + p.finish()


def test_openai_builder_from_parse():
    parsed = chat.parse(REPLY, [WEATHER_TOOL], make_id=_ids())
    events = _events(REPLY)
    fin = Finished("tool_calls", None, 10, 20)
    body = openai_api.chat_completion_response(events, fin, "chatcmpl-1", "m")
    msg = body["choices"][0]["message"]
    assert msg == {**parsed.to_message(), "content": "Let me check."}
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "total_tokens": 30,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_anthropic_builder_from_parse():
    body = anthropic_api.message_response(_events(REPLY), Finished("tool_calls", None, 10, 20), "msg_1", "m")
    assert [b["type"] for b in body["content"]] == ["thinking", "text", "tool_use"]
    assert body["content"][0]["thinking"] == "Check the tool." and body["content"][0]["signature"]
    assert body["content"][2] == {
        "type": "tool_use",
        "id": "call_0",
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    assert body["stop_reason"] == "tool_use" and body["usage"]["input_tokens"] == 10
    fin = Finished("stop", "END", 1, 2)
    assert anthropic_api.message_response([], fin, "m", "m")["stop_reason"] == "stop_sequence"
    assert anthropic_api.stop_reason(Finished("length", None, 1, 2)) == "max_tokens"
    assert anthropic_api.stop_reason(Finished("stop", None, 1, 2)) == "end_turn"


async def _agen(items):
    for x in items:
        yield x


def _collect(agen) -> list[bytes]:
    async def run():
        return [b async for b in agen]

    return asyncio.run(run())


def _sse(raw: list[bytes]) -> list[tuple[str | None, Any]]:
    out = []
    for block in b"".join(raw).decode().split("\n\n"):
        if not block:
            continue
        event, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
                data = data if data == "[DONE]" else json.loads(data)
        out.append((event, data))
    return out


@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_openai_stream_sequence(pieces):
    events = _events(REPLY, pieces) + [Finished("tool_calls", None, 5, 9)]
    out = _sse(_collect(openai_api.chat_completion_stream(_agen(events), "id", "m", include_usage=True)))
    datas = [d for _, d in out]
    assert datas[-1] == "[DONE]"
    assert datas[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [d["choices"][0]["delta"] for d in datas[1:-3]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Check the tool."
    assert "".join(d.get("content", "") for d in deltas) == "Let me check."
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls == [
        [
            {
                "index": 0,
                "id": "call_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ]
    ]
    assert datas[-3]["choices"][0]["finish_reason"] == "tool_calls"
    assert datas[-2]["choices"] == [] and datas[-2]["usage"]["total_tokens"] == 14
    assert all(d["usage"] is None for d in datas[:-2])
    assert not any("<longcat" in json.dumps(d) for d in datas[:-1])


@pytest.mark.parametrize("pieces", [1, 1000])
def test_anthropic_stream_sequence(pieces):
    events = _events(REPLY, pieces) + [Finished("tool_calls", None, 5, 9)]
    out = _sse(_collect(anthropic_api.message_stream(_agen(events), "msg_1", "m", 5)))
    kinds = [e for e, _ in out]
    for e, d in out:
        assert d["type"] == e
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    starts = [d["content_block"]["type"] for e, d in out if e == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    # every block is opened, gets deltas with its own index, and is closed before the next opens
    open_index = None
    for e, d in out:
        if e == "content_block_start":
            assert open_index is None
            open_index = d["index"]
        elif e == "content_block_delta":
            assert d["index"] == open_index
        elif e == "content_block_stop":
            assert d["index"] == open_index
            open_index = None
    assert open_index is None
    deltas = [d["delta"] for e, d in out if e == "content_block_delta"]
    assert [x["type"] for x in deltas if x["type"] in ("signature_delta", "input_json_delta")] == [
        "signature_delta",
        "input_json_delta",
    ]
    assert json.loads(next(x["partial_json"] for x in deltas if x["type"] == "input_json_delta")) == {
        "city": "Paris"
    }
    md = out[-2][1]
    assert md["delta"] == {"stop_reason": "tool_use", "stop_sequence": None} and md["usage"] == {
        "input_tokens": 5,
        "output_tokens": 9,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    assert out[0][1]["message"]["usage"]["input_tokens"] == 5


def test_stream_errors():
    out = _sse(
        _collect(
            openai_api.chat_completion_stream(_agen([Finished("error", None, 1, 0, "boom")]), "i", "m", False)
        )
    )
    assert out[-2][1]["error"]["message"] == "boom" and out[-1][1] == "[DONE]"
    out = _sse(_collect(anthropic_api.message_stream(_agen([Finished("abort", None, 1, 0)]), "i", "m", 1)))
    assert out[-1][0] == "error" and out[-1][1]["error"]["type"] == "overloaded_error"


# -------------------------------------------------------------------------------------- stop strings


def test_stop_matcher():
    m = StopMatcher(["END", "xyz"])
    assert m.push("hello E") == "hello "  # "E" may start "END"
    assert m.push("N") == ""
    assert m.push("x") == "EN"  # "x" may start "xyz"
    assert m.push("yz!") == "" and m.matched == "xyz"
    m = StopMatcher(["END"])
    out = m.push("ab") + m.push("cE") + m.push("Nd") + m.flush()
    assert out == "abcENd" and m.matched is None
    m = StopMatcher(["END"])
    assert m.push("abE") + m.push("NDtail") == "ab" and m.matched == "END"
    assert m.push("more") == "" and m.flush() == ""
    m = StopMatcher(["b", "abc"])
    assert m.push("xabc") == "x" and m.matched == "abc"  # the earliest match wins
    assert StopMatcher([]).push("anything") == "anything"


# ------------------------------------------------------------------------------------------- worker


def _worker(model_dir, **kw):
    """The worker around the real engine and the memorised model (see `serve_helpers.memorise`)."""
    tok, engine = load_engine(model_dir, max_batch=kw.get("max_batch", 2))
    worker = EngineWorker(engine, tok, max_batch=kw.get("max_batch", 2), max_queue=kw.get("max_queue", 2))
    return worker, engine, tok


def _prompt(tok, text: str) -> list[int]:
    return tok.encode(chat.render([{"role": "user", "content": text}]))


def test_worker_streams_and_stops(memorised_dir):
    worker, _, tok = _worker(memorised_dir)
    count = _prompt(tok, "count")

    async def run():
        worker.start()
        try:
            h = worker.submit(count, SamplingParams(max_new_tokens=100, stop=["four"]), ["four"])
            c = await h.collect()
            assert (c.text.strip(), c.finish_reason, c.stop_reason) == ("one two three", "stop", "four")
            h = worker.submit(count, SamplingParams(max_new_tokens=3))
            c = await h.collect()
            assert (c.text, c.finish_reason, c.completion_tokens) == (
                tok.decode(tok.encode(COUNTING)[:3]),
                "length",
                3,
            )
            h = worker.submit(count, SamplingParams(max_new_tokens=100))
            c = await h.collect()
            assert (c.text, c.finish_reason, c.stop_reason) == (
                COUNTING,
                "stop",
                tok.eos_id,
            )  # EOS not decoded
            assert c.completion_tokens == len(tok.encode(COUNTING)) + 1
        finally:
            worker.shutdown(1)

    asyncio.run(run())
    assert not worker.alive


def test_worker_queue_cancel_and_shutdown(memorised_dir):
    worker, engine, tok = _worker(memorised_dir, max_batch=1, max_queue=1)
    story = _prompt(tok, "a long story")
    endless = SamplingParams(max_new_tokens=3000, ignore_eos=True)

    async def run():
        worker.start()
        a = worker.submit(story, endless)
        b = worker.submit(story, endless)
        with pytest.raises(QueueFull):
            worker.submit(story, SamplingParams(max_new_tokens=5))
        first = await a._req.queue.get()
        assert first.text and LONG_STORY.startswith(first.text)
        b.cancel()  # cancelled while waiting for a slot
        a.cancel()  # cancelled while running
        for _ in range(500):
            if worker.in_flight == 0 and not engine.requests:
                break
            await asyncio.sleep(0.01)
        assert worker.in_flight == 0 and not engine.requests and not engine.scheduler.has_work()
        c = worker.submit(story, endless)
        await c._req.queue.get()
        await asyncio.to_thread(worker.shutdown, 0.05)  # gives up waiting and aborts it
        last = None
        async for chunk in c:
            last = chunk
        assert last.finish_reason == "abort"
        with pytest.raises(ShuttingDown):
            worker.submit(story, SamplingParams(max_new_tokens=5))

    asyncio.run(run())


def test_chat_prompt_calls_as_text():
    from longcat2.serve.core import chat_events

    class H:
        prompt_tokens = 3
        cached_tokens = cache_written_tokens = 0

        def __init__(self, chunks):
            self.chunks = chunks
            self.cancelled = False

        def __aiter__(self):
            return _agen(self.chunks)

        def cancel(self):
            self.cancelled = True

    from longcat2.serve.worker import Chunk

    h = H([Chunk(TOOL_CALL_TEXT, [1], 1), Chunk("", [2], 2, "stop", 2)])

    async def run():
        return [e async for e in chat_events(h, ChatPrompt("p", calls_as_text=True), _ids())]

    out = asyncio.run(run())
    assert isinstance(out[0], chat.TextDelta) and "get_weather" in out[0].text
    assert out[-1] == Finished("stop", None, 3, 2)


def test_default_temperature_from_generation_config(tmp_path):
    from longcat2.serve.app import ServeError, model_default_temperature

    assert model_default_temperature(tmp_path) is None  # no file: the APIs' default applies
    f = tmp_path / "generation_config.json"
    for content, expected in (({"do_sample": False, "temperature": 0.7}, 0.0), ({"temperature": 0.6}, 0.6),
                              ({"top_p": 0.9}, None)):  # fmt: skip
        f.write_text(json.dumps(content))
        assert model_default_temperature(tmp_path) == expected
    f.write_text(json.dumps({"temperature": "hot"}))
    with pytest.raises(ServeError, match="generation_config.json: temperature"):
        model_default_temperature(tmp_path)
    f.write_text("{not json")
    with pytest.raises(ServeError, match="cannot read"):
        model_default_temperature(tmp_path)
