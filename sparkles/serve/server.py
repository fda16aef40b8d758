"""The OpenAI-compatible HTTP server: GET /v1/models, POST /v1/chat/completions (JSON and SSE), GET /health,
GET /metrics (Prometheus).

An I/O edge: it reads bodies within a server-wide budget (inflight.py), checks requests, loads images by the
server's rules (images.py), hands conversations to the batching `Engine`, and answers every error with OpenAI's
error body. fastapi and uvicorn are imported inside functions."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..conversation import Conversation
from ..engine import ROW_FAILED, Engine, EngineClosedError, EngineConfig, QueueFullError
from ..errors import ConfigError, ContextLengthError, ImageLoadError, ImageTimeoutError, SparklesError
from ..image_cache import ImageCache
from .images import allowed_path, fetch_image, load_request_images, load_source, peek_pixels  # noqa: F401
from .inflight import BodyBudget, read_json
from .limits import Workers, check_text, release_memory, text_limit
from .metrics import CONTENT_TYPE, ServerMetrics
from .requests import ApiError, ChatRequest, check_conversation, parse_request  # noqa: F401 (ApiError: re-exported)

log = logging.getLogger(__name__)
MAX_STRUCTURE = 100_000  # JSON values a body may hold besides its text's commas and brackets (inflight.check_values)


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "sparkles"  # the id clients pass as `model`; any other id is a 404
    allowed_image_dir: str | None = None  # local image files are readable only under this folder; None = none
    allow_http: bool = False  # fetch http(s) image URLs (public addresses only)
    max_images: int | None = None  # per request; None = the model's own max_images
    max_image_bytes: int = 20 * 2**20  # per image, as sent (before decoding)
    max_image_pixels: int = 4096 * 4096  # per image, width * height
    max_request_pixels: int = 4 * 4096 * 4096  # all images of a request, decoded (PIL holds RGB in 4 B: 256 MiB)
    max_text_chars: int | None = None  # text per request; None = what can fit max_seq_len (see limits.text_limit)
    workers: int = 4  # requests prepared at once (images read and decoded, text tokenized), each in a thread
    max_waiting: int = 16  # requests waiting for a worker; past this, or after worker_wait seconds, a 503
    worker_wait: float = 30.0  # seconds a request may wait for a worker
    degraded_after: float = 5.0  # /health says "degraded" once a request waited this long or every worker is stuck
    max_body_bytes: int = 64 * 2**20  # the whole request body
    max_body_in_flight: int = 256 * 2**20  # bytes of all bodies being read, parsed or prepared at once (inflight.py)
    body_wait: float = 5.0  # seconds a body may wait for room in that budget before a 503
    body_timeout: float = 60.0  # seconds for a whole body to arrive before a 408 (a client dripping bytes)
    image_timeout: float = 30.0  # seconds for all images of one request, read and decoded, before a 504
    light_pixels: int = 2**20  # requests whose data: images say they have fewer pixels than this in all have a
    #   worker thread of their own, so that requests of large images cannot make them wait (_prepare); 0 = none
    http_timeout: float = 10.0  # seconds for one image download, redirects included
    default_max_tokens: int = 512  # when a request names no max_tokens (cut to the room left in the context)
    max_batch: int = 8  # rows the engine decodes together (when the server builds the engine)
    max_queue: int = 64  # requests waiting to join the batch; past this the server answers 429
    prefix_cache_mb: float = 1024  # KV of recent prompts, to resume requests that start alike (their history); 0 = off
    image_cache_mb: float = 256  # images decoded, preprocessed and encoded, by content hash (image_cache.py); 0 = off


# The app


def create_app(chat_or_engine, config: ServeConfig = ServeConfig()):
    """The ASGI app over an `Engine` (given a `Chat`, it builds one); the engine closes when the app shuts down."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from starlette.exceptions import HTTPException

    # A Chat's own prompt lookup (`sparkles serve --lookahead K`) goes to its engine's lone greedy rows.
    engine = chat_or_engine if isinstance(chat_or_engine, Engine) else \
        Engine.from_chat(chat_or_engine, EngineConfig(config.max_batch, config.max_queue, config.prefix_cache_mb,
                                                      getattr(chat_or_engine, "lookahead", 0)))

    workers = Workers(config.workers, max_waiting=config.max_waiting, max_wait=config.worker_wait,
                      degraded_after=config.degraded_after)
    light = Workers(1, max_waiting=config.max_waiting, max_wait=config.worker_wait,
                    degraded_after=config.degraded_after)
    bodies = BodyBudget(config.max_body_in_flight, max_body=config.max_body_bytes)
    if not (config.body_timeout > 0 and config.image_timeout > 0 and config.body_wait >= 0):
        raise ConfigError(f"--body-timeout and --image-timeout must be > 0 and body_wait >= 0, got "
                          f"{config.body_timeout}, {config.image_timeout} and {config.body_wait}")

    @asynccontextmanager
    async def lifespan(app):  # the engine and the workers stop with the app
        yield
        workers.close()
        light.close()
        await asyncio.to_thread(engine.close)

    # No /docs: its page pulls scripts from a CDN, and the server must work offline.
    app = FastAPI(title="Sparkles", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config, app.state.created = engine, config, int(time.time())
    app.state.workers, app.state.light, app.state.bodies = workers, light, bodies
    app.state.images = ImageCache(int(config.image_cache_mb * 2**20)) if config.image_cache_mb > 0 else None
    engine.chat.image_cache = app.state.images  # the engine's own Chat: what one request made serves the next
    app.state.metrics = ServerMetrics(config.model_name, engine, workers, light, bodies, app.state.images)
    app.state.max_text_chars = config.max_text_chars or text_limit(engine.processor.config.max_seq_len,
                                                                   engine.processor.tokenizer)
    app.add_route("/health", _health, methods=["GET"])
    app.add_route("/metrics", _metrics, methods=["GET"])
    app.add_route("/v1/models", _models, methods=["GET"])
    app.add_route("/v1/chat/completions", _completions, methods=["POST"])
    app.add_exception_handler(HTTPException, lambda http, e: _error_response(ApiError(e.status_code, e.detail)))
    return app


def _json(body: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse
    return JSONResponse(body, status_code=status, headers=headers)


async def _health(http):
    """200 "ok"; or 503 "stopped" (the engine thread died) or "degraded" (requests wait too long for a worker, or
    every worker has been stuck too long), so that a load balancer sends new requests elsewhere until it is ok."""
    state = http.app.state
    engine, workers, light = state.engine, state.workers.stats(), state.light.stats()
    status = "stopped" if not engine.alive else "degraded" if workers["degraded"] or light["degraded"] else "ok"
    images = state.images.stats() if state.images is not None else None
    return _json({"status": status, **engine.stats(), "image_cache": images, "preparing": workers,
                  "preparing_light": light, "bodies": state.bodies.stats()}, 200 if status == "ok" else 503)


async def _metrics(http):
    from starlette.responses import Response
    return Response(http.app.state.metrics.text(), media_type=CONTENT_TYPE)


async def _models(http):
    state = http.app.state
    card = {"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "sparkles",
            "max_model_len": state.engine.processor.config.max_seq_len}
    return _json({"object": "list", "data": [card]})


async def _completions(http):
    from starlette.responses import StreamingResponse

    arrived, metrics = time.monotonic(), http.app.state.metrics
    try:
        handle, stream, include_usage = await _prepare(http, http.app.state)
    except Exception as e:  # every failure becomes an OpenAI error body; only ours carry their message
        response = _error_response(e)
        metrics.refuse(response.status_code)
        return response
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": http.app.state.config.model_name}

    def ended(last):
        metrics.finish(handle, arrived, last)

    if stream:
        return StreamingResponse(_sse(handle, include_usage, meta, ended), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(handle, http, meta, ended)


async def _prepare(http, state):
    """Read, check and start one request, holding its body's bytes of the server's budget until its images are
    decoded and its text tokenized. What it returns keeps no reference to the body, so that its memory goes while
    the answer is generated."""
    from ..formats import from_openai

    engine, config = state.engine, state.config
    lease = state.bodies.lease()
    try:
        raw = await read_json(http, lease, limit=config.max_body_bytes, timeout=config.body_timeout,
                              wait=config.body_wait, max_values=state.max_text_chars + MAX_STRUCTURE)
        request = parse_request(raw, config.model_name)
        # Cheap checks first, on the event loop: they walk the parts, never the text, so nothing waits for a worker
        # (or tokenizes 50 MB) to be told no.
        conversation = from_openai(request.messages)
        check_conversation(conversation)
        check_text(conversation, state.max_text_chars)
        if engine.full():  # refuse before decoding any image
            raise QueueFullError("too many requests are waiting; try again shortly")
        # The images have `image_timeout` in all (images.py); past twice that (plus a second for the tokenizing)
        # the thread is stuck in one blocking read or decode: the request gets its 504 and a late start is cancelled.
        # A request of a few small images (most) has a thread of its own: a queue of 4096² PNGs, decoding for
        # seconds each, would otherwise be ahead of it. Files and URLs may block, so they go with the heavy ones.
        max_images = config.max_images or engine.processor.config.max_images
        pixels = peek_pixels(conversation, max_images)
        pool = state.light if pixels is not None and pixels < config.light_pixels else state.workers
        handle = await pool.run(_start, engine, request, conversation, config, asyncio.get_running_loop(),
                                timeout=2 * config.image_timeout + 1, on_late=lambda late: late.cancel())
        return handle, request.stream, request.include_usage
    finally:
        lease.release()


def _start(engine: Engine, request: ChatRequest, conversation: Conversation, config: ServeConfig, loop):
    """Load, render and submit (in a worker thread: images decode here, not on the event loop)."""
    max_images = config.max_images or engine.processor.config.max_images
    try:
        loaded = load_request_images(conversation, config, max_images, cache=engine.chat.image_cache)
        encoded = engine.encode(loaded)
    finally:
        if conversation.slots:  # the decoded pixels are garbage now, refused or not
            release_memory()
    params = replace(request.params, max_new_tokens=request.max_tokens or config.default_max_tokens)
    return engine.submit(encoded, params, strict=request.max_tokens is not None, ignore_eos=request.ignore_eos,
                         loop=loop)


# What each failure answers, first match wins: (class, status, OpenAI type, code, param).
_ERRORS = ((ContextLengthError, 400, "invalid_request_error", "context_length_exceeded", "messages"),
           (ImageTimeoutError, 504, "server_error", "timeout", "messages"),
           (ImageLoadError, 400, "invalid_request_error", "invalid_image", "messages"),
           (SparklesError, 400, "invalid_request_error", None, "messages"),
           (QueueFullError, 429, "rate_limit_error", "queue_full", None),
           (EngineClosedError, 503, "server_error", "unavailable", None),
           (Exception, 500, "server_error", None, None))  # a bug of ours: logged, and no traceback leaves


def _error_response(e: Exception):
    if not isinstance(e, ApiError):
        _, status, kind, code, param = next(row for row in _ERRORS if isinstance(e, row[0]))
        if status == 500:
            log.error("internal error while handling a request", exc_info=e)
        e = ApiError(status, str(e) if status != 500 else "internal server error; see the server log", kind=kind,
                     code=code, param=param)
    message = str(e).encode("utf-8", "backslashreplace").decode("utf-8")  # it may quote text that is not Unicode
    body = {"error": {"message": message, "type": e.kind, "param": e.param, "code": e.code}}
    # 408 and 413 may leave part of the body unread: the connection cannot carry another request.
    headers = {"Retry-After": "1"} if e.status in (429, 503) else {"Connection": "close"} if e.status in (408, 413) \
        else None
    return _json(body, e.status, headers)


async def _complete(handle, http, meta: dict, ended):
    """Gather the whole answer; a client that hangs up cancels its generation. `ended(last event or None)` at the
    end, for the metrics."""

    async def watch():
        while (await http.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()

    watcher, pieces, last = asyncio.create_task(watch()), [], None
    try:
        async for last in handle.events():
            pieces.append(last.text)
    finally:
        watcher.cancel()
        handle.cancel()
        ended(last)
    if last.error and last.error.startswith(ROW_FAILED):  # this request alone failed: retrying will not help
        return _error_response(ApiError(500, last.error, kind="server_error"))
    if last.finish_reason in ("error", "cancelled"):
        return _error_response(EngineClosedError(last.error or "the request was cancelled"))
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
              "finish_reason": last.finish_reason, "logprobs": None}
    return _json({**meta, "object": "chat.completion", "choices": [choice], "usage": last.usage})


async def _sse(handle, include_usage: bool, meta: dict, ended):
    """`chat.completion.chunk` events ending in ``data: [DONE]``; leaving early (a disconnect) cancels generation.
    `ended(final event, or None where the client left first)` at the end, for the metrics."""

    def data(delta: dict | None, finish: str | None = None, **extra) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        return "data: " + json.dumps({**meta, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    last = None
    try:
        yield data({"role": "assistant", "content": ""})
        async for event in handle.events():
            last = event if event.finish_reason else None
            if event.text:
                yield data({"content": event.text})
            if event.finish_reason in ("error", "cancelled"):  # the stream has begun: the error goes in it
                yield "data: " + json.dumps({"error": {"message": event.error or "cancelled", "type": "server_error",
                                                       "param": None, "code": None}}) + "\n\n"
            elif event.finish_reason:
                yield data({}, event.finish_reason)
                if include_usage:  # OpenAI's form: one more chunk, with no choices
                    yield data(None, usage=event.usage)
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()
        ended(last)


# The command


def add_cli(commands) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-compatible server: /v1/chat/completions, /v1/models, "
                                               "/health, /metrics")
    serve.add_argument("--model", default=None, help="checkpoint folder, or 'default' (the embedded model)")
    serve.add_argument("--served-model-name", dest="model_name", default="sparkles", help="the model id clients send")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--allowed-image-dir", metavar="DIR", help="image paths and file:// URLs: only in this folder")
    serve.add_argument("--allow-http", action="store_true", help="fetch http(s) image URLs (public addresses only)")
    serve.add_argument("--max-images", type=int, default=None, help="images per request (default: the model's)")
    serve.add_argument("--max-image-pixels", type=int, default=ServeConfig.max_image_pixels, help="width × height")
    serve.add_argument("--max-request-pixels", type=int, default=ServeConfig.max_request_pixels,
                       help="decoded pixels of all images of one request")
    serve.add_argument("--max-text-chars", type=int, default=None,
                       help="characters of text per request (default: what can fit the model's context)")
    serve.add_argument("--workers", type=int, default=ServeConfig.workers,
                       help="requests whose images and text are prepared at once")
    serve.add_argument("--worker-wait", type=float, default=ServeConfig.worker_wait,
                       help="seconds a request may wait for a worker before a 503")
    serve.add_argument("--max-body-in-flight", type=int, default=ServeConfig.max_body_in_flight, metavar="BYTES",
                       help="bytes of request bodies read or prepared at once; past it a request waits, then 503")
    serve.add_argument("--body-timeout", type=float, default=ServeConfig.body_timeout,
                       help="seconds for a request body to arrive before a 408")
    serve.add_argument("--image-timeout", type=float, default=ServeConfig.image_timeout,
                       help="seconds to read and decode all images of one request before a 504")
    serve.add_argument("--max-batch", type=int, default=ServeConfig.max_batch, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=ServeConfig.max_queue, help="waiting requests before 429")
    serve.add_argument("--max-tokens", dest="default_max_tokens", type=int, default=ServeConfig.default_max_tokens,
                       help="when a request has none")
    serve.add_argument("--prefix-cache-mb", type=float, default=ServeConfig.prefix_cache_mb, help="0 turns it off")
    serve.add_argument("--image-cache-mb", type=float, default=ServeConfig.image_cache_mb,
                       help="images decoded, preprocessed and encoded, kept for requests that send them again; 0: off")
    serve.add_argument("--lookahead", type=int, default=0, metavar="K",
                       help="a request decoded alone and greedily checks K tokens guessed from the conversation a step")
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    serve.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    serve.set_defaults(run=_run, system=None)


def _run(args) -> int:
    import uvicorn

    from ..cli import load_chat

    if args.allowed_image_dir is not None and not Path(args.allowed_image_dir).is_dir():
        raise ConfigError(f"--allowed-image-dir {args.allowed_image_dir} is not a folder")
    config = ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig) if hasattr(args, f.name)})
    app = create_app(load_chat(args), config)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=5))
    # On Ctrl-C or SIGTERM the engine stops first, so that open streams end at once with an error and [DONE].
    stop = server.handle_exit
    server.handle_exit = lambda sig, frame: (app.state.engine.close(timeout=0), stop(sig, frame))
    print(f"Sparkles serves {config.model_name!r} at http://{args.host}:{args.port}/v1 (Ctrl-C stops it)")
    server.run()
    return 0
