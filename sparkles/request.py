"""A request to the serve engine (`engine.py`) as its reader holds it: the events it streams back, read from a
thread or from an asyncio loop, and its cancellation."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .config import SamplingParams
from .processor import Encoded


@dataclass(frozen=True)
class Event:
    """One message from the engine to a request's reader: a text delta, or the end with its counts."""

    text: str = ""
    finish_reason: str | None = None  # stop | length | cancelled | error; None while generating
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def usage(self) -> dict:
        """OpenAI's usage object; prompt tokens include every image's tokens."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Request:
    """A submitted generation: read its events (sync `for` or async `events()`), `cancel()` to stop it early."""

    def __init__(self, encoded: Encoded, params: SamplingParams, *, ignore_eos: bool = False, loop=None):
        self.encoded, self.params, self.ignore_eos = encoded, params, ignore_eos
        self.prompt_tokens = len(encoded.rendered)
        self._loop = loop
        # An asyncio reader gets its events on its own loop; a thread reader blocks on a plain queue.
        self._queue = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self._cancelled = threading.Event()
        self.done = False  # set by the engine once the final event is out
        # time.monotonic() of its life, for the server's metrics: queued, taken into the batch, first text, end
        self.submitted, self.started, self.first_text, self.ended = time.monotonic(), None, None, None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating at the next step; the reader gets a final event with finish_reason "cancelled"."""
        self._cancelled.set()

    def start(self) -> Request:
        """The engine takes it into the batch now."""
        self.started = time.monotonic()
        return self

    def emit(self, event: Event) -> None:
        if event.text and self.first_text is None:
            self.first_text = time.monotonic()
        if event.finish_reason is not None:
            self.ended = time.monotonic()
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the reader's loop is closed: nobody is listening any more
            self.cancel()

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._queue.get()
            yield event
            if event.finish_reason is not None:
                return

    async def events(self):
        while True:
            event = await self._queue.get()
            yield event
            if event.finish_reason is not None:
                return
