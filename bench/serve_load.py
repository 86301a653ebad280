"""Load test of `longcat2 serve`: aggregate generated tokens/s for 1, 4, 8, 16 concurrent streams.

    python bench/serve_load.py                       # starts a server on a tiny random model
    python bench/serve_load.py --model DIR           # starts a server on DIR
    python bench/serve_load.py --url http://H:P      # an already running server
    python bench/serve_load.py --levels 1,2 --max-tokens 8 --repeat 2   # smoke

Each stream is a streamed chat completion with `ignore_eos` and a fixed `max_tokens`, so every stream
generates exactly that many tokens; the aggregate rate is (sum of completion tokens) / (wall time from the
first request to the last [DONE]). After one untimed warm-up round, --repeat rounds run every level in
turn (1, 4, 8, 16, 1, 4, …), so background load hits every level alike; each level reports the median with
[min–max], and "x one" is the median of the per-round ratios to the 1-stream rate (bench/timing.py). A
stream that does not return exactly max_tokens tokens stops the run with an error. Also reported: median
time to first token and per-stream tokens/s. The batched-equals-alone check of the outputs is a test
(tests/serve/test_real_engine.py); this script measures speed only.
The client is asyncio + httpx in this process; the server runs in its own process (started here unless
--url is given), so client parsing does not steal the server's interpreter. Goal (issue 6): 8 streams >= 4x
the aggregate rate of one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import load_average, median, ratios, spread  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_random_model(out: Path, vocab: int = 2048) -> Path:
    """A tiny random LongCat model (preset `tiny`) with a BPE trained on a few stdlib modules."""
    import inspect
    import json as json_mod

    import torch

    from longcat2.config import ModelConfig
    from longcat2.model.longcat import LongCatForCausalLM
    from longcat2.tokenizer import load_tokenizer, train_tokenizer

    train_tokenizer(
        [inspect.getsource(json_mod), inspect.getsource(inspect), inspect.getsource(argparse)], vocab, out
    )
    tok = load_tokenizer(out)
    torch.manual_seed(0)
    LongCatForCausalLM(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).save_pretrained(out)
    return out


async def one_stream(
    client: httpx.AsyncClient, model: str, max_tokens: int, i: int
) -> tuple[int, float, float]:
    """→ (completion tokens, time to first token, total time)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write some Python code, request {i}."}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "error" in d:
                raise RuntimeError(d["error"]["message"])
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            elif ttft is None and d["choices"] and d["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
    return tokens, ttft or 0.0, time.perf_counter() - t0


async def run_level(url: str, model: str, n: int, max_tokens: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, model, max_tokens, i) for i in range(n)))
        wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    if [r[0] for r in results] != [max_tokens] * n:
        raise SystemExit(
            f"{n} streams: completion tokens {[r[0] for r in results]}, expected {max_tokens} each"
        )
    return {
        "streams": n,
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "per_stream_tok_s": sum(r[0] / r[2] for r in results) / n,
        "ttft_s": sum(r[1] for r in results) / n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--model", help="model directory for the started server (default: a tiny random model)")
    ap.add_argument("--levels", default="1,4,8,16", help="concurrency levels (default 1,4,8,16)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per stream (default 128)")
    ap.add_argument("--max-batch", type=int, default=16, help="server --max-batch (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (default 1)")
    ap.add_argument("--extra", default="", help="more `longcat2 serve` options for the started server")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds over the levels (default 5)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    proc = None
    tmp = None
    url = args.url
    try:
        if url is None:
            model_dir = args.model
            if model_dir is None:
                tmp = tempfile.TemporaryDirectory()
                model_dir = str(make_random_model(Path(tmp.name) / "tiny-random"))
            port = _free_port()
            cmd = [sys.executable, "-m", "longcat2.serve", "--model", model_dir, "--port", str(port)]
            cmd += [
                "--max-batch",
                str(args.max_batch),
                "--max-queue",
                str(max(levels)),
                "--threads",
                str(args.threads),
            ]
            cmd += ["--log-level", "warning", "--any-model", *shlex.split(args.extra)]
            print("server:", " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
            proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("error: the server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        load_start = load_average()
        for n in levels:  # warm-up round (connections, first-step costs), untimed
            asyncio.run(run_level(url, model, n, min(8, args.max_tokens)))
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in levels}
        for _ in range(max(1, args.repeat)):
            for n in levels:
                runs[n].append(asyncio.run(run_level(url, model, n, args.max_tokens)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        if tmp is not None:
            tmp.cleanup()

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"model: {args.model or ('(server at ' + args.url + ')' if args.url else 'tiny random')}, "
          f"{args.max_tokens} tokens per stream, server threads {args.threads}; median [min–max] of "
          f"{max(1, args.repeat)} interleaved rounds after 1 warm-up round")  # fmt: skip
    print(f"{load_start} at start, {load_average()} at the end")
    one = [r["aggregate_tok_s"] for r in runs[levels[0]]]
    print("| streams | aggregate tok/s | x one | tok/s per stream | TTFT s |")
    print("|---|---|---|---|---|")
    for n in levels:
        agg = [r["aggregate_tok_s"] for r in runs[n]]
        x = ratios(agg, one)
        print(
            f"| {n} | {spread(agg, 1, 1)} | {median(x):.2f}x [{min(x):.2f}–{max(x):.2f}] | "
            f"{median([r['per_stream_tok_s'] for r in runs[n]]):.1f} | {median([r['ttft_s'] for r in runs[n]]):.3f} |"
        )
    if args.json:
        print(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
