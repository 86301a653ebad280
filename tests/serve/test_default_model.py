"""The embedded default model through the real server with the unmodified SDKs: the README's tool-call round
trip ("What is the weather in Paris?" → get_weather({"city": "Paris"}) → tool result → answer), and, for a
model that claims to copy unseen entities (issue 18), the same round trip with a city and values it never saw in
training and a two-city parallel call. Skipped until `scripts/build_default_model.sh` has installed the model
into the package; the unseen-entity tests until the installed model's own held-out evals (its eval.json, made
by the build) reach the issue's bar, tool_call and tool_answer >= 0.90 on held-out entity spaces: a model that
measures 0.30 is known to miss most unseen names, and the test would only restate that number."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from serve_helpers import ServerThread, wait_idle

from longcat2.serve import ServerConfig, create_app, load_state
from longcat2.serve.core import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no embedded default model (build it first)"
)


UNSEEN_BAR = 0.90  # issue 18's held-out target for tool_call and tool_answer


def _held_out_copying() -> tuple[float, float]:
    """(tool_call, tool_answer) held-out accuracy from the installed model's eval.json (recipe v2 evals: held-out
    entity spaces); (0, 0) for a model without them (recipe v1's evals use its training tables)."""
    try:
        evals = json.loads((DEFAULT_MODEL_DIR / "eval.json").read_text())
    except (OSError, ValueError):
        return 0.0, 0.0
    if evals.get("recipe_version_of_evals", 1) < 2:
        return 0.0, 0.0
    acc = evals.get("accuracy", {})
    return float(acc.get("tool_call", 0.0)), float(acc.get("tool_answer", 0.0))


HELD_OUT_COPYING = _held_out_copying()
needs_copying = pytest.mark.skipif(
    min(HELD_OUT_COPYING) < UNSEEN_BAR,
    reason="the installed default model's held-out evals (tool_call, tool_answer) = "
    f"{HELD_OUT_COPYING} are below {UNSEEN_BAR}: it is known to miss unseen entities (issue 18, "
    "docs/default-model.md); runs once a build that reaches the bar is installed",
)
# From the held-out spaces of scripts/make_sft_data_v2.py (syllables with coda "r", a held-out number class
# and weather conditions): no v2 training example has these names or values.
UNSEEN = [("Korbrer", -12, "hazy"), ("Sterstorbrar", 37, "drizzly")]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Paris"}},
            "required": ["city"],
        },
    },
}
ANTHROPIC_WEATHER = {
    "name": "get_weather",
    "description": WEATHER["function"]["description"],
    "input_schema": WEATHER["function"]["parameters"],
}


@pytest.fixture(scope="module")
def default_server():
    state = load_state(ServerConfig())  # greedy: the model's generation_config.json says do_sample false
    assert state.config.default_temperature == 0.0
    with ServerThread(create_app(state), state) as srv:
        yield srv


def test_openai_tool_round_trip(default_server):
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [DEFAULT_MODEL_NAME]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=messages, tools=[WEATHER], max_tokens=64
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls", msg
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
    messages += [
        msg.model_dump(exclude_none=True),
        {
            "role": "tool",
            "tool_call_id": msg.tool_calls[0].id,
            "content": json.dumps(
                {"city": "Paris", "temperature": 21, "unit": "celsius", "condition": "sunny"}
            ),
        },
    ]
    r2 = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=messages, tools=[WEATHER], max_tokens=64
    )
    assert r2.choices[0].finish_reason == "stop" and not r2.choices[0].message.tool_calls
    assert "21" in r2.choices[0].message.content
    # the same call, streamed
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=messages[:1], tools=[WEATHER], max_tokens=64, stream=True
    )
    args = "".join(
        tc.function.arguments or "" for c in stream if c.choices for tc in c.choices[0].delta.tool_calls or []
    )
    assert json.loads(args) == {"city": "Paris"}


def test_anthropic_tool_round_trip(default_server):
    client = anthropic.Anthropic(base_url=default_server.url, api_key="x", max_retries=0, timeout=120)
    tool = ANTHROPIC_WEATHER
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.messages.create(model=DEFAULT_MODEL_NAME, max_tokens=64, tools=[tool], messages=messages)
    assert r.stop_reason == "tool_use", r.content
    use = next(b for b in r.content if b.type == "tool_use")
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": '{"temperature": 21}'}],
        },
    ]
    r2 = client.messages.create(model=DEFAULT_MODEL_NAME, max_tokens=64, tools=[tool], messages=messages)
    assert r2.stop_reason == "end_turn" and r2.content and r2.content[0].type == "text"
    wait_idle(default_server.state)


def _weather_result(city: str, temperature: int, condition: str) -> str:
    return json.dumps({"city": city, "temperature": temperature, "unit": "celsius", "condition": condition})


@needs_copying
def test_openai_unseen_entity_round_trip(default_server):
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    for city, temperature, condition in UNSEEN:
        messages = [{"role": "user", "content": f"What is the weather in {city}?"}]
        r = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, messages=messages, tools=[WEATHER], max_tokens=64
        )
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls", msg
        assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
            ("get_weather", {"city": city})
        ]
        messages += [
            msg.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": msg.tool_calls[0].id,
             "content": _weather_result(city, temperature, condition)},
        ]  # fmt: skip
        r2 = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, messages=messages, tools=[WEATHER], max_tokens=64
        )
        reply = r2.choices[0].message
        assert r2.choices[0].finish_reason == "stop" and not reply.tool_calls, reply
        assert city in reply.content and str(temperature) in reply.content and condition in reply.content
    # two cities, one of them unseen: two parallel calls in the order asked
    city = UNSEEN[0][0]
    r = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME,
        messages=[{"role": "user", "content": f"What is the weather in Paris and {city}?"}],
        tools=[WEATHER],
        max_tokens=96,
    )
    calls = [
        (c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls or []
    ]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": city})]


@needs_copying
def test_anthropic_unseen_entity_round_trip(default_server):
    client = anthropic.Anthropic(base_url=default_server.url, api_key="x", max_retries=0, timeout=120)
    tool = ANTHROPIC_WEATHER
    city, temperature, condition = UNSEEN[1]
    messages = [{"role": "user", "content": f"What is the weather in {city}?"}]
    r = client.messages.create(model=DEFAULT_MODEL_NAME, max_tokens=64, tools=[tool], messages=messages)
    assert r.stop_reason == "tool_use", r.content
    use = next(b for b in r.content if b.type == "tool_use")
    assert use.name == "get_weather" and use.input == {"city": city}
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": _weather_result(city, temperature, condition)}]},
    ]  # fmt: skip
    r2 = client.messages.create(model=DEFAULT_MODEL_NAME, max_tokens=64, tools=[tool], messages=messages)
    assert r2.stop_reason == "end_turn" and r2.content and r2.content[0].type == "text", r2.content
    text = r2.content[0].text
    assert city in text and str(temperature) in text and condition in text
    wait_idle(default_server.state)
