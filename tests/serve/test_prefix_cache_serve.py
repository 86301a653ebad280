"""Prefix caching through the real server: an agent-like session driven by the real SDKs reports cached
prompt tokens (OpenAI `prompt_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`), Anthropic
`cache_control` markers are accepted, and /metrics shows the cache."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from serve_helpers import wait_idle

SYSTEM = "You are a coding agent. " + " ".join(
    f"Rule {i}: keep file{i}.py tidy and tested." for i in range(70)
)


@pytest.fixture(scope="module")
def oai(real_server):
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ant(real_server):
    return anthropic.Anthropic(base_url=real_server.url, api_key="unused", max_retries=0, timeout=60)


def _model(real_server) -> str:
    return real_server.state.model_names[0]


def test_openai_session_reports_cached_tokens(oai, real_server):
    block = real_server.state.worker.engine.runner.cache.block_size
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "List the files."}]
    prompt_tokens, cached = [], []
    for turn in range(3):
        r = oai.chat.completions.create(model=_model(real_server), messages=messages, max_tokens=8)
        prompt_tokens.append(r.usage.prompt_tokens)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        reply = r.choices[0].message.content or ""
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": f"Now turn {turn}."},
        ]
    assert prompt_tokens[0] > 2 * block  # the system prompt spans several cache blocks
    assert cached[0] == 0
    for t in (1, 2):  # every full block of the previous turn's prompt is reused, never the whole prompt
        assert (prompt_tokens[t - 1] // block - 1) * block <= cached[t] < prompt_tokens[t], cached
        assert cached[t] % block == 0
    wait_idle(real_server.state)
    text = httpx.get(real_server.url + "/metrics").text
    (hits,) = [
        float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("longcat2_prefix_cache_hit_tokens")
    ]
    assert hits >= cached[1] + cached[2]
    snap = httpx.get(real_server.url + "/metrics", params={"format": "json"}).json()["prefix_cache"]
    assert snap["blocks"] > 0 and 0 < snap["hit_rate"] < 1


def test_anthropic_reports_cache_reads_and_accepts_cache_control(ant, real_server):
    system = [
        {"type": "text", "text": "Anthropic session. " + SYSTEM, "cache_control": {"type": "ephemeral"}}
    ]
    user = [{"type": "text", "text": "Read main.py.", "cache_control": {"type": "ephemeral", "ttl": "5m"}}]
    kw = dict(model=_model(real_server), max_tokens=8, system=system)
    first = ant.messages.create(messages=[{"role": "user", "content": user}], **kw)
    u1 = first.usage
    assert u1.cache_read_input_tokens == 0 and u1.cache_creation_input_tokens > 0
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": first.content[0].text if first.content else "ok"},
        {"role": "user", "content": "And utils.py?"},
    ]
    with ant.messages.stream(messages=messages, **kw) as stream:
        second = stream.get_final_message()
    u2 = second.usage
    assert u2.cache_read_input_tokens > 0
    # the API's split: input + cache creation + cache read = the whole prompt
    total2 = u2.input_tokens + u2.cache_creation_input_tokens + u2.cache_read_input_tokens
    count = ant.messages.count_tokens(model=_model(real_server), system=system, messages=messages)
    assert total2 == count.input_tokens
    assert u2.cache_read_input_tokens <= u1.input_tokens + u1.cache_creation_input_tokens
