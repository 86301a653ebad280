"""Helpers for the server tests: a tiny random LongCat model on disk, a scripted engine stand-in, and real
uvicorn servers on 127.0.0.1 (free ports) running in background threads.

The scripted engine (`ScriptedEngine`) has the `longcat2.engine.Engine` surface the server drives
(add_request / step / abort / has_unfinished) but answers with scripted text chosen from the rendered
prompt, one token per request per step, with a fixed sleep per step whatever the batch size. It makes tool
calls, thinking and stop reasons deterministic, so the SDK round trips test the whole server (parsing,
builders, SSE, batching, cancellation) without depending on what a random model writes. The real tiny
model runs the same server in `real_server`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from longcat2.engine import RequestOutput
from longcat2.serve import EngineWorker, Metrics, ServerConfig, ServerState
from longcat2.tokenizer import load_tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TOOL_CALL_TEXT = (
    "<longcat_tool_call>get_weather\n<longcat_arg_key>city</longcat_arg_key>\n"
    "<longcat_arg_value>Paris</longcat_arg_value>\n</longcat_tool_call>"
)
WEATHER_ANSWER = "It is sunny in Paris, 22 degrees."
GREETING = "Hello! How can I help you today?"
THOUGHT = "The user says hi, so I greet them."
COUNTING = "one two three four five six seven eight nine ten"


def script(prompt: str) -> str:
    """The scripted model: the reply text for a rendered LongCat prompt."""
    last_turn = prompt.rsplit("<longcat_user>", 1)[-1]
    if prompt.endswith("<longcat_tool_call>"):  # forced tool use: the prompt pre-opened a call
        return TOOL_CALL_TEXT[len("<longcat_tool_call>") :]
    if prompt.endswith("<longcat_tool_call>get_weather\n"):
        return TOOL_CALL_TEXT[len("<longcat_tool_call>get_weather\n") :]
    if "<longcat_tool_response>" in last_turn:
        return WEATHER_ANSWER
    if "weather in Paris" in last_turn and "get_weather" in prompt:
        return "Let me check.\n" + TOOL_CALL_TEXT
    if "count" in last_turn:
        return COUNTING
    if "long story" in last_turn:
        return "once upon a time " * 400
    if "/think_on" in last_turn:
        return f"<longcat_think>\n{THOUGHT}\n</longcat_think>\n{GREETING}"
    return GREETING


@dataclass
class _Seq:
    rid: str
    tokens: list[int]
    max_new: int
    out: int = 0


class ScriptedEngine:
    """`Engine` stand-in: scripted replies, continuous batching of up to `max_batch`, `step_s` per step."""

    def __init__(
        self, tokenizer, reply: Callable[[str], str] = script, max_batch: int = 8, step_s: float = 0.005
    ):
        self.tok = tokenizer
        self.reply = reply
        self.max_batch = max_batch
        self.step_s = step_s
        self.waiting: deque[_Seq] = deque()
        self.active: dict[str, _Seq] = {}
        self.aborted: list[str] = []
        self.added = 0
        self.max_active_seen = 0
        self.fail_next_step = False

    def add_request(self, prompt_ids, params=None, request_id=None) -> str:
        text = self.tok.decode(prompt_ids)
        toks = self.tok.encode(self.reply(text)) + [self.tok.eos_id]
        self.waiting.append(_Seq(request_id, toks, params.max_new_tokens))
        self.added += 1
        return request_id

    def abort(self, request_id: str) -> bool:
        for s in list(self.waiting):
            if s.rid == request_id:
                self.waiting.remove(s)
                self.aborted.append(request_id)
                return True
        if self.active.pop(request_id, None) is not None:
            self.aborted.append(request_id)
            return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.active or self.aborted)

    def step(self) -> list[RequestOutput]:
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected failure")
        outs = [RequestOutput(rid, [], True, "abort") for rid in self.aborted]
        self.aborted = []
        while self.waiting and len(self.active) < self.max_batch:
            s = self.waiting.popleft()
            self.active[s.rid] = s
        self.max_active_seen = max(self.max_active_seen, len(self.active))
        if self.active:
            time.sleep(self.step_s)
        for rid, s in list(self.active.items()):
            tok = s.tokens[s.out]
            s.out += 1
            if tok == self.tok.eos_id:
                outs.append(RequestOutput(rid, [tok], True, "stop", tok))
            elif s.out >= s.max_new or s.out >= len(s.tokens):
                outs.append(RequestOutput(rid, [tok], True, "length"))
            else:
                outs.append(RequestOutput(rid, [tok], False))
                continue
            del self.active[rid]
        return outs


# ------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A uvicorn server for `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app, state: ServerState) -> None:
        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def wait_idle(state: ServerState, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while state.worker.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.worker.in_flight == 0, f"{state.worker.in_flight} requests still in flight"


def scripted_state(model_dir: Path, *, max_batch=8, max_queue=16, step_s=0.005, **config) -> ServerState:
    tok = load_tokenizer(model_dir)
    engine = ScriptedEngine(tok, max_batch=max_batch, step_s=step_s)
    metrics = Metrics()
    worker = EngineWorker(engine, tok, max_batch=max_batch, max_queue=max_queue, metrics=metrics)
    cfg = ServerConfig(max_batch=max_batch, max_queue=max_queue, **config)
    return ServerState(tok, worker, ["longcat-test", "alias"], 4096, config=cfg, metrics=metrics)
