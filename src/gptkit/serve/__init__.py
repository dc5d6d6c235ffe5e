"""``gptkit serve RUN``: a trained model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn, ``gptkit[serve]``).

Routes: ``GET /v1/models``; ``POST /v1/completions`` and ``POST /v1/chat/completions`` for a language model (the
tokenizer's chat template when it has one, else ``role: content`` lines ending in ``assistant:``), ``stream: true``
as server-sent events ending in ``data: [DONE]``; a fine-tuned run's task at ``POST /v1/<task>`` (classify: labels
and probabilities; extractive qa: a span of the context; translate, summarize and generative qa: the run's prompt
and decoding; a multitask run: each of its tasks). ``GET /health`` answers without a key.
Concurrent requests are batched on the model (:mod:`gptkit.serve.engine`). Bad requests get a 4xx JSON error naming
the field, in OpenAI's shape; ``--api-key`` asks for a bearer token; bodies and ``max_tokens`` are capped; SIGTERM
stops accepting connections and finishes the requests in flight.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import socket
import threading

from gptkit.errors import UserError

log = logging.getLogger(__name__)


def run(model: str, *, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
        api_key: str | None = None, max_batch: int = 32, wait_ms: float = 5.0, max_tokens: int = 1024,
        max_request_bytes: int = 1 << 20, drain_seconds: float = 30.0, generation_config: bool = True) -> None:
    """Load ``model`` and serve it until SIGINT/SIGTERM (in-flight requests finish first)."""
    try:
        import uvicorn
        import fastapi  # noqa: F401
    except ImportError:
        raise UserError("gptkit serve needs FastAPI and uvicorn: pip install 'gptkit[serve]'") from None
    from gptkit.serve.app import build_app
    from gptkit.serve.engine import Engine
    from gptkit.serve.requests import Limits, load

    for flag, value, low in (("--max-batch", max_batch, 1), ("--max-tokens", max_tokens, 1),
                             ("--max-request-bytes", max_request_bytes, 1024), ("--wait-ms", wait_ms, 0),
                             ("--drain-seconds", drain_seconds, 0)):
        if not math.isfinite(value) or value < low:  # nan passes every comparison; inf never times out
            raise UserError(f"{flag}: expected a finite number >= {low}, got {value}")
    if not 0 <= port <= 65535:  # bind() raises OverflowError, not OSError, beyond them
        raise UserError(f"--port: expected 0 (any free port) to 65535, got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise UserError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror}") from None
    served = load(model, name, use_defaults=generation_config)
    engine = Engine(served.model, served.tok, served.tasks, max_batch=max_batch, wait_ms=wait_ms).start()
    app = build_app(served, engine, Limits(max_tokens=max_tokens, max_body=max_request_bytes, api_key=api_key))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=drain_seconds,
                            lifespan="off")
    bound = sock.getsockname()[1]
    routes = ["/v1/completions", "/v1/chat/completions"] if served.lm else []
    routes += [f"/v1/{t}" for t in served.tasks]
    log.info("serving %s as '%s' at http://%s:%d (%s); batches of up to %d, %s", model, served.name, host, bound,
             ", ".join(routes), max_batch, "API key required" if api_key else "no API key")
    if served.defaults:
        log.info("sampling a request leaves out: %s (generation_config.json; --no-generation-config for OpenAI's)",
                 ", ".join(f"{k} {v}" for k, v in served.defaults.items()))
    server = _server_class()(config)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
    if server.cut:
        why = "a second signal forced the exit" if server.force_exit else f"--drain-seconds {drain_seconds:g} ran out"
        log.warning("serve: stopped; %d request(s) in flight were cut off (%s)", server.cut, why)
    else:
        log.info("serve: stopped; requests in flight were answered")


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that after a graceful SIGINT/SIGTERM shutdown the process exits 0 (uvicorn raises
        the signal again, so the process would die by it), and ``cut`` counts the requests the drain time cut off."""

        cut = 0

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets)
            self.cut = len(self.server_state.tasks)  # what it cancelled when the drain time ran out: not yet gone

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            saved = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in saved.items():
                    signal.signal(sig, handler)

    return Server
