"""`create_app(proc, model, eos, model_id=..., options=...)`: the FastAPI app of `molmoe serve`.

    POST /v1/chat/completions   OpenAI's chat completions (streaming with SSE), + points
    GET  /v1/models             the one served model
    GET  /health                no auth; 503 while shutting down
    GET  /metrics               Prometheus text format (molmoe.serve.metrics)
    GET  /                      the pointing page (molmoe/serve/static/index.html), if shipped

Every error is OpenAI's JSON shape {"error": {"message", "type", "param", "code"}}; bad input is
a 4xx, never a 500. Threads and queues are described in molmoe/serve/worker.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import pathlib
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from molmoe.errors import MolmoeError
from molmoe.generation import GenerationConfig
from molmoe.generation.detok import EOS_STRING
from molmoe.points import parse_points
from molmoe.serve.metrics import Metrics
from molmoe.serve.options import ServeOptions
from molmoe.serve.schemas import APIError, ChatRequest, parse_chat_request, single_turn
from molmoe.serve.worker import EngineWorker, Job

STATIC = pathlib.Path(__file__).resolve().parent / "static"
log = logging.getLogger("molmoe.serve")
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "length": "length"}


def create_app(proc, model, eos: int | None, *, model_id: str,
               options: ServeOptions | None = None) -> FastAPI:
    options = options or ServeOptions()
    metrics = Metrics()
    worker = EngineWorker(proc, model, eos, options, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        worker.start()
        try:
            yield
        finally:
            await worker.shutdown()

    app = FastAPI(title="molmoe", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker, app.state.metrics, app.state.options = worker, metrics, options
    if options.api_key is not None:
        app.add_middleware(_APIKeyGuard, api_key=options.api_key)

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return _error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _bug(_request, e: Exception):  # a bug in molmoe: logged, answered in OpenAI's shape
        log.error("unhandled error", exc_info=e)
        return _error_response(APIError(500, f"internal error: {type(e).__name__}"))

    @app.get("/health")
    async def health():
        if not worker.accepting or not worker.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model",
                                            "created": 0, "owned_by": "molmoe"}]}

    @app.get("/metrics")
    async def prometheus():
        metrics.set_depth(*worker.depth())
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        index = STATIC / "index.html"
        if not index.is_file():
            raise APIError(404, "the pointing page is not part of this build", code="not_found")
        return FileResponse(index, media_type="text/html")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            return await _chat(request, worker, metrics, options, model_id)
        except APIError as e:
            metrics.request_done("cancelled" if e.status == 499 else str(e.status))
            raise

    return app


# ----------------------------------------------------------------------------- chat completions


async def _chat(request: Request, worker: EngineWorker, metrics: Metrics, options: ServeOptions,
                model_id: str):
    body = await _read_body(request, options.max_body_bytes, options.body_timeout_s)
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") \
            from None
    req = parse_chat_request(doc)
    text, image_url = single_turn(req)
    config = _generation_config(req, text, options)
    job = worker.admit(label=f"request {secrets.token_hex(4)}")
    job.config, job.stream = config, bool(req.stream)
    submitted = False
    try:
        await worker.prepare(job, text, image_url)
        worker.submit(job)
        submitted = True
        event = await job.events.get()  # "accepted", or "done" with the error of submit
        if event[0] == "done":
            raise event[2]
    except BaseException:
        if submitted:  # the engine frees its admission when it reports the cancel
            worker.cancel(job)
        else:  # it never reached the engine
            job.release()
        raise
    ids = (f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), model_id)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(job, worker, metrics, ids, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(request, job, worker, metrics, ids)


def _generation_config(req: ChatRequest, text: str, options: ServeOptions) -> GenerationConfig:
    max_new = req.max_completion_tokens or req.max_tokens or options.default_max_tokens
    if max_new > options.max_tokens_limit:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{param}={max_new} is above this server's limit of "
                            f"{options.max_tokens_limit} (molmoe serve --max-tokens-limit)",
                       param=param, code="max_tokens_too_large")
    temperature = req.temperature or 0.0  # absent or 0: greedy, as `molmoe generate`
    try:
        for s in [*req.stops, text]:
            s.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "a string holds a lone surrogate (not valid Unicode text)") from None
    try:
        return GenerationConfig(max_new_tokens=max_new, do_sample=temperature > 0,
                                temperature=temperature if temperature > 0 else 1.0,
                                top_p=req.top_p if temperature > 0 else None, seed=req.seed,
                                stop_strings=(EOS_STRING, *req.stops))
    except MolmoeError as e:
        raise APIError(400, str(e)) from None


async def _complete(request: Request, job: Job, worker: EngineWorker, metrics: Metrics, ids):
    """Non-streaming: wait for the answer; a client that disconnects cancels its request."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(job.events.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                worker.cancel(job)
                metrics.request_done("cancelled")
                return JSONResponse(APIError(499, "client disconnected").body(), 499)
            event = get.result()
            if event[0] == "done":
                break
    finally:
        gone.cancel()
    _, result, error = event
    if error is not None:
        raise _as_api_error(error)
    metrics.request_done("200")
    cid, created, model_id = ids
    message = {"role": "assistant", "content": result.text, **_points(result.text, job)}
    return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH_REASONS.get(result.finish_reason, "stop")}],
            "usage": _usage(job, result)}


