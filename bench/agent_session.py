"""Replay of a coding-agent session through `longcat2 serve`, with and without prefix caching.

    python bench/agent_session.py                    # 12 turns, ~16K tokens at the end, then 4 sessions at once
    python bench/agent_session.py --turns 4 --concurrent 0   # a quick run

Two servers run side by side on the same tiny random LongCat-2.0-architecture model (preset `tiny`, context
raised to 32K; LSA sparse attention is active at these lengths): one with prefix caching (the default), one
with `--no-prefix-cache`. The session is what a coding agent sends: a ~2K-token system prompt with tool
definitions, then `--turns` turns, each appending a user message or a tool result of ~1-2K tokens (Python
standard-library source, as an agent reading files gets) and the model's short reply, so the prompt grows to
>= 16K tokens. Every turn goes to both servers, one after the other (the order alternates per turn), through
the unmodified `openai` SDK, streamed; printed per turn: prompt tokens, cached tokens reported by each server,
time to first token on each, and the ratio. Greedy replies must be identical on both servers (the script
fails loudly otherwise): caching may only change speed. Then `--concurrent` sessions run interleaved on each
server (all at once), and the last turn's TTFT and cached tokens are printed per session. Last, the same kind
of session goes through the unmodified `anthropic` SDK (streamed) and its `cache_read_input_tokens` are printed
per turn (they must be > 0 from turn 2 on).
Goal (issue 14): at the last turn TTFT >= 10x lower with the cache; whole session >= 4x faster.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anthropic
import httpx
import openai
from serve_load import _free_port, make_random_model

MODEL = "tiny-random"  # the served name of the model folder
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {
                "type": "object",
                "properties": {k: {"type": "string", "description": f"the {k}"} for k in args},
                "required": list(args),
            },
        },
    }
    for name, desc, args in (
        ("read_file", "Read a file of the repository and return its text.", ("path",)),
        ("write_file", "Write text to a file of the repository, replacing it.", ("path", "content")),
        ("run_shell", "Run a shell command in the repository and return its output.", ("command",)),
        ("search_code", "Search the repository for a regular expression.", ("pattern", "glob")),
    )
]


def _corpus() -> list[str]:
    """Chunks of real Python source, as files an agent reads."""
    import argparse as a
    import json as j
    import string as s
    import textwrap as t

    return [inspect.getsource(m) for m in (a, j, s, t, inspect)]


def _text(corpus: list[str], i: int, chars: int) -> str:
    src = corpus[i % len(corpus)]
    start = (i * 7919) % max(1, len(src) - chars)
    return src[start : start + chars]


def _start(model_dir: str, port: int, extra: list[str], threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "longcat2.serve", "--model", model_dir, "--port", str(port), "--any-model"]
    cmd += ["--threads", str(threads), "--default-temperature", "0", "--max-queue", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        cmd + extra, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start")


def _turn(client: openai.OpenAI, messages: list[dict], max_tokens: int) -> tuple[str, float, float, int, int]:
    """One streamed request → (reply text, time to first token, total time, prompt tokens, cached tokens)."""
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta
            if d.content or getattr(d, "reasoning_content", None) or d.tool_calls:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                parts.append(d.content or "")
    total = time.perf_counter() - t0
    assert usage is not None, "no usage chunk"
    details = usage.prompt_tokens_details
    return (
        "".join(parts),
        ttft if ttft is not None else total,
        total,
        usage.prompt_tokens,
        details.cached_tokens,
    )


def _session_messages(
    corpus: list[str], turn: int, seed: int, system_chars: int, grow_chars: int
) -> list[dict]:
    """The new messages of `turn` (turn 0: system prompt + first request)."""
    if turn == 0:
        system = f"Session {seed}. You are a coding agent working in a Python repository.\n" + _text(
            corpus, seed, system_chars
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": "Fix the failing test."}]
    body = _text(corpus, seed * 31 + turn, grow_chars)
    if turn % 2:
        return [{"role": "user", "content": f"Here is the file you asked for:\n{body}"}]
    return [{"role": "user", "content": f"Tool output of run_shell:\n{body}"}]


def run_session(
    clients: list[openai.OpenAI], corpus: list[str], args: argparse.Namespace, seed: int, verbose: bool
) -> list[list[tuple[float, float, int, int]]]:
    """One session sent to every client turn by turn → per client, per turn (ttft, total, prompt, cached)."""
    histories: list[list[dict]] = [[] for _ in clients]
    rows: list[list[tuple[float, float, int, int]]] = [[] for _ in clients]
    for turn in range(args.turns + 1):
        new = _session_messages(corpus, turn, seed, args.system_chars, args.grow_chars)
        order = list(range(len(clients)))
        if turn % 2:
            order.reverse()
        replies: dict[int, str] = {}
        for i in order:
            histories[i] += new
            reply, ttft, total, prompt, cached = _turn(clients[i], histories[i], args.max_tokens)
            replies[i] = reply
            rows[i].append((ttft, total, prompt, cached))
        if len(set(replies.values())) != 1:
            raise SystemExit(
                f"session {seed} turn {turn}: replies differ with and without the cache: {replies}"
            )
        for i in order:
            histories[i].append({"role": "assistant", "content": replies[i]})
        if verbose:
            (c_ttft, _, prompt, cached), (n_ttft, *_rest, n_cached) = rows[0][-1], rows[1][-1]
            print(
                f"{turn:>4} {prompt:>8} {cached:>8} {n_cached:>8} {c_ttft * 1000:>10.0f} {n_ttft * 1000:>10.0f}"
                f" {n_ttft / c_ttft:>7.1f}x",
                flush=True,
            )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=12, help="turns after the first request (default 12)")
    ap.add_argument("--system-chars", type=int, default=6000, help="system prompt size (default ~2K tokens)")
    ap.add_argument(
        "--grow-chars", type=int, default=4500, help="chars added per turn (default ~1.5K tokens)"
    )
    ap.add_argument("--max-tokens", type=int, default=16, help="reply tokens per turn (default 16)")
    ap.add_argument("--concurrent", type=int, default=4, help="sessions run at once afterwards (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per server (default 1)")
    ap.add_argument("--model", help="model directory (default: a tiny random model with a 32K context)")
    args = ap.parse_args()

    procs: list[subprocess.Popen] = []
    tmp = tempfile.TemporaryDirectory()
    try:
        model_dir = args.model
        if model_dir is None:
            model_dir = str(make_random_model(Path(tmp.name) / "tiny-random"))
            cfg_path = Path(model_dir) / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["max_position_embeddings"] = 32768
            cfg_path.write_text(json.dumps(cfg))
        ports = [_free_port(), _free_port()]
        procs.append(_start(model_dir, ports[0], [], args.threads))
        procs.append(_start(model_dir, ports[1], ["--no-prefix-cache"], args.threads))
        clients = [
            openai.OpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key="unused", max_retries=0, timeout=1800)
            for p in ports
        ]
        corpus = _corpus()
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        print("one session, each turn sent to both servers (greedy replies checked equal)")
        print(
            f"{'turn':>4} {'prompt':>8} {'cached':>8} {'cached0':>8} {'ttft ms':>10} {'no-cache':>10} {'ratio':>8}"
        )
        rows = run_session(clients, corpus, args, seed=0, verbose=True)
        with_cache = sum(r[1] for r in rows[0])
        without = sum(r[1] for r in rows[1])
        last_ratio = rows[1][-1][0] / rows[0][-1][0]
        print(f"last turn: {rows[0][-1][2]} prompt tokens, TTFT {last_ratio:.1f}x lower with the cache")
        print(
            f"whole session: {with_cache:.1f} s with the cache, {without:.1f} s without: {without / with_cache:.1f}x"
        )

        if args.concurrent:
            print(f"\n{args.concurrent} sessions at once on each server")
            with concurrent.futures.ThreadPoolExecutor(args.concurrent) as pool:
                futs = [
                    pool.submit(run_session, clients, corpus, args, seed=s + 1, verbose=False)
                    for s in range(args.concurrent)
                ]
                results = [f.result() for f in futs]
            print(f"{'session':>7} {'prompt':>8} {'cached':>8} {'ttft ms':>10} {'no-cache':>10} {'ratio':>8}")
            ratios = []
            for s, r in enumerate(results):
                (c_ttft, _, prompt, cached), (n_ttft, *_rest) = r[0][-1], r[1][-1]
                ratios.append(n_ttft / c_ttft)
                print(
                    f"{s:>7} {prompt:>8} {cached:>8} {c_ttft * 1000:>10.0f} {n_ttft * 1000:>10.0f} {ratios[-1]:>7.1f}x"
                )
            print(f"last-turn TTFT ratio, median over sessions: {statistics.median(ratios):.1f}x")
            stats = httpx.get(f"http://127.0.0.1:{ports[0]}/metrics", params={"format": "json"}).json()
            pc = stats["prefix_cache"]
            print(
                f"prefix cache: hit rate {pc['hit_rate']:.2f}, {pc['blocks']} keyed blocks, "
                f"{pc['evictions']} evictions"
            )
        print("\nAnthropic SDK, streamed, on the caching server")
        ant = anthropic.Anthropic(base_url=f"http://127.0.0.1:{ports[0]}", api_key="unused", max_retries=0)
        tools = [
            {"name": t["function"]["name"], "description": t["function"]["description"],
             "input_schema": t["function"]["parameters"]}
            for t in TOOLS
        ]  # fmt: skip
        history: list[dict] = []
        system = ""
        reads = []
        for turn in range(min(args.turns, 4) + 1):
            for m in _session_messages(corpus, turn, 99, args.system_chars, args.grow_chars):
                if m["role"] == "system":
                    system = m["content"]
                else:
                    history.append(m)
            with ant.messages.stream(
                model=MODEL, system=system, messages=history, tools=tools, max_tokens=args.max_tokens
            ) as stream:
                msg = stream.get_final_message()
            reads.append(msg.usage.cache_read_input_tokens)
            text = "".join(b.text for b in msg.content if b.type == "text") or "ok"
            history.append({"role": "assistant", "content": text})
        print("cache_read_input_tokens per turn:", reads)
        if any(r == 0 for r in reads[1:]):
            raise SystemExit("the Anthropic session read nothing from the cache after turn 1")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
