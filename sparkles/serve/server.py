"""The OpenAI-compatible HTTP server: GET /v1/models, POST /v1/chat/completions (JSON and SSE), GET /health.

An I/O edge: it checks requests, loads images by the server's rules (data: URLs; files only in --allowed-image-dir;
http(s) only if allowed, never from private addresses), hands conversations to the batching `Engine`, and answers
every error with OpenAI's error body. fastapi and uvicorn are imported inside functions."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from ..conversation import Conversation, Image, Message
from ..engine import ROW_FAILED, Engine, EngineClosedError, EngineConfig, QueueFullError
from ..errors import ConfigError, ContextLengthError, ImageLoadError, InputError, SparklesError
from ..image import check_public_addresses
from .limits import PixelBudget, Workers, check_text, release_memory, text_limit
from .requests import ApiError, ChatRequest, check_conversation, parse_request  # noqa: F401 (ApiError: re-exported)

log = logging.getLogger(__name__)
MAX_REDIRECTS = 3


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
    http_timeout: float = 10.0  # seconds for one image download, redirects included
    default_max_tokens: int = 512  # when a request names no max_tokens (cut to the room left in the context)
    max_batch: int = 8  # rows the engine decodes together (when the server builds the engine)
    max_queue: int = 64  # requests waiting to join the batch; past this the server answers 429
    prefix_cache_mb: float = 1024  # KV of recent prompts, to resume requests that start alike (their history); 0 = off


# Images: where they may come from


def load_request_images(conversation: Conversation, config: ServeConfig, max_images: int) -> Conversation:
    """Load every image of a request under the server's rules, counting them before decoding any."""
    if (count := len(conversation.slots)) > max_images:
        raise InputError(f"too many images: {count}; this server takes at most {max_images} per request")

    budget = PixelBudget(config.max_request_pixels)  # spent from each header: the image that overdraws never decodes

    def load(part):
        if not isinstance(part, Image) or part.pixels is not None:
            return part
        loaded = load_source(part.source, config, check_size=lambda size: budget.take(size, part.name))
        return replace(part, pixels=loaded.pixels, sha256=loaded.sha256)
    messages = tuple(Message(m.role, tuple(load(p) for p in m.parts)) for m in conversation.messages)
    return replace(conversation, messages=messages)


def load_source(source: str, config: ServeConfig, check_size=None):
    """A data: URL, a file under the allowed folder (a path or file:// URL), or a public http(s) URL."""
    from ..image import load_image
    limits = {"max_bytes": config.max_image_bytes, "max_pixels": config.max_image_pixels, "check_size": check_size}
    scheme = urlsplit(source).scheme.lower()
    if scheme == "data":
        return load_image(source, **limits)
    if scheme in ("http", "https"):
        if not config.allow_http:
            raise ImageLoadError(f"cannot load image {source[:80]}: http(s) image URLs are turned off on this "
                                 "server; send the image as a data: URL (or start the server with --allow-http)")
        return load_image(fetch_image(source, max_bytes=config.max_image_bytes, timeout=config.http_timeout),
                          **limits)
    if scheme not in ("", "file"):
        raise ImageLoadError(f"cannot load image {source[:80]}: expected a data:, http(s) or file URL")
    raw = unquote(urlsplit(source).path) if scheme == "file" else source
    path = allowed_path(raw, config.allowed_image_dir)
    try:
        return load_image(str(path), **limits)
    except ImageLoadError as e:  # its message names the real path; the client sees only the one it sent
        raise ImageLoadError(str(e).replace(str(path), raw)) from None


def allowed_path(raw: str, folder: str | None) -> Path:
    """The real path of `raw` (relative to `folder`, symlinks resolved) if it lies inside `folder`."""
    if folder is None:
        raise ImageLoadError(f"cannot load image {raw[:80]}: local image files are turned off on this server; "
                             "send the image as a data: URL (or start the server with --allowed-image-dir DIR)")
    try:
        root, path = Path(folder).resolve(), (Path(folder).resolve() / raw).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # NUL bytes, symlink loops
        raise ImageLoadError(f"cannot load image {raw[:80]}: not a usable path ({e})") from None
    if not path.is_relative_to(root):
        raise ImageLoadError(f"cannot load image {raw[:80]}: the path is outside the allowed image folder")
    return path


