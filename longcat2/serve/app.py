"""The FastAPI application (both APIs, `/health`, `/metrics`) and the uvicorn runner.

Design choices:
- `create_app(state)` takes a ready `ServerState` (tokenizer + `EngineWorker` + config), so tests can serve
  a real engine or a scripted stand-in through the same app; `load_state(config)` builds the real one from a
  model directory (or the embedded default model) and `run_server` serves it with uvicorn.
- Routes are plain handlers that parse their bodies themselves (see `core.parse_body`), so every failure
  goes through one `APIError` path and comes back in the caller's API shape: Anthropic's for
  `/v1/messages*`, OpenAI's for everything else (unknown routes and 405s included). Unexpected exceptions
  are logged and answered with a 500 in the same shapes by the `_Guard` middleware, which does not
  re-raise them, so the connection stays usable and the server keeps serving.
- The routes are mounted at `/v1/...` and again under LongCat's own prefixes (`/openai/v1/...`,
  `/anthropic/v1/...`), so clients configured for api.longcat.chat only need a new host.
- `/health` (GET and HEAD) and `/metrics` stay open for probes, which cannot send keys; with an API key
  set, `/health` leaves out the served model names, which only `/v1/models` (behind the key) lists.
- A pure ASGI middleware counts requests by endpoint and status for `/metrics` (Starlette's
  BaseHTTPMiddleware is avoided: it interferes with streaming and disconnect detection); another writes
  the access log (`access_log.py`: one line per request with its status, seconds and tokens in/out).
- Requests that set no temperature get `--default-temperature`, else the model's `generation_config.json`
  (greedy when it says `do_sample: false`, as the embedded model does), else the APIs' 1.0 — the
  Anthropic SDK no longer sends a temperature at all.
- `run_server` lowers the interpreter's GIL switch interval (see `GIL_SWITCH_INTERVAL_S`): the engine
  thread and the event loop share one interpreter, and the default 5 ms hand-off starves the engine.
- `run_server` also freezes the startup heap (`gc.freeze()` after a collection, as vLLM's engine core
  does): the model, tokenizer and libraries are ~170K long-lived objects, and every full collection
  scanned them all, an ~85 ms stall of every stream (measured inside a decode step at LongCat-2.0's
  attention dims); frozen, a collection only scans what requests created.
- Lifespan: the engine thread starts with the app; at shutdown uvicorn first stops accepting connections
  and waits up to `shutdown_timeout` s for in-flight responses (streams included), then the worker aborts
  whatever is left and its thread is joined.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from longcat2 import model_dir
from longcat2.serve import anthropic_api, openai_api, responses_api
from longcat2.serve.access_log import AccessLog
from longcat2.serve.core import DEFAULT_MODEL_NAME, ServerConfig, ServerState
from longcat2.serve.protocol import APIError, anthropic_error_body, openai_error_body
from longcat2.serve.worker import EngineWorker, Metrics

log = logging.getLogger("longcat2.serve")

_ENDPOINTS = {
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/health",
    "/metrics",
}


# The engine thread releases the GIL in every torch op and must win it back from the event loop thread,
# which holds it for up to the switch interval (5 ms by default) while it formats SSE chunks: with many
# streams that convoy stalls every engine step. 0.5 ms measured ~2x the aggregate tokens/s at 8-16 streams.
GIL_SWITCH_INTERVAL_S = 0.0005


class ServeError(RuntimeError):
    """The server cannot start (no model, unreadable model, bad options); the message says what to do."""


def _is_anthropic(path: str) -> bool:
    return path.rstrip("/").endswith("/messages") or "/messages/" in path


def error_response(path: str, err: APIError) -> JSONResponse:
    body = anthropic_error_body(err) if _is_anthropic(path) else openai_error_body(err)
    return JSONResponse(body, status_code=err.status, headers=err.headers or None)


class _Guard:
    """ASGI middleware: counts responses per endpoint and status code, and turns an unexpected exception
    into a logged 500 in the caller's API shape without re-raising it (a re-raised exception makes uvicorn
    drop the connection, which breaks clients that reuse keep-alive connections)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        for prefix in ("/openai", "/anthropic"):
            if path.startswith(prefix + "/v1/"):
                path = path[len(prefix) :]
        endpoint = (
            path if path in _ENDPOINTS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        )
        status = [500]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        started = [False]

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
            await counting_send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception as exc:
            log.exception("unhandled error on %s", scope.get("path", ""))
            if started[0]:
                raise  # mid-response: nothing to send, the connection has to go
            err = APIError(500, f"Internal server error: {type(exc).__name__}: {exc}")
            await error_response(scope.get("path", ""), err)(scope, receive, counting_send)
        finally:
            self.metrics.record_request(endpoint, status[0])


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.worker.start()
        log.info("serving %s (context %d tokens)", ", ".join(state.model_names), state.context_len)
        try:
            yield
        finally:
            await asyncio.to_thread(state.worker.shutdown, min(state.config.shutdown_timeout, 5.0))

    app = FastAPI(title="longcat2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, APIError(400, f"Invalid request: {exc.errors()[:3]}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = f"Not found: {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return error_response(request.url.path, APIError(exc.status_code, msg))

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root() -> JSONResponse:  # agents probe the base URL before they start
        return JSONResponse({"status": "ok", "models": state.model_names})

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        running, queued = state.worker.load()
        ok = state.worker.alive and not state.worker.draining
        body = {
            "status": "ok" if ok else ("draining" if state.worker.draining else "engine stopped"),
            # with an API key, what is served is for key holders (GET /v1/models); probes get the status
            **({} if state.config.api_key else {"models": state.model_names}),
            "context_length": state.context_len,
            "running": running,
            "queued": queued,
            "max_batch": state.worker.max_batch,
            "max_queue": state.worker.max_queue,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        running, queued = state.worker.load()
        state.metrics.set_load(running, queued)
        if request.query_params.get("format") == "json":
            return JSONResponse(state.metrics.snapshot())
        return PlainTextResponse(state.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    for prefix in ("", "/openai"):
        app.include_router(openai_api.router(state), prefix=prefix)
        app.include_router(responses_api.router(state), prefix=prefix)
    for prefix in ("", "/anthropic"):
        app.include_router(anthropic_api.router(state), prefix=prefix)
    app.add_middleware(_Guard, metrics=state.metrics)
    if state.config.access_log:
        app.add_middleware(AccessLog)  # added last: the outermost, it sees the guard's 500s
    return app


# ------------------------------------------------------------------------------------------ loading


def resolve_model_dir(config: ServerConfig) -> Path:
    """The model folder `--model` names (`longcat2.model_dir`: a model folder, a training run folder, the
    embedded model's name, or nothing for the embedded model); it must hold a tokenizer."""
    try:
        path = model_dir.resolve_model_dir(config.model_dir)
    except model_dir.ModelDirError as e:
        raise ServeError(str(e)) from e
    if not (path / "tokenizer.json").is_file():
        raise ServeError(
            f"--model {path}: no tokenizer.json next to the weights; copy the tokenizer files in"
        )
    return path


def model_default_temperature(path: Path) -> float | None:
    """Temperature for requests that set none, from the model's HF `generation_config.json`: 0 (greedy)
    when it says `do_sample: false`, else its `temperature`; None when the file or field is absent."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return None
    try:
        gen = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ServeError(f"cannot read {f}: {e}") from e
    if gen.get("do_sample") is False:
        return 0.0
    t = gen.get("temperature")
    if t is not None and (not isinstance(t, (int, float)) or t < 0):
        raise ServeError(f"{f}: temperature must be a number >= 0, got {t!r}")
    return None if t is None else float(t)


def load_state(config: ServerConfig) -> ServerState | None:
    """Load the model, tokenizer and engine named by `config` and wrap them in a `ServerState`.
    Under torchrun (`config.tp` / `config.ep`) every rank loads its shard; ranks > 0 then follow rank 0's
    engine in lockstep until it shuts down and return None (longcat2.parallel.serving)."""
    import torch

    from longcat2.config import ConfigError, with_inference_overrides
    from longcat2.engine import Engine
    from longcat2.parallel import serving
    from longcat2.tokenizer import TokenizerError, load_tokenizer

    path = resolve_model_dir(config)
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as e:
        raise ServeError(str(e)) from e
    dtype = None if config.dtype == "auto" else getattr(torch, config.dtype)
    try:
        layout = serving.setup(config, timeout_s=serving.SERVE_TIMEOUT_S if serving.wanted(config) else None)
        model = serving.load_model(path, layout, dtype, config.dequantize_fp8)
    except (ValueError, OSError) as e:
        raise ServeError(f"cannot load the model from {path}: {e}") from e
    try:
        model.config = with_inference_overrides(model.config, config.model_overrides)
    except ConfigError as e:
        raise ServeError(f"--override {e}") from e
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ServeError(
            f"the tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}"
        )
    ctx = config.max_model_len or cfg.max_position_embeddings
    if config.max_model_len and config.max_model_len > cfg.max_position_embeddings:
        log.warning(
            "--max-model-len %d exceeds the model's max_position_embeddings %d",
            config.max_model_len,
            cfg.max_position_embeddings,
        )
    engine = Engine(
        model,
        max_batch_size=config.max_batch,
        max_step_tokens=config.max_step_tokens,
        speculative=config.speculative,
        num_draft_tokens=config.num_draft_tokens,
        detokenize=tokenizer.decode,
        eos_token_id=tokenizer.eos_id,
        prefix_cache_bytes=config.prefix_cache_bytes,
        index_dtype=config.index_dtype,
    )
    if layout.distributed and layout.rank != 0:
        serving.follow_server(engine, tokenizer)
        return None
    engine = serving.drive(engine, layout)
    metrics = Metrics()
    metrics.prefix_cache = engine.prefix_cache_stats
    worker = EngineWorker(
        engine, tokenizer, max_batch=config.max_batch, max_queue=config.max_queue, metrics=metrics
    )
    if config.default_temperature is None:  # the model's generation_config.json, as vLLM does by default
        config = dataclasses.replace(config, default_temperature=model_default_temperature(path))
    embedded = path.resolve() == model_dir.DEFAULT_MODEL_DIR.resolve()
    default_name = DEFAULT_MODEL_NAME if embedded else Path(config.model_dir or path).resolve().name
    names = list(dict.fromkeys(config.served_model_names or [default_name]))
    info: dict[str, Any] = {"context_length": ctx, "max_model_len": ctx}
    return ServerState(tokenizer, worker, names, ctx, config=config, metrics=metrics, model_info=info)


def run_server(
    config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Load the model and serve until SIGINT/SIGTERM."""
    import uvicorn

    from longcat2.parallel import serving

    state = load_state(config)
    if state is None:  # a rank > 0 under torchrun: it followed rank 0 until the server stopped
        return
    app = create_app(state)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()  # the startup heap is static: full collections skip it (module doc)
    uv = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(config.shutdown_timeout),
        access_log=False,  # ours (serve/access_log.py) logs at the end of a response, with token counts
    )
    server = uvicorn.Server(uv)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal under the previous
    # handlers: make that a clean exit (status 0) instead of a KeyboardInterrupt traceback / death by signal.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_cleanly) if main else None
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        serving.close_server(state.worker)  # release the other ranks (multi-process serving)


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)
