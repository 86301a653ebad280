"""OpenAI- and Anthropic-compatible API server with continuous batching (`longcat2 serve`).

    from longcat2.serve import ServerConfig, create_app, load_state, run_server

Modules: `protocol` (request models, error bodies), `core` (shared state, prompts, generation events),
`openai_api` / `responses_api` / `anthropic_api` (the front ends), `reply_grammar` (constrained replies),
`worker` (the engine thread: queue, cancellation, metrics), `access_log`, `sse` (event-stream formatting),
`app` (FastAPI app + uvicorn), `cli` (`longcat2 serve`).
"""

from longcat2.serve.app import ServeError, create_app, load_state, run_server
from longcat2.serve.core import ServerConfig, ServerState
from longcat2.serve.worker import EngineWorker, Metrics

__all__ = [
    "EngineWorker",
    "Metrics",
    "ServeError",
    "ServerConfig",
    "ServerState",
    "create_app",
    "load_state",
    "run_server",
]
