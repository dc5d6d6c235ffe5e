"""The FastAPI application of ``gptkit serve`` (imported only once FastAPI is known to be installed): routes, bearer auth, the body-size cap and JSON errors.

Every route only reads the request (:mod:`gptkit.serve.requests`), hands a job to the engine
(:mod:`gptkit.serve.engine`) and turns its events into a response; nothing here touches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gptkit.modeling import is_encoder_decoder
from gptkit.serve import requests as rq
from gptkit.serve.engine import Engine, Job
from gptkit.serve.requests import ApiError, Limits, Served

log = logging.getLogger("gptkit")

def build_app(served: Served, engine: Engine, limits: Limits):
    """The ASGI app (FastAPI inside the body-size cap)."""
    app = FastAPI(title=f"gptkit serve: {served.name}", docs_url=None, redoc_url=None, openapi_url=None)
    card = {"id": served.name, "object": "model", "created": int(time.time()), "owned_by": "gptkit"}

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        status, detail, headers = exc.status_code, exc.detail, None
        allowed = _allowed(served, request.url.path)
        if status == 405 and not allowed:  # /v1/{task} matched a path that is no route: GET /v1/nope
            status, detail = 404, "Not Found"
        message = f"{request.method} {request.url.path}: {detail}"
        if status == 404:
            message += f" (routes: {', '.join(_routes(served))})"
        elif status == 405:
            message += f" (allowed: {', '.join(allowed)})"
            headers = {"Allow": ", ".join(allowed)}
        return JSONResponse(ApiError(status, message).body(), status_code=status, headers=headers)

    @app.exception_handler(_Gone)
    async def gone(request, exc: _Gone):
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")

    @app.exception_handler(Exception)
    async def bug(request, exc: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if limits.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {limits.api_key}".encode()):
                err = ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                               kind="authentication_error", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "requests": engine.jobs, "batches": engine.batches}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if not model:  # /v1/models/
            return await models()
        if model != served.name:
            raise ApiError(404, f"model: '{model}' is not served here; this server serves '{served.name}'", "model",
                           code="model_not_found")
        return card

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request, served, limits.max_body)
        return await _complete(request, served, engine, limits, body, rq._prompts(body), "text", ())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _body(request, served, limits.max_body)
        prompt, stops = rq.chat_prompt(served.tok, body.get("messages"), is_encoder_decoder(served.model.config))
        return await _complete(request, served, engine, limits, body, [prompt], "chat", stops)

    @app.post("/v1/{task}")
    async def task(task: str, request: Request):
        if task not in served.tasks:
            if _allowed(served, request.url.path):  # POST /v1/models: a route, by another method
                raise HTTPException(405, "Method Not Allowed")
            raise ApiError(404, f"POST /v1/{task}: not served (routes: {', '.join(_routes(served))})",
                           code="not_found")
        rows = rq.task_rows(task, await _body(request, served, limits.max_body, check_model=False))
        q, send = rq.channel()
        job = Job(send, task=task, rows=rows)
        engine.submit(job)
        async with _answering(request, job) as next_event:
            event = await next_event(q)
        if event[0] == "error":
            raise ApiError(event[1], event[2], kind="server_error")
        data = [{"index": i, **_finite(r)} for i, r in enumerate(event[1])]
        return {"object": "list", "model": served.name, "task": task, "data": data}

    return _BodyLimit(app, limits.max_body)


def _routes(served: Served) -> list[str]:
    lm = ["POST /v1/completions", "POST /v1/chat/completions"] if served.lm else []
    return ["GET /v1/models", *lm, *(f"POST /v1/{t}" for t in served.tasks)]


def _allowed(served: Served, path: str) -> list[str]:
    """The methods a served path answers (none: the path is no route)."""
    routes = ["GET /health", *_routes(served), f"GET /v1/models/{served.name}"]
    return [r.split(" ", 1)[0] for r in routes if r.split(" ", 1)[1] == path]


def _finite(row: dict) -> dict:
    """JSON has no -inf: an extractive answer that found no span has score null."""
    return {k: (None if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")) else v)
            for k, v in row.items()}


async def _body(request, served: Served, limit: int, check_model: bool = True) -> dict:
    """The request's JSON object, read as it arrives: past ``limit`` bytes a 413 (a chunked body has no
    Content-Length for :class:`_BodyLimit` to refuse it by)."""
    chunks, seen = [], 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "body: not valid JSON", "body") from None
    except RecursionError:  # [[[[...]]]]: Python's parser recurses per level
        raise ApiError(400, "body: JSON nested too deeply", "body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body: expected a JSON object", "body")
    if check_model:
        if not served.lm:
            raise ApiError(400, f"{request.url.path}: {served.name} is a {served.run.task} model with a task head; "
                                f"use POST /v1/{next(iter(served.tasks))}", code="not_a_language_model")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"model: expected a string, got {json.dumps(model)[:40]}", "model")
        if model is not None and model != served.name:
            raise ApiError(404, f"model: '{model}' is not served here; this server serves '{served.name}'", "model",
                           code="model_not_found")
    return body


async def _complete(request, served, engine, limits, body, prompts, kind, stops):
    q, send = rq.channel()
    job, prompt_tokens = rq.generation_job(served, limits, body, prompts, send, stops, chat=kind == "chat")
    rid = rq.new_id(kind)
    engine.submit(job)
    if job.stream:
        usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
        return StreamingResponse(_sse(q, job, kind, rid, served.name, prompt_tokens, bool(usage)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    finished, tokens = {}, 0
    async with _answering(request, job) as next_event:
        while len(finished) < len(job.choices):
            event = await next_event(q)
            if event[0] == "error":
                raise ApiError(event[1], event[2], kind="server_error")
            if event[0] == "finish":
                _, index, text, reason, n = event
                finished[index], tokens = (text, reason), tokens + n
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
    return rq.completion_body(kind, rid, served.name, finished, usage)


class _Gone(Exception):
    """The client disconnected before its answer was ready."""


@contextlib.asynccontextmanager
async def _answering(request, job: Job):
    """Yields ``next_event(q)``, the job's next event while the client waits for it. Starlette does not cancel a
    handler whose client went away: the job is cancelled here (its rows stop at the next token), whether the client
    left, the handler failed, or the wait ended for any other reason before the answer was whole."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":  # the body was read: only a disconnect comes
            pass

    gone = asyncio.ensure_future(disconnected())

    async def next_event(q: asyncio.Queue):
        get = asyncio.ensure_future(q.get())
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            raise _Gone
        return get.result()

    answered = False
    try:
        yield next_event
        answered = True
    except _Gone:
        log.info("serve: a client went away before its answer; its request was stopped")
        raise
    finally:
        gone.cancel()
        job.cancelled = not answered


