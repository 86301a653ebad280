"""Helpers for the server tests: a tiny LongCat model that has memorised scripted replies, the real engine
around it, and real uvicorn servers on 127.0.0.1 (free ports) running in background threads.

`memorise` fine-tunes a tiny model on the `SCRIPTED_CONVERSATIONS` (rendered with the server's own chat
template) until greedy decoding through the real `longcat2.engine.Engine` reproduces every reply exactly, so
tool calls, thinking and stop reasons are deterministic while every token still comes from the real model
and engine: the SDK round trips test the whole stack. A tiny random model runs the same server in
`real_server`.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from longcat2 import chat
from longcat2.config import ModelConfig
from longcat2.engine import Engine, RequestOutput, SamplingParams
from longcat2.model.longcat import LongCatForCausalLM, lm_loss
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


SCRIPT_DOC = """The scripted replies the memorised model gives: a greeting, counting, a get_weather tool call for
"What is the weather in Paris?" and the answer once the tool responded, and a thought when thinking is on."""


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(content: str | None, **extra) -> dict:
    return {"role": "assistant", "content": content, **extra}


_CALL = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
_WEATHER_Q = _user("What is the weather in Paris?")
_CALLED = _assistant("Let me check.", tool_calls=_CALL)
LONG_STORY = "once upon a time " * 20

# (messages ending with the reply to memorise, tools, thinking): each reply in them is trained (render_with_mask)
SCRIPTED_CONVERSATIONS: list[tuple[list[dict], list[dict] | None, bool]] = [
    ([_user("hi"), _assistant(GREETING)], None, False),
    ([{"role": "system", "content": "Be brief."}, _user("hi"), _assistant(GREETING)], None, False),
    ([_user("count"), _assistant(COUNTING)], None, False),
    ([_user("please count"), _assistant(COUNTING)], None, False),
    ([_user("hi"), _assistant(GREETING, reasoning_content=THOUGHT)], None, True),
    ([_user("hi"), _assistant(GREETING), _user("count"), _assistant(COUNTING)], None, True),
    ([_WEATHER_Q, _CALLED], [WEATHER_TOOL], False),
    (
        [_WEATHER_Q, _CALLED, {"role": "tool", "content": json.dumps({"sky": "sunny", "temp_c": 22})}]
        + [_assistant(WEATHER_ANSWER)],
        [WEATHER_TOOL],
        False,
    ),
    (
        [_WEATHER_Q, _CALLED, {"role": "tool", "content": "sunny, 22 degrees"}, _assistant(WEATHER_ANSWER)],
        [WEATHER_TOOL],
        False,
    ),
    ([_user("hi"), _assistant(None, tool_calls=_CALL)], [WEATHER_TOOL], False),  # forced tool choice
    ([_user("a long story"), _assistant(LONG_STORY)], None, False),  # trained without its end: keeps going
]
RAW_COMPLETION = ("please count", COUNTING)  # /v1/completions: raw text, then the reply and EOS


def memorise(tokenizer_dir: Path, out: Path, steps: int = 300, lr: float = 1e-2) -> Path:
    """Train a tiny LongCat model until greedy decoding through the real `Engine` reproduces every scripted
    reply exactly (asserted), and save it with the tokenizer in `out`."""
    tok = load_tokenizer(tokenizer_dir)
    seqs: list[tuple[list[int], list[int]]] = []
    for messages, tools, thinking in SCRIPTED_CONVERSATIONS:
        ids, mask = chat.render_with_mask(messages, tools, tok, thinking=thinking)
        seqs.append((ids, mask))
    seqs[-1][1][-1] = 0  # the long story has no end
    prompt, reply = (tok.encode(t) for t in RAW_COMPLETION)
    seqs.append((prompt + reply + [tok.eos_id], [0] * len(prompt) + [1] * (len(reply) + 1)))
    width = max(len(ids) for ids, _ in seqs)
    inputs = torch.full((len(seqs), width), tok.eos_id)
    labels = torch.full((len(seqs), width), -100)
    for i, (ids, mask) in enumerate(seqs):
        inputs[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
    # expected greedy replies, prompted exactly as the server prompts (chat.render + generation prompt)
    checks = []
    for messages, tools, thinking in SCRIPTED_CONVERSATIONS[:-1]:
        head = chat.render(messages[:-1], tools, True, thinking)
        checks.append(
            (tok.encode(head), tok.encode(chat.render(messages, tools, False, thinking)[len(head) :]))
        )
    checks.append((prompt, reply + [tok.eos_id]))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 busy cores: one thread is several times faster for this tiny model
    try:
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, mtp_num_layers=0)
        model = LongCatForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        wrong: list = []
        for step in range(steps):
            model.train()
            loss = lm_loss(model(inputs), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= 40 and step % 10 == 0 or step == steps - 1:
                with torch.no_grad():
                    engine = Engine(model, detokenize=tok.decode, eos_token_id=tok.eos_id)
                    got = engine.generate([p for p, _ in checks], SamplingParams(max_new_tokens=64))
                wrong = [(tok.decode(p), tok.decode(g)) for (p, want), g in zip(checks, got) if g != want]
                if not wrong:
                    break
        assert not wrong, f"the model did not memorise {len(wrong)} replies: {wrong[:2]}"
    finally:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)  # the tokenizer; the random model's files are overwritten next
    model.eval().save_pretrained(out)
    return out


class FaultyEngine(Engine):
    """The real `Engine` with a fault injector around its real steps (not a stand-in: every token still
    comes from the model): `fail_next_step` makes the next `step()` raise, `step_s` sleeps before each step
    that has work, so a test can hold requests in flight long enough to fill the queue; a request with
    seed `POISON_SEED` raises while sampling (as NaN probabilities did). `prompts` records the token ids
    each request was given."""

    POISON_SEED = 666_666

    def __init__(self, model, *, step_s: float = 0.0, **kw) -> None:
        super().__init__(model, **kw)
        self.step_s = step_s
        self.fail_next_step = False
        self.prompts: dict[str, list[int]] = {}

    def add_request(self, prompt_ids, params=None, request_id=None, on_output=None) -> str:
        rid = super().add_request(prompt_ids, params, request_id, on_output)
        self.prompts[rid] = list(prompt_ids)
        if params is not None and params.seed == self.POISON_SEED and rid in self.requests:

            def poisoned(logits):
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

            self.requests[rid].sampler.sample = poisoned
        return rid

    def step(self) -> list[RequestOutput]:
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected failure")
        if self.step_s and self.has_unfinished():
            time.sleep(self.step_s)
        return super().step()


def load_engine(model_dir: Path, *, max_batch: int = 8, step_s: float = 0.0):
    """(tokenizer, real engine) for a model directory, wired like `longcat2.serve.app.load_state`."""
    tok = load_tokenizer(model_dir)
    model = LongCatForCausalLM.from_pretrained(model_dir)
    engine = FaultyEngine(
        model, step_s=step_s, max_batch_size=max_batch, detokenize=tok.decode, eos_token_id=tok.eos_id
    )
    return tok, engine


# ------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 60.0) -> None:
    """Wait until the server process `proc` answers 200 on `url`/health (fails if it exits or times out)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, "the server process exited"
        assert time.monotonic() < deadline, f"the server did not answer on {url} within {timeout:.0f}s"
        time.sleep(0.1)


