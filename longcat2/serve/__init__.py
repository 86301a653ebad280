"""OpenAI- and Anthropic-compatible API server with continuous batching (`longcat2 serve`).

    from longcat2.serve import ServerConfig, create_app, load_state, run_server

Modules: `protocol` (request models, error bodies), `core` (shared state, prompts, generation events),
`openai_api` / `anthropic_api` (the two front ends), `batching` (engine thread, queue, cancellation,
metrics), `sse` (event-stream formatting), `app` (FastAPI app + uvicorn), `cli` (`longcat2 serve`).
"""

from longcat2.serve.app import ServeError, create_app, load_state, run_server
from longcat2.serve.batching import EngineWorker, Metrics
from longcat2.serve.core import ServerConfig, ServerState

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
