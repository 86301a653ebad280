"""The real server under torchrun: 2 processes (TP2 + EP2), rank 0 serves HTTP, rank 1 follows in lockstep.

The memorised tiny model (serve_helpers) answers its scripted conversations exactly under greedy decoding
in one process; the 2-process server must give the same replies: a streamed chat completion through the
openai SDK, and a grammar-constrained tool call (the follower compiles the grammar from its source).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from serve_helpers import GREETING, WEATHER_TOOL, free_port, wait_healthy

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to the interpreter")
def test_openai_sdk_streams_from_a_two_process_server(memorised_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), env.get("PYTHONPATH")]))
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "--monitor-interval=0.2", "-m", "longcat2",
           "serve", "--model", str(memorised_dir), "--port", str(port), "--tp", "2", "--ep", "2",
           "--default-temperature", "0", "--log-level", "warning", "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", timeout=120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=40
        )
        chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(chunks) == GREETING and len([c for c in chunks if c]) > 1
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER_TOOL], max_tokens=60,
        )  # fmt: skip
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "peak RSS growth while loading" in out, out[-3000:]  # each rank printed its shard
