"""The access log: one line per request with status, seconds and tokens in/out equal to the usage the real
`openai` / `anthropic` SDKs receive; `--no-access-log` turns it off; the real `longcat2 serve` prints it."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time

import anthropic
import httpx
import openai
import pytest
from serve_helpers import ServerThread, free_port, scripted_state, wait_healthy, wait_idle

from longcat2.serve import create_app

LINE = re.compile(
    r'^127\.0\.0\.1:\d+ "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/1\.1" (?P<status>\d{3}) (?P<seconds>\d+\.\d{3})s'
    r"(?: (?P<tin>\d+) in / (?P<tout>\d+) out tokens)?$"
)


def _lines(caplog: pytest.LogCaptureFixture) -> list[re.Match]:
    found = [r.getMessage() for r in caplog.records if r.name == "longcat2.serve.access"]
    matches = [LINE.match(m) for m in found]
    assert all(matches), found
    return matches  # type: ignore[return-value]


def _wait_for_lines(caplog: pytest.LogCaptureFixture, n: int) -> list[re.Match]:
    deadline = time.monotonic() + 10  # a line is written once the response is sent, after the client has it
    while len(_lines(caplog)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return _lines(caplog)


def test_one_line_per_request_with_the_usage_clients_see(memorised_dir, caplog):
    caplog.set_level(logging.INFO, logger="longcat2.serve.access")
    state = scripted_state(memorised_dir)
    with ServerThread(create_app(state), state) as srv:
        oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "hi"}]
        done = oa.chat.completions.create(
            model="longcat-test", messages=msgs, max_tokens=5, extra_body={"ignore_eos": True}
        )
        stream = oa.chat.completions.create(model="longcat-test", messages=msgs, max_tokens=7, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})  # fmt: skip
        streamed = [c.usage for c in stream if c.usage][-1]
        an = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
        msg = an.messages.create(model="longcat-test", max_tokens=4, messages=msgs)
        with pytest.raises(openai.NotFoundError):
            oa.chat.completions.create(model="nope", messages=msgs)
        assert httpx.get(srv.url + "/health?x=1").status_code == 200
        wait_idle(state)
        lines = _wait_for_lines(caplog, 5)
    got = [(m["method"], m["path"], m["status"], m["tin"], m["tout"]) for m in lines]
    assert got == [
        (
            "POST",
            "/v1/chat/completions",
            "200",
            str(done.usage.prompt_tokens),
            str(done.usage.completion_tokens),
        ),
        ("POST", "/v1/chat/completions", "200", str(streamed.prompt_tokens), str(streamed.completion_tokens)),
        ("POST", "/v1/messages", "200", str(msg.usage.input_tokens), str(msg.usage.output_tokens)),
        ("POST", "/v1/chat/completions", "404", None, None),  # refused before generating: no token counts
        ("GET", "/health?x=1", "200", None, None),
    ]
    assert (done.usage.completion_tokens, streamed.completion_tokens) == (5, 7)


def test_no_access_log(memorised_dir, caplog):
    caplog.set_level(logging.INFO, logger="longcat2.serve.access")
    state = scripted_state(memorised_dir, access_log=False)
    with ServerThread(create_app(state), state) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
    assert _lines(caplog) == []


@pytest.mark.parametrize("flag", [[], ["--no-access-log"]], ids=["default", "off"])
def test_serve_cli_prints_the_access_log(model_dir, flag):
    port = free_port()
    cmd = [sys.executable, "-m", "longcat2", "serve", "--model", str(model_dir), "--port", str(port), "--threads",
           "1", *flag]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        body = {"model": model_dir.name, "prompt": "def", "max_tokens": 3, "ignore_eos": True}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    access = [line for line in out.splitlines() if "longcat2.serve.access" in line]
    if flag:
        assert access == [], out
        return
    usage = r.json()["usage"]
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO longcat2\.serve\.access: 127\.0\.0\.1:\d+ "
        rf'"POST /v1/completions HTTP/1\.1" 200 \d+\.\d{{3}}s {usage["prompt_tokens"]} in / 3 out tokens',
        access[-1],
    ), out
    assert any('"GET /health HTTP/1.1" 200' in line for line in access)