async def _sse(q, job: Job, kind: str, rid: str, name: str, prompt_tokens: int, include_usage: bool):
    """Server-sent events: a chunk per piece of text, the finish reason per choice, optional usage, [DONE]."""
    open_choices, tokens, started, created = len(job.choices), 0, set(), int(time.time())
    try:
        while open_choices:
            event = await q.get()
            if event[0] == "error":
                yield f"data: {json.dumps(ApiError(event[1], event[2], kind='server_error').body())}\n\n"
                break
            index, text = event[1], event[2]
            reason = event[3] if event[0] == "finish" else None
            if event[0] == "finish":
                open_choices, tokens = open_choices - 1, tokens + event[4]
            chunk = rq.completion_chunk(kind, rid, name, index, text, reason, index not in started, created,
                                        include_usage)
            yield f"data: {json.dumps(chunk)}\n\n"
            started.add(index)
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                     "total_tokens": prompt_tokens + tokens}
            chunk = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                     "created": created, "model": name, "choices": [], "usage": usage}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = open_choices > 0  # the client went away: its rows stop at the next token


class _TooLarge(ApiError):
    """A body over the limit: answered 413 (by the app's ApiError handler when counted as it is read)."""

    def __init__(self, limit: int):
        super().__init__(413, f"body: larger than the server's limit of {limit} bytes (--max-request-bytes)", "body")


class _BodyLimit:
    """ASGI middleware: a body whose Content-Length is over ``limit`` bytes is a 413 before anything reads it (one
    without, chunked, is counted as the route reads it: :func:`_body`)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                return await self._refuse(send)
        return await self.app(scope, receive, send)

    async def _refuse(self, send):
        body = json.dumps(_TooLarge(self.limit).body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