async def _sse(job: Job, worker: EngineWorker, metrics: Metrics, ids, include_usage: bool):
    """Streaming: role delta, content deltas, a final chunk with finish_reason (and points),
    the usage chunk if asked, then [DONE]. A closed connection cancels the generator (Starlette
    cancels it on http.disconnect): the request is cancelled on the engine thread."""
    cid, created, model_id = ids
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish=None, **more) -> str:
        doc = {"id": cid, "object": "chat.completion.chunk", "created": created,
               "model": model_id, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                               "finish_reason": finish, **more}], **extra}
        return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"

    status = "cancelled"
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if event[0] == "text":
                yield chunk({"content": event[1]})
                continue
            if event[0] != "done":
                continue
            _, result, error = event
            if error is not None:
                e = _as_api_error(error)
                status = str(e.status)
                yield f"data: {json.dumps(e.body())}\n\n"
            else:
                status = "200"
                yield chunk({}, FINISH_REASONS.get(result.finish_reason, "stop"),
                            **_points(result.text, job))
                if include_usage:
                    doc = {"id": cid, "object": "chat.completion.chunk", "created": created,
                           "model": model_id, "choices": [], "usage": _usage(job, result)}
                    yield f"data: {json.dumps(doc)}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        if not job.finished:
            worker.cancel(job)
        metrics.request_done(status)


def _points(text: str, job: Job) -> dict:
    """The answer's points in pixels of the original image (none without an image), and the
    stated count when the answer states one."""
    answer = parse_points(text)
    out = {"points": answer_points(answer, job.original_size)}
    if answer.count is not None:
        out["count"] = answer.count
    return out


def answer_points(answer, size: tuple[int, int] | None) -> list[dict]:
    """[{"x", "y", "label"}] in pixels of an image of size (W, H); [] without an image."""
    if size is None:
        return []
    return [{"x": x, "y": y, "label": g.label} for g in answer.groups
            for x, y in g.pixels(size)]


def _usage(job: Job, result) -> dict:
    n = result.timings.new_tokens
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": n,
            "total_tokens": job.prompt_tokens + n}


def _as_api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    return APIError(500, f"generation failed: {error}", code="generation_error")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so the next
    ASGI message is http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes: from Content-Length before
    reading, and while reading (a chunked body has no length). It must arrive within `timeout_s`
    (408 after: a client dripping its body would hold the request forever); a client that
    closes its connection meanwhile is a cancel (499, logged only), not an internal error."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise APIError(400, "Content-Length is not a number") from None
        if too_big:
            raise APIError(413, f"the request body is {declared} bytes, the limit is {limit} "
                                "(molmoe serve --max-body-bytes)", code="body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"the request body is over the limit of {limit} bytes "
                                        "(molmoe serve --max-body-bytes)", code="body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s",
                       code="body_timeout") from None
    except ClientDisconnect:
        raise APIError(499, "the client disconnected while sending its body",
                       code="client_disconnected") from None
    return b"".join(chunks)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# Paths open without the key: the health probe, and the pointing page itself (static HTML
# holding no data; a browser cannot send a bearer header to load it, and the page sends the key
# the user types with every API call it makes).
OPEN_PATHS = frozenset({"/health", "/"})


class _APIKeyGuard:
    """Pure ASGI (streaming and disconnects pass untouched): `Authorization: Bearer KEY` on every
    path but OPEN_PATHS, compared in constant time."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                response = _error_response(APIError(
                    401, "missing or wrong API key (Authorization: Bearer KEY)",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