def fetch_image(url: str, *, max_bytes: int, timeout: float, resolve=socket.getaddrinfo, transport=None) -> bytes:
    """GET an image from a public address: every hop's host is resolved, checked and pinned (no DNS rebinding)."""
    import httpx
    deadline = time.monotonic() + timeout
    with httpx.Client(transport=transport, timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            pinned, headers, extensions = _pin(url, resolve)
            try:
                with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise ImageLoadError(f"cannot fetch image {url[:80]}: HTTP {response.status_code}")
                    data = bytearray()
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > max_bytes or time.monotonic() > deadline:  # also a server dripping bytes
                            raise ImageLoadError(f"cannot fetch image {url[:80]}: over {max_bytes} B or {timeout} s")
                    return bytes(data)
            except httpx.HTTPError as e:
                raise ImageLoadError(f"cannot fetch image {url[:80]}: {type(e).__name__}") from None
    raise ImageLoadError(f"cannot fetch image {url[:80]}: more than {MAX_REDIRECTS} redirects")


def _pin(url: str, resolve) -> tuple[str, dict, dict]:
    """The URL with its host replaced by a checked public IP, plus the Host header and TLS name to keep."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise ImageLoadError(f"cannot fetch image {url[:80]}: expected an http(s) URL with a host and no user info")
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0])
                     for info in resolve(parts.hostname, port, type=socket.SOCK_STREAM)]
    except (OSError, ValueError) as e:
        raise ImageLoadError(f"cannot fetch image {url[:80]}: cannot resolve {parts.hostname} ({e})") from None
    # Every address must be public after unwrapping any IPv4 embedded in IPv6 (mapped, NAT64, 6to4, Teredo, …).
    check_public_addresses(parts.hostname, addresses)
    ip = str(addresses[0]) if addresses[0].version == 4 else f"[{addresses[0]}]"
    extensions = {"sni_hostname": parts.hostname} if parts.scheme.lower() == "https" else {}
    return parts._replace(netloc=f"{ip}:{port}").geturl(), {"Host": parts.netloc}, extensions


# The app


def create_app(chat_or_engine, config: ServeConfig = ServeConfig()):
    """The ASGI app over an `Engine` (given a `Chat`, it builds one); the engine closes when the app shuts down."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from starlette.exceptions import HTTPException

    engine = chat_or_engine if isinstance(chat_or_engine, Engine) else \
        Engine.from_chat(chat_or_engine, EngineConfig(config.max_batch, config.max_queue, config.prefix_cache_mb))

    workers = Workers(config.workers, max_waiting=config.max_waiting, max_wait=config.worker_wait,
                      degraded_after=config.degraded_after)

    @asynccontextmanager
    async def lifespan(app):  # the engine and the workers stop with the app
        yield
        workers.close()
        await asyncio.to_thread(engine.close)

    # No /docs: its page pulls scripts from a CDN, and the server must work offline.
    app = FastAPI(title="Sparkles", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config, app.state.created = engine, config, int(time.time())
    app.state.workers = workers
    app.state.max_text_chars = config.max_text_chars or text_limit(engine.processor.config.max_seq_len,
                                                                   engine.processor.tokenizer)
    app.add_route("/health", _health, methods=["GET"])
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
    engine, workers = http.app.state.engine, http.app.state.workers.stats()
    status = "stopped" if not engine.alive else "degraded" if workers["degraded"] else "ok"
    return _json({"status": status, **engine.stats(), "preparing": workers}, 200 if status == "ok" else 503)


async def _models(http):
    state = http.app.state
    card = {"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "sparkles",
            "max_model_len": state.engine.processor.config.max_seq_len}
    return _json({"object": "list", "data": [card]})


async def _completions(http):
    from starlette.responses import StreamingResponse

    from ..formats import from_openai

    state = http.app.state
    engine, config = state.engine, state.config
    try:
        request = parse_request(await _read_json(http, config.max_body_bytes), config.model_name)
        # Cheap checks first, on the event loop: they walk the parts, never the text, so nothing waits for a worker
        # (or tokenizes 50 MB) to be told no.
        conversation = from_openai(request.messages)
        check_conversation(conversation)
        check_text(conversation, state.max_text_chars)
        if engine.full():  # refuse before decoding any image
            raise QueueFullError("too many requests are waiting; try again shortly")
        handle = await state.workers.run(_start, engine, request, conversation, config, asyncio.get_running_loop())
    except Exception as e:  # every failure becomes an OpenAI error body; only ours carry their message
        return _error_response(e)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
    if request.stream:
        return StreamingResponse(_sse(handle, request, meta), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(handle, http, meta)


async def _read_json(http, limit: int) -> Any:
    body = bytearray()
    async for chunk in http.stream():  # counted as it comes: a chunked body has no length, and a length can lie
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit} bytes", code="too_large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:120]}") from None


