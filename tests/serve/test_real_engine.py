"""The server on the real engine with a tiny random LongCat model: SDK calls, usage, streaming equals
non-streaming under greedy decoding, batched streams equal to streams alone, disconnects freeing engine blocks."""

from __future__ import annotations

import asyncio
import threading
import time

import anthropic
import httpx
import openai
from serve_helpers import wait_idle

from longcat2 import chat


def _model(srv) -> str:
    return srv.state.model_names[0]


def test_real_openai_chat_stream_matches_non_stream(real_server):
    oai = openai.OpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "def add(a, b):"}]
    r = oai.chat.completions.create(model=_model(real_server), messages=messages, max_tokens=12)
    tok = real_server.state.tokenizer
    assert r.usage.prompt_tokens == len(tok.encode(chat.render(messages)))
    assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"
    chunks = list(
        oai.chat.completions.create(
            model=_model(real_server),
            messages=messages,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (r.choices[0].message.content or "")  # greedy: same text both ways
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_real_anthropic_and_completions(real_server):
    ant = anthropic.Anthropic(base_url=real_server.url, api_key="x", max_retries=0, timeout=60)
    r = ant.messages.create(
        model=_model(real_server), max_tokens=8, messages=[{"role": "user", "content": "hi"}]
    )
    assert r.usage.output_tokens <= 8 and r.stop_reason in ("max_tokens", "end_turn", "tool_use")
    oai = openai.OpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    c = oai.completions.create(model=_model(real_server), prompt="import os\n", max_tokens=6)
    assert c.usage.completion_tokens == 6 and c.choices[0].finish_reason == "length"
    ids = real_server.state.tokenizer.encode("import os\n")
    c2 = oai.completions.create(model=_model(real_server), prompt=ids, max_tokens=6)
    assert c2.choices[0].text == c.choices[0].text
    # sampling with a seed is reproducible
    kw = dict(model=_model(real_server), prompt="x = ", max_tokens=8, temperature=1.0, seed=7)
    assert oai.completions.create(**kw).choices[0].text == oai.completions.create(**kw).choices[0].text


async def _stream_text(client: openai.AsyncOpenAI, model: str, n: int, i: int) -> tuple[str, int]:
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"request {i}"}],
        max_tokens=n,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage = [], 0
    async for c in stream:
        if c.choices:
            text.append(c.choices[0].delta.content or "")
        if c.usage:
            usage = c.usage.completion_tokens
    return "".join(text), usage


def test_real_concurrent_streams_are_batched(real_server):
    """Several streams at once produce exactly what each produces alone (greedy), and share engine steps.
    (The speed-up this buys is measured by bench/serve_load.py, not asserted here.)"""
    n_streams, n_tokens = 6, 40
    model = _model(real_server)
    metrics = real_server.state.metrics

    async def run(concurrent: bool) -> tuple[int, list[tuple[str, int]]]:
        client = openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        steps = metrics.snapshot()["engine_steps"]
        if concurrent:
            got = await asyncio.gather(*(_stream_text(client, model, n_tokens, i) for i in range(n_streams)))
        else:
            got = [await _stream_text(client, model, n_tokens, i) for i in range(n_streams)]
        await client.close()
        wait_idle(real_server.state)
        return metrics.snapshot()["engine_steps"] - steps, list(got)

    seq_steps, alone = asyncio.run(run(False))
    par_steps, together = asyncio.run(run(True))
    assert [n for _, n in alone] == [n_tokens] * n_streams  # ignore_eos: every stream runs to max_tokens
    assert len({text for text, _ in alone}) > 1  # distinct prompts, distinct outputs: a mix-up would show
    assert together == alone  # greedy: every stream produced the same text batched as alone
    assert 0 < par_steps < seq_steps, (par_steps, seq_steps)  # streams shared engine steps


def test_real_disconnect_frees_engine_blocks(real_server):
    state = real_server.state
    engine = state.worker.engine
    body = {
        "model": _model(real_server),
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 3000,
        "stream": True,
        "ignore_eos": True,
    }
    got = threading.Event()
    with (
        httpx.Client(base_url=real_server.url, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        for line in r.iter_lines():
            if '"content"' in line and '""' not in line:
                got.set()
                break
    assert got.is_set()
    wait_idle(state)
    deadline = time.monotonic() + 5
    while engine.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.requests and not engine.scheduler.active
    assert engine.runner.cache.num_held_blocks == 0  # every cache block is free or only cached
    oai = openai.OpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    r2 = oai.chat.completions.create(
        model=_model(real_server), messages=[{"role": "user", "content": "x"}], max_tokens=3
    )
    assert r2.usage.completion_tokens <= 3
