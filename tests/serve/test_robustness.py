"""Bad requests, auth, unknown models, full queues, disconnects and engine failures: the right status codes
in each API's error shape, and the server still serving afterwards."""

from __future__ import annotations

import threading
import time

import anthropic
import httpx
import openai
import pytest
from serve_helpers import COUNTING, GREETING, ServerThread, scripted_state, wait_idle
from serve_helpers import anthropic_error as _anthropic_error
from serve_helpers import openai_error as _openai_error

from longcat2.serve import create_app

MODEL = "longcat-test"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
MSG = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


@pytest.fixture
def http(scripted_server) -> httpx.Client:
    with httpx.Client(base_url=scripted_server.url, timeout=30) as c:
        yield c


def _still_serving(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == GREETING
    r = http.post("/v1/messages", json=MSG)
    assert r.status_code == 200 and r.json()["content"][0]["text"] == GREETING


BAD_CHAT = [
    ("malformed json", b'{"model": "longcat-test", "messages": [', "Malformed JSON"),
    ("empty body", b"", "empty"),
    ("not an object", b"[1, 2]", "JSON object"),
    ("missing messages", {"model": MODEL}, "messages"),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("messages not a list", {**CHAT, "messages": "hi"}, "messages"),
    ("empty messages", {**CHAT, "messages": []}, "messages"),
    ("unknown role", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ("max_tokens as string", {**CHAT, "max_tokens": "10"}, "max_tokens"),
    ("negative max_tokens", {**CHAT, "max_tokens": -1}, "max_tokens"),
    ("temperature as string", {**CHAT, "temperature": "hot"}, "temperature"),
    ("temperature too high", {**CHAT, "temperature": 7}, "temperature"),
    ("stream as string", {**CHAT, "stream": "yes"}, "stream"),
    ("n=2", {**CHAT, "n": 2}, "n=1"),
    ("image part", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
    ("bad tool", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("bad tool_choice", {**CHAT, "tool_choice": "always"}, "tool_choice"),
    ("tool_choice without tools", {**CHAT, "tool_choice": "required"}, "tool_choice"),
    ("bad tool-call arguments", {**CHAT, "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "arguments"),
]  # fmt: skip


@pytest.mark.parametrize("name,body,needle", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_bad_openai_requests(http, name, body, needle):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    err = _openai_error(http.post("/v1/chat/completions", **kw), 400)
    assert err["type"] == "invalid_request_error"
    assert needle in err["message"], err["message"]


BAD_MESSAGES = [
    ("malformed json", b'{"model": ', "Malformed JSON"),
    ("missing max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ("unknown role", {**MSG, "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ("unknown block", {**MSG, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "video"),
    ("image block", {**MSG, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
    ("max_tokens as string", {**MSG, "max_tokens": "5"}, "max_tokens"),
    ("temperature above 1", {**MSG, "temperature": 1.5}, "temperature"),
    ("server tool", {**MSG, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
    ("tool_use in user turn", {**MSG, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, "tool_use"),
]  # fmt: skip


@pytest.mark.parametrize("name,body,needle", BAD_MESSAGES, ids=[b[0] for b in BAD_MESSAGES])
def test_bad_anthropic_requests(http, name, body, needle):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    err = _anthropic_error(http.post("/v1/messages", **kw), 400, "invalid_request_error")
    assert needle in err["message"], err["message"]


def test_huge_max_tokens_and_long_prompt(http, scripted_server):
    ctx = scripted_server.state.context_len
    # max_tokens beyond the context is clamped by default (the 400 of --strict-max-tokens: test_agent_clients)
    assert http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10**9}).status_code == 200
    assert http.post("/v1/messages", json={**MSG, "max_tokens": 10**9}).status_code == 200
    long = {"role": "user", "content": "lorem ipsum dolor " * 3000}
    n_prompt = http.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": [long]}).json()
    assert n_prompt["input_tokens"] > ctx
    err = _openai_error(http.post("/v1/chat/completions", json={**CHAT, "messages": [long]}), 400)
    assert err["code"] == "context_length_exceeded"
    assert str(ctx) in err["message"] and str(n_prompt["input_tokens"]) in err["message"]
    err = _anthropic_error(
        http.post("/v1/messages", json={**MSG, "messages": [long]}), 400, "invalid_request_error"
    )
    assert str(ctx) in err["message"]
    # a max_tokens within the context but beyond what is left is clamped, not refused
    r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": ctx})
    assert r.status_code == 200
    _still_serving(http)


def test_unknown_model_and_route(http):
    err = _openai_error(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404)
    assert err["code"] == "model_not_found" and "longcat-test" in err["message"]
    _anthropic_error(http.post("/v1/messages", json={**MSG, "model": "claude-9"}), 404, "not_found_error")
    _openai_error(http.get("/v1/models/gpt-9"), 404)
    _openai_error(http.get("/v1/nothing-here"), 404)
    _openai_error(http.get("/v1/chat/completions"), 405)
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "alias"}).json()["model"] == "alias"
    assert http.post("/anthropic/v1/messages", json=MSG).status_code == 200  # LongCat's own prefixes
    assert http.post("/openai/v1/chat/completions", json=CHAT).status_code == 200
    _still_serving(http)


def test_sdk_errors(scripted_server):
    oai = openai.OpenAI(base_url=scripted_server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n=1"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)
    ant = anthropic.Anthropic(base_url=scripted_server.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        ant.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "hi"}])


def test_health_and_metrics(http):
    h = http.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    http.post("/v1/chat/completions", json=CHAT)
    text = http.get("/metrics").text
    for name in (
        "longcat2_requests_total",
        "longcat2_generation_tokens_total",
        "longcat2_queue_depth",
        "longcat2_batch_size",
        "longcat2_tokens_per_second",
    ):
        assert name in text
    assert 'endpoint="/v1/chat/completions",status="200"' in text
    snap = http.get("/metrics", params={"format": "json"}).json()
    assert snap["generation_tokens"] > 0 and snap["engine_steps"] > 0


# ------------------------------------------------------------------------------------------- auth


@pytest.fixture(scope="module")
def auth_server(memorised_dir):
    state = scripted_state(memorised_dir, api_key="s3cret")
    with ServerThread(create_app(state), state) as srv:
        yield srv


def test_auth(auth_server):
    with httpx.Client(base_url=auth_server.url) as c:
        _openai_error(c.post("/v1/chat/completions", json=CHAT), 401)
        _openai_error(c.get("/v1/models"), 401)
        _openai_error(
            c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}), 401
        )
        _anthropic_error(c.post("/v1/messages", json=MSG), 401, "authentication_error")
        _anthropic_error(
            c.post("/v1/messages", json=MSG, headers={"x-api-key": "nope"}), 401, "authentication_error"
        )
        assert (
            c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer s3cret"}).status_code
            == 200
        )
        assert c.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "s3cret"}).status_code == 200
        assert c.post("/v1/messages", json=MSG, headers={"x-api-key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=auth_server.url + "/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=auth_server.url, api_key="bad", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert openai.OpenAI(base_url=auth_server.url + "/v1", api_key="s3cret").models.list().data
    r = anthropic.Anthropic(base_url=auth_server.url, api_key="s3cret").messages.create(
        model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    assert r.content[0].text == GREETING


# ----------------------------------------------------------------------------- queue and disconnects


@pytest.fixture
def small_server(memorised_dir):
    """One batch slot, one queue slot, slow steps (the real engine, slowed by its fault injector)."""
    state = scripted_state(memorised_dir, max_batch=1, max_queue=1, step_s=0.02)
    with ServerThread(create_app(state), state) as srv:
        yield srv


def _open_stream(url: str, path: str, body: dict, started: threading.Event, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=30) as c, c.stream("POST", path, json=body) as r:
        for _ in r.iter_lines():
            started.set()
            if stop.is_set():
                return  # closing the connection mid-stream


def test_queue_full_then_disconnect_frees_slots(small_server):
    state = small_server.state
    long_chat = {
        **CHAT,
        "messages": [{"role": "user", "content": "a long story"}],
        "max_tokens": 3000,
        "stream": True,
    }
    stop = threading.Event()
    s1, s2 = threading.Event(), threading.Event()
    t1 = threading.Thread(
        target=_open_stream, args=(small_server.url, "/v1/chat/completions", long_chat, s1, stop)
    )
    t2 = threading.Thread(target=_open_stream, args=(small_server.url, "/v1/messages", long_chat, s2, stop))
    t1.start()
    assert s1.wait(10)
    t2.start()  # queued behind the first: its headers arrive, its tokens wait
    deadline = time.monotonic() + 10
    while state.worker.in_flight < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.worker.load() == (1, 1)
    with httpx.Client(base_url=small_server.url, timeout=30) as c:
        err = _openai_error(c.post("/v1/chat/completions", json=CHAT), 429)
        assert err["code"] == "server_busy"
        _anthropic_error(c.post("/v1/messages", json=MSG), 429, "rate_limit_error")
        with pytest.raises(openai.RateLimitError):  # the SDKs map it to their retryable error
            openai.OpenAI(
                base_url=small_server.url + "/v1", api_key="x", max_retries=0
            ).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.RateLimitError):
            anthropic.Anthropic(base_url=small_server.url, api_key="x", max_retries=0).messages.create(
                model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        assert "longcat2_requests_rejected_total 4" in c.get("/metrics").text
        stop.set()  # both clients hang up mid-stream
        t1.join(10)
        t2.join(10)
        wait_idle(state)
        engine = state.worker.engine
        assert not engine.requests and not engine.scheduler.has_work()
        assert engine.runner.cache.num_held_blocks == 0  # every cache block is free or only cached
        r = c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "count"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == COUNTING
    wait_idle(state)


def test_non_streamed_disconnect_frees_slot(small_server):
    state = small_server.state
    body = {**MSG, "messages": [{"role": "user", "content": "a long story"}], "max_tokens": 3000}
    with httpx.Client(base_url=small_server.url, timeout=0.5) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/messages", json=body)  # the client gives up and closes the connection
    wait_idle(state)
    assert not state.worker.engine.requests and not state.worker.engine.scheduler.has_work()
    with httpx.Client(base_url=small_server.url, timeout=30) as c:
        assert c.post("/v1/messages", json=MSG).json()["content"][0]["text"] == GREETING


def test_engine_failure_is_reported_and_recovered(small_server):
    state = small_server.state
    with httpx.Client(base_url=small_server.url, timeout=30) as c:
        state.worker.engine.fail_next_step = True
        err = _openai_error(c.post("/v1/chat/completions", json=CHAT), 500)
        assert "injected failure" in err["message"]
        deadline = time.monotonic() + 10
        while state.worker.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)  # the failed request's abort event is drained by the next step
        state.worker.engine.fail_next_step = True
        lines = [ln for ln in c.post("/v1/messages", json={**MSG, "stream": True}).iter_lines() if ln]
        assert lines[-2:] == ["event: error", lines[-1]] and "api_error" in lines[-1]
        wait_idle(state)
        assert (
            c.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"] == GREETING
        )


def test_unexpected_error_is_a_500_in_each_shape(http, scripted_server, monkeypatch):
    async def boom(prompt) -> list[int]:
        raise RuntimeError("kaput")

    monkeypatch.setattr(scripted_server.state, "encode_chat", boom)
    err = _openai_error(http.post("/v1/chat/completions", json=CHAT), 500)
    assert "kaput" in err["message"] and err["type"] == "server_error"
    _anthropic_error(http.post("/v1/messages", json=MSG), 500, "api_error")
    monkeypatch.undo()
    _still_serving(http)