def _start(engine: Engine, request: ChatRequest, conversation: Conversation, config: ServeConfig, loop):
    """Load, render and submit (in a worker thread: images decode here, not on the event loop)."""
    max_images = config.max_images or engine.processor.config.max_images
    try:
        encoded = engine.encode(load_request_images(conversation, config, max_images))
    finally:
        if conversation.slots:  # the decoded pixels are garbage now, refused or not
            release_memory()
    params = replace(request.params, max_new_tokens=request.max_tokens or config.default_max_tokens)
    return engine.submit(encoded, params, strict=request.max_tokens is not None, ignore_eos=request.ignore_eos,
                         loop=loop)


# What each failure answers, first match wins: (class, status, OpenAI type, code, param).
_ERRORS = ((ContextLengthError, 400, "invalid_request_error", "context_length_exceeded", "messages"),
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
    return _json(body, e.status, {"Retry-After": "1"} if e.status in (429, 503) else None)


async def _complete(handle, http, meta: dict):
    """Gather the whole answer; a client that hangs up cancels its generation."""

    async def watch():
        while (await http.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()

    watcher, pieces = asyncio.create_task(watch()), []
    try:
        async for last in handle.events():
            pieces.append(last.text)
    finally:
        watcher.cancel()
        handle.cancel()
    if last.error and last.error.startswith(ROW_FAILED):  # this request alone failed: retrying will not help
        return _error_response(ApiError(500, last.error, kind="server_error"))
    if last.finish_reason in ("error", "cancelled"):
        return _error_response(EngineClosedError(last.error or "the request was cancelled"))
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
              "finish_reason": last.finish_reason, "logprobs": None}
    return _json({**meta, "object": "chat.completion", "choices": [choice], "usage": last.usage})


async def _sse(handle, request: ChatRequest, meta: dict):
    """`chat.completion.chunk` events ending in ``data: [DONE]``; leaving early (a disconnect) cancels generation."""

    def data(delta: dict | None, finish: str | None = None, **extra) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        return "data: " + json.dumps({**meta, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    try:
        yield data({"role": "assistant", "content": ""})
        async for event in handle.events():
            if event.text:
                yield data({"content": event.text})
            if event.finish_reason in ("error", "cancelled"):  # the stream has begun: the error goes in it
                yield "data: " + json.dumps({"error": {"message": event.error or "cancelled", "type": "server_error",
                                                       "param": None, "code": None}}) + "\n\n"
            elif event.finish_reason:
                yield data({}, event.finish_reason)
                if request.include_usage:  # OpenAI's form: one more chunk, with no choices
                    yield data(None, usage=event.usage)
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()


# The command


def add_cli(commands) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-compatible server: /v1/chat/completions, /v1/models, /health")
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
    serve.add_argument("--max-batch", type=int, default=ServeConfig.max_batch, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=ServeConfig.max_queue, help="waiting requests before 429")
    serve.add_argument("--max-tokens", dest="default_max_tokens", type=int, default=ServeConfig.default_max_tokens,
                       help="when a request has none")
    serve.add_argument("--prefix-cache-mb", type=float, default=ServeConfig.prefix_cache_mb, help="0 turns it off")
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
