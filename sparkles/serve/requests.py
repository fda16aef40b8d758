"""Checking a /v1/chat/completions body: every field's type and range, as OpenAI sets them, before any work.

What cannot be honoured is refused with an `ApiError` (status, message, param) that names what was expected and
what came, never ignored: a value that passes here must not be able to fail a decode step for other requests.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..config import MAX_SEED, MAX_STOP_CHARS, MAX_STOPS, MIN_SEED, SamplingParams
from ..conversation import Conversation
from ..errors import ConfigError


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields (`kind` is the error type)."""

    def __init__(self, status: int, message: str, *, param=None, code=None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


@dataclass(frozen=True)
class ChatRequest:
    messages: list
    params: SamplingParams  # max_new_tokens is set once the prompt's length is known
    max_tokens: int | None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate to max_tokens (benchmarks)


def parse_request(body: Any, model_name: str) -> ChatRequest:
    """Check a decoded /v1/chat/completions body; what cannot be honoured is refused, not ignored."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    check_unicode(body, "body")
    if (model := _field(body, "model", str, required=True)) != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found", kind="not_found_error")
    for key, ok in (("n", _field(body, "n", int, 1) == 1), ("logprobs", not _field(body, "logprobs", bool, False)),
                    ("tools", not body.get("tools")), ("functions", not body.get("functions")),
                    ("response_format", (_field(body, "response_format", dict) or {}).get("type", "text") == "text")):
        if not ok:
            raise ApiError(400, f"{key}={json.dumps(body[key])[:60]} is not supported by this server", param=key)
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop  # "" is refused below, not taken for no stop
    if len(stop) > MAX_STOPS:
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOPS} strings, got {len(stop)}",
                       param="stop")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
            got = f"{len(s)} characters" if isinstance(s, str) and s else json.dumps(s)[:40]
            raise ApiError(400, f"stop[{i}] must be a non-empty string of at most {MAX_STOP_CHARS} characters, got "
                           f"{got}", param="stop")
    seed = _field(body, "seed", int)
    if seed is not None and not MIN_SEED <= seed <= MAX_SEED:
        raise ApiError(400, f"seed must be an integer in [{MIN_SEED}, {MAX_SEED}], got {seed}", param="seed")
    limits = {key: _field(body, key, int) for key in ("max_completion_tokens", "max_tokens")}
    for key, value in limits.items():
        if value is not None and value < 1:
            raise ApiError(400, f"{key} must be at least 1, got {value}", param=key)
    limit = limits["max_completion_tokens"] or limits["max_tokens"]
    try:
        params = SamplingParams(
            temperature=_number(body, "temperature", SamplingParams.temperature, 0, 2),  # the default: greedy
            top_p=_number(body, "top_p", 1.0, 0, 1, open_low=True),
            top_k=max(0, _field(body, "top_k", int, 0)),  # vLLM's extension; -1 also means off there
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, 10, open_low=True),
            stop=tuple(stop), seed=seed)
    except ConfigError as e:  # a bound of SamplingParams itself
        raise ApiError(400, str(e)) from None
    return ChatRequest(_field(body, "messages", list, required=True), params, limit,
                       stream=_field(body, "stream", bool, False), ignore_eos=_field(body, "ignore_eos", bool, False),
                       include_usage=bool((_field(body, "stream_options", dict) or {}).get("include_usage")))


def check_unicode(value: Any, where: str) -> None:
    """Refuse text that is not valid Unicode: JSON's "\\ud800" escapes decode to lone surrogates."""
    if isinstance(value, str):
        if value.isascii():  # the common case, and a 20 MB data: URL, without a copy
            return
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"{where} is not valid Unicode text: a lone surrogate {value[e.start]!a} at "
                           f"character {e.start}; send text as UTF-8") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, f"a key of {where}")
            check_unicode(item, f"{where}.{key}" if where != "body" else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_unicode(item, f"{where}[{i}]")


def check_conversation(conversation: Conversation) -> None:
    """A conversation the server can answer: it ends with a user message, and every user message says something."""
    messages = conversation.messages
    for i, message in enumerate(messages):
        if message.role == "user" and not message.parts:
            raise ApiError(400, f"messages[{i}] is a user message with no content: expected text or an image",
                           param="messages")
    if not messages or messages[-1].role != "user":
        last = f"{'an' if messages[-1].role == 'assistant' else 'a'} {messages[-1].role} message" if messages else \
            "no message at all"
        raise ApiError(400, f"the conversation must end with a user message for the model to answer, but it ends "
                       f"with {last}; continuing an assistant message is not supported", param="messages")


def _field(body: dict, key: str, kind, default: Any = None, *, required: bool = False) -> Any:
    if (value := body.get(key)) is None:  # JSON null counts as absent: clients send it for unset options
        if required:
            raise ApiError(400, f"missing required field {key!r}", param=key)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # JSON true is no number
        names = " or ".join({"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                             "list": "a list", "dict": "an object"}[k.__name__] for k in kinds)
        raise ApiError(400, f"{key} must be {names}, got {json.dumps(value)[:60]}", param=key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
    value = _field(body, key, (int, float), default)
    try:
        value = float(value)  # a huge JSON integer does not fit a float
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or not low <= value <= high or (open_low and value == low):
        raise ApiError(400, f"{key} must be in {'(' if open_low else '['}{low}, {high}], got {value}", param=key)
    return value
