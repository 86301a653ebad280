"""`longcat2 serve`: option parsing, the message without a model, and a graceful shutdown of a real server
process (SIGTERM while a stream is running: the stream finishes, then the process exits 0)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from serve_helpers import free_port, wait_healthy

from longcat2 import model_dir
from longcat2.serve import app as serve_app
from longcat2.serve.cli import add_cli
from longcat2.serve.core import ServerConfig


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers())
    return p.parse_args(["serve", *argv])


def test_options():
    a = _parse("--model", "m", "--port", "9000", "--api-key", "k", "--max-batch", "4", "--max-queue", "2")
    assert (a.model, a.port, a.api_key, a.max_batch, a.max_queue, a.host) == (
        "m",
        9000,
        "k",
        4,
        2,
        "127.0.0.1",
    )
    a = _parse("--served-model-name", "a", "b", "--any-model", "--clamp-max-tokens")
    assert a.served_model_name == ["a", "b"] and a.any_model and a.clamp_max_tokens and a.model is None


@pytest.mark.skipif(not (model_dir.DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no embedded model")
def test_embedded_model_by_name_keeps_its_name():
    state = serve_app.load_state(ServerConfig(model_dir=Path(model_dir.DEFAULT_MODEL_NAME)))
    assert state.model_names == [model_dir.DEFAULT_MODEL_NAME]  # not the package folder's "default-model"


def test_no_embedded_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model_dir, "DEFAULT_MODEL_DIR", tmp_path / "default-model")
    with pytest.raises(serve_app.ServeError, match="no embedded default model"):
        serve_app.resolve_model_dir(ServerConfig())
    args = _parse()
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "build_default_model.sh" in err
    args = _parse("--model", str(tmp_path))
    assert args.func(args) == 2 and "not a model folder (no config.json)" in capsys.readouterr().err


def test_graceful_shutdown_finishes_streams(model_dir):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "longcat2.serve", "--model", str(model_dir), "--port", str(port)]
    cmd += [
        "--default-temperature",
        "0",
        "--shutdown-timeout",
        "30",
        "--log-level",
        "warning",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        body = {
            "model": model_dir.name,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 150,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        lines: list[str] = []
        first = threading.Event()

        def consume() -> None:
            with (
                httpx.Client(timeout=60) as c,
                c.stream("POST", url + "/v1/chat/completions", json=body) as r,
            ):
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        if len(lines) > 2:
                            first.set()

        t = threading.Thread(target=consume)
        t.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][6:])["usage"]
        assert usage["completion_tokens"] == 150  # the in-flight stream ran to the end
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
