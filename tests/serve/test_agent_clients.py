"""What agent clients send, through the unmodified SDKs against the real server and engine (the memorised tiny
model): Anthropic `system` turns inside `messages`, `thinking: adaptive`, `output_config` (structured output)
and `context_management`, their own model names on a single-model server, max_tokens far beyond the context,
unknown fields, `HEAD /`; and the strict flags that restore the old answers."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
from serve_helpers import GREETING, ServerThread, scripted_state

from longcat2.serve import create_app

MODEL = "longcat-test"
ANSWER = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def single_server(memorised_dir):
    """A default server with one served name (as `longcat2 serve` runs)."""
    state = scripted_state(memorised_dir)
    state.model_names = [MODEL]
    with ServerThread(create_app(state), state) as srv:
        yield srv


@pytest.fixture(scope="module")
def strict_server(memorised_dir):
    state = scripted_state(memorised_dir, clamp_max_tokens=False, any_model=False)
    state.model_names = [MODEL]
    with ServerThread(create_app(state), state) as srv:
        yield srv


def _clients(srv) -> tuple[openai.OpenAI, anthropic.Anthropic]:
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    ant = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0, timeout=60)
    return oai, ant


def test_anthropic_agent_requests(single_server):
    _, ant = _clients(single_server)
    r = ant.messages.create(
        model="claude-sonnet-4-5",  # Claude Code's own id: answered by the served model
        max_tokens=64000,  # beyond the context: clamped
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": "hi"},
        ],
        extra_body={"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}, "unknown": 1},
    )
    assert r.model == MODEL and r.content[0].text == GREETING and r.stop_reason == "end_turn"
    r = ant.messages.create(
        model=MODEL,
        max_tokens=200,
        thinking={"type": "adaptive"},
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"output_config": {"effort": "low"}},
    )
    assert r.stop_reason == "end_turn"


def test_anthropic_structured_output(single_server):
    _, ant = _clients(single_server)
    r = ant.messages.create(
        model=MODEL,
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": ANSWER}}},
    )
    assert json.loads(r.content[0].text)["answer"] in ("yes", "no") and r.stop_reason == "end_turn"


def test_openai_agent_requests(single_server):
    oai, _ = _clients(single_server)
    r = oai.chat.completions.create(
        model="gpt-5-codex",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=10**6,
        extra_body={"store": True, "prompt_cache_key": "abc", "verbosity": "low"},
    )
    assert r.model == MODEL and r.choices[0].message.content == GREETING
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}},
    )
    assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no")
    assert httpx.head(single_server.url + "/").status_code == 200
    assert httpx.get(single_server.url + "/").json()["models"] == [MODEL]


def test_strict_flags(strict_server):
    oai, ant = _clients(strict_server)
    with pytest.raises(openai.NotFoundError, match="gpt-5-codex"):
        oai.chat.completions.create(model="gpt-5-codex", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6
        )
    with pytest.raises(anthropic.BadRequestError, match=str(strict_server.state.context_len)):
        ant.messages.create(model=MODEL, max_tokens=10**6, messages=[{"role": "user", "content": "hi"}])