class ServerThread:
    """A uvicorn server for `app` on 127.0.0.1:<free port> in a daemon thread. `send_buffer`: the kernel
    send buffer of its connections in bytes (small: a client that stops reading blocks the server soon)."""

    def __init__(self, app, state: ServerState, send_buffer: int | None = None) -> None:
        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(cfg)
        sockets = None
        if send_buffer is not None:  # accepted connections inherit the listening socket's buffer size
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            sock.bind(("127.0.0.1", self.port))
            sockets = [sock]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets}, daemon=True)

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


def scripted_state(
    model_dir: Path, *, max_batch=8, max_queue=16, step_s=0.0, max_backlog=2048, **config
) -> ServerState:
    """A `ServerState` around the real engine and the memorised model in `model_dir` (as `serve --model`
    builds it, with the engine's fault injector available)."""
    tok, engine = load_engine(model_dir, max_batch=max_batch, step_s=step_s)
    metrics = Metrics()
    worker = EngineWorker(
        engine, tok, max_batch=max_batch, max_queue=max_queue, metrics=metrics, max_backlog=max_backlog
    )
    cfg = ServerConfig(max_batch=max_batch, max_queue=max_queue, default_temperature=0.0, **config)
    ctx = engine.cfg.max_position_embeddings
    return ServerState(tok, worker, ["longcat-test", "alias"], ctx, config=cfg, metrics=metrics)


def openai_error(r, status: int) -> dict:
    """The `error` object of an OpenAI-shaped error response with this status."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def anthropic_error(r, status: int, kind: str) -> dict:
    """The `error` object of an Anthropic-shaped error response with this status and error type."""
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]
    return body["error"]
