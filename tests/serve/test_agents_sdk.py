"""The unmodified openai-agents SDK (PyPI `openai-agents`) runs a tool-using agent against the real server and
engine, with both of its model classes: `OpenAIResponsesModel` (`POST /v1/responses`, its default) and
`OpenAIChatCompletionsModel`. The memorised tiny model calls get_weather, the SDK runs the tool and sends
its result back, and the model answers."""

from __future__ import annotations

import json

import openai
import pytest
from serve_helpers import WEATHER_ANSWER, WEATHER_TOOL, wait_idle

agents = pytest.importorskip("agents")
MODEL = "longcat-test"
QUESTION = "What is the weather in Paris?"


def _agent(model) -> tuple[object, list]:
    calls: list = []

    async def get_weather(ctx, arguments: str) -> str:
        calls.append(json.loads(arguments))
        return "sunny, 22 degrees"

    fn = WEATHER_TOOL["function"]
    tool = agents.FunctionTool(
        name=fn["name"],
        description=fn["description"],
        params_json_schema=fn["parameters"],
        on_invoke_tool=get_weather,
        strict_json_schema=False,
    )
    return agents.Agent(name="weather", tools=[tool], model=model), calls


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_agent_tool_round_trip(scripted_server, api):
    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=scripted_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    if api == "responses":
        model = agents.OpenAIResponsesModel(model=MODEL, openai_client=client)
    else:
        model = agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=client)
    agent, calls = _agent(model)
    result = agents.Runner.run_sync(agent, QUESTION, max_turns=4)
    assert calls == [{"city": "Paris"}]
    assert result.final_output == WEATHER_ANSWER
    wait_idle(scripted_server.state)
