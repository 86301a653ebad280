"""The tool-call contract with the grammar on: 200 varied chat requests (tools offered or not, every
`tool_choice` form, parallel calls on and off, nested / enum / array / number schemas, JSON response formats,
greedy and sampled) to the embedded default model through the real server and the `openai` SDK. Every
returned call names an offered tool and its arguments validate against that tool's schema (`jsonschema`);
no content carries markup tags; `required` and a named tool always yield a call (of that tool), `none` and
no tools never do; `parallel_tool_calls: false` yields at most one; JSON formats parse and validate."""

from __future__ import annotations

import asyncio
import json
import random

import openai
import pytest
from serve_helpers import ServerThread, wait_idle

from longcat2.serve import ServerConfig, create_app, load_state
from longcat2.serve.core import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME

jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no embedded default model (build it first)"
)


def _tool(name: str, properties: dict, required: list[str], defs: dict | None = None) -> dict:
    params = {"type": "object", "properties": properties, "required": required}
    if defs:
        params["$defs"] = defs
    return {
        "type": "function",
        "function": {"name": name, "description": f"The {name} tool.", "parameters": params},
    }


TOOLS = [
    _tool(
        "get_weather",
        {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        ["city"],
    ),
    _tool(
        "search_docs",
        {
            "query": {"type": "string", "description": "What to look for"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 20},
            "filters": {
                "type": "object",
                "properties": {
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                    "min_score": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["tags"],
                "additionalProperties": False,
            },
        },
        ["query", "filters"],
    ),
    _tool(
        "set_alarm",
        {
            "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
            "days": {"type": "array", "items": {"$ref": "#/$defs/day"}, "minItems": 1, "maxItems": 2},
            "loud": {"type": "boolean"},
        },
        ["time", "days"],
        {"day": {"type": "string", "enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}},
    ),
    _tool(
        "calculator",
        {"expression": {"type": "string"}, "precision": {"type": ["integer", "null"]}},
        ["expression"],
    ),
    _tool("list_files", {}, []),
    _tool(
        "run_shell", {"command": {"type": "array", "items": {"type": "string"}, "maxItems": 4}}, ["command"]
    ),
]
PROMPTS = [
    "What is the weather in Paris?",
    "Find the docs about json decoding.",
    "Wake me up at 07:30 on monday.",
    "What is 12 * 7?",
    "Which files are in this folder?",
    "Run the tests.",
    "hi",
    "Write a haiku about the sea.",
]
FORMATS = [
    {"type": "json_object"},
    {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "schema": {
                "type": "object",
                "properties": {
                    "answer": {"type": "string", "maxLength": 40},
                    "confidence": {"type": "number"},
                },
                "required": ["answer", "confidence"],
                "additionalProperties": False,
            },
        },
    },
]
N_REQUESTS = 200


def _requests(rng: random.Random) -> list[dict]:
    out = []
    for i in range(N_REQUESTS):
        kw: dict = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": 128}
        if i % 10 == 9:
            kw["response_format"] = rng.choice(FORMATS)
        elif i % 10 != 8:  # 1 in 10 offers no tools
            tools = rng.sample(TOOLS, rng.randint(1, 4))
            kw["tools"] = tools
            choice = rng.choice(["absent", "auto", "none", "required", "named"])
            if choice == "named":
                kw["tool_choice"] = {
                    "type": "function",
                    "function": {"name": rng.choice(tools)["function"]["name"]},
                }
            elif choice != "absent":
                kw["tool_choice"] = choice
            if rng.random() < 0.5:
                kw["parallel_tool_calls"] = rng.random() < 0.5
        if rng.random() < 0.5:
            kw["temperature"], kw["seed"] = 1.0, i
        out.append(kw)
    return out


@pytest.fixture(scope="module")
def default_server():
    state = load_state(ServerConfig(max_batch=16, max_queue=N_REQUESTS))
    with ServerThread(create_app(state), state) as srv:
        yield srv


def test_tool_call_contract(default_server):
    requests = _requests(random.Random(15))
    client = openai.AsyncOpenAI(base_url=default_server.url + "/v1", api_key="x", max_retries=0, timeout=600)

    async def run() -> list:
        return await asyncio.gather(
            *[client.chat.completions.create(model=DEFAULT_MODEL_NAME, **kw) for kw in requests]
        )

    replies = asyncio.run(run())
    stats = dict.fromkeys(["calls", "with_calls", "required_or_named", "required_cut_off", "json"], 0)
    for kw, r in zip(requests, replies):
        msg, finish = r.choices[0].message, r.choices[0].finish_reason
        offered = {t["function"]["name"]: t["function"]["parameters"] for t in kw.get("tools", [])}
        choice = kw.get("tool_choice", "auto")
        calls = msg.tool_calls or []
        where = f"{kw} -> {msg}"
        assert "longcat_" not in (msg.content or ""), where
        for c in calls:
            assert c.function.name in offered, where
            jsonschema.validate(json.loads(c.function.arguments), offered[c.function.name])
        if not offered or choice == "none":
            assert not calls, where
        if choice == "required" or isinstance(choice, dict):
            stats["required_or_named"] += 1
            # the budget ran out inside a call: the complete calls before it (validated above) are kept, the
            # cut-off one is plain text, no half call
            if finish == "length":
                stats["required_cut_off"] += 1
            else:
                assert calls and finish == "tool_calls" and not msg.content, where
                if isinstance(choice, dict):
                    assert [c.function.name for c in calls] == [choice["function"]["name"]], where
        if kw.get("parallel_tool_calls") is False:
            assert len(calls) <= 1, where
        if "response_format" in kw and finish == "stop":
            stats["json"] += 1
            doc = json.loads(msg.content)
            fmt = kw["response_format"]
            schema = fmt["json_schema"]["schema"] if fmt["type"] == "json_schema" else {"type": "object"}
            jsonschema.validate(doc, schema)
        stats["calls"] += len(calls)
        stats["with_calls"] += bool(calls)
    print(f"\ncontract: {len(replies)} requests, {stats}")
    # the mix really exercises calls: 68 forced; replies with calls 48 with the recipe-v4 default model (28
    # forced calls cut off at max_tokens), a few more with v2
    assert stats["with_calls"] >= 40 and stats["required_or_named"] >= 50
    # most forced calls finish inside the budget (the recipe-v2 default model ran on inside some string
    # arguments of tools it never trained on: 26 of 68 cut off at max_tokens, measured; v1: under a quarter)
    assert stats["required_cut_off"] <= stats["required_or_named"] // 2
    wait_idle(default_server.state)
