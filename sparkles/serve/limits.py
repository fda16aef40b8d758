"""What one request may cost before the model sees it: characters of text, decoded pixels, and how many requests
are prepared (images decoded, text tokenized) at once, in a pool of threads whose starvation `/health` can see.

Shared by the server and the web UI. No torch and no web framework here: the checks raise `ApiError`, which each
front end turns into what its user reads.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..conversation import Conversation, Text
from ..errors import ConfigError
from .requests import ApiError


def longest_token(tokenizer) -> int:
    """The most characters any vocabulary entry spells (special and added tokens included), at least 1."""
    return max(map(len, tokenizer.get_vocab()), default=1) or 1


def text_limit(max_seq_len: int, tokenizer) -> int:
    """The characters of text past which a conversation cannot fit `max_seq_len` tokens, whatever it says.

    "A token is at least one character" bounds the wrong way: it says a text has at most as many tokens as
    characters. What is needed is the other way: how many characters one token can cover at most. A byte-level BPE
    vocabulary spells each entry with one character per byte, and UTF-8 text has at least as many bytes as
    characters; a SentencePiece vocabulary spells each entry with one character per character (byte-fallback
    pieces such as <0xE2> are longer than the byte they stand for). Either way a token covers at most
    `longest_token` characters of text, so a text longer than max_seq_len × that many has more tokens than the
    context holds. Only a normalizer that deletes characters could break this; the limit then refuses a text that
    would have fit, which is safe, and the message says what the limit is.
    """
    return max_seq_len * longest_token(tokenizer)


def text_chars(conversation: Conversation) -> int:
    return sum(len(part.text) for message in conversation.messages for part in message.parts
               if isinstance(part, Text))


def check_text(conversation: Conversation, limit: int) -> None:
    """Refuse text that cannot fit the context by its length alone: tokenizing 50 MB first cost 112 s and 8 GB."""
    if (chars := text_chars(conversation)) > limit:
        raise ApiError(400, f"the messages hold {chars} characters of text, more than the {limit} that can fit this "
                       "model's context; shorten them", param="messages", code="context_length_exceeded")


def release_memory() -> None:
    """Hand freed heap memory back to the system, where the C library allows it (glibc's malloc_trim).

    glibc keeps what a thread frees in that thread's arena: after one request of four 4096x4096 images a server
    held 290 MiB more for good, and after the next, more. Trimming after a request that decoded images costs a few
    milliseconds and brings the server back to its size before it (measured in the README)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # musl and macOS have none
    except OSError:
        return None


_LIBC = _libc()


class PixelBudget:
    """The decoded pixels left to one request, spent image by image from each header, before that image decodes."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, size: tuple[int, int], name: str) -> None:
        width, height = size
        self.used += width * height
        if self.used > self.limit:
            raise ApiError(413, f"the images of this request come to more than {self.limit} pixels once decoded "
                           f"(the limit per request): {name} is {width}x{height} and brings the total to "
                           f"{self.used}; send fewer or smaller images", param="messages", code="too_large")


def _set_soon(loop, future) -> None:
    try:
        loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))
    except RuntimeError:  # the loop has closed: nobody waits
        pass


class Workers:
    """A pool of `workers` threads that prepare requests, with at most `max_waiting` waiting for a thread, each for
    at most `max_wait` seconds; past either the caller gets a 503 with Retry-After rather than a queue without end.

    It also knows how long its oldest task has waited and whether every thread has been busy for over
    `degraded_after` seconds, so that `/health` can tell a starved server (threads stuck on slow sources) from
    a merely busy one. Thread-safe, and usable from any event loop: nothing here is bound to one.
    """

    def __init__(self, workers: int, *, max_waiting: int, max_wait: float, degraded_after: float):
        if workers < 1 or max_waiting < 0 or max_wait < 0 or degraded_after < 0:
            raise ConfigError(f"workers must be >= 1 and the rest >= 0, got {workers}, {max_waiting}, {max_wait}, "
                             f"{degraded_after}")
        self.workers, self.max_waiting, self.max_wait, self.degraded_after = workers, max_waiting, max_wait, \
            degraded_after
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="sparkles-prepare")
        self._lock = threading.Lock()
        self._waiting: dict[object, float] = {}  # task -> when it was submitted
        self._busy: dict[object, float] = {}  # task -> when a thread took it
        self.refused = self.abandoned = 0

    async def run(self, fn, *args, timeout: float | None = None, on_late=None):
        """`fn(*args)` on a pool thread; ApiError 503 when too many wait or none frees up within `max_wait`, and
        504 when it has run `timeout` seconds. A thread cannot be stopped from outside: the late call runs on
        (counted as busy and `abandoned` until it returns), and what it returns goes to `on_late`."""
        task = object()
        with self._lock:
            if len(self._waiting) >= self.max_waiting + max(0, self.workers - len(self._busy)):
                self.refused += 1
                raise self._busy_error(f"{len(self._waiting)} already waiting for a worker")
            self._waiting[task] = time.monotonic()
        loop = asyncio.get_running_loop()
        started = loop.create_future()  # set from the thread that takes the task: its `timeout` counts from then
        future = self._pool.submit(self._call, task, fn, args, lambda: _set_soon(loop, started))
        future.add_done_callback(lambda _: self._forget(task))  # a task cancelled before it ran
        wrapped = asyncio.wrap_future(future)
        try:
            done, _ = await asyncio.wait({wrapped, started}, timeout=self.max_wait,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done and future.cancel():  # still waiting: it never starts; once started, it runs to the end
                with self._lock:
                    self.refused += 1
                raise self._busy_error(f"no worker was free for {self.max_wait:g} s")
            if timeout is not None and not wrapped.done():
                with self._lock:
                    begun = self._busy.get(task, time.monotonic())
                done, _ = await asyncio.wait({wrapped}, timeout=max(0.0, begun + timeout - time.monotonic()))
                if not done:
                    raise ApiError(504, f"preparing this request took over {timeout:g} s (a source of its images "
                                   "is stuck); it was given up", kind="server_error", code="timeout")
            return await wrapped
        except BaseException:
            if not future.done() and not future.cancel():  # given up (a 504, or the caller left) while it runs
                self._abandon(future, on_late)
                wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())  # its error is on_late's
            raise

    def _abandon(self, future, on_late) -> None:
        with self._lock:
            self.abandoned += 1

        def late(_):
            with self._lock:
                self.abandoned -= 1
            if on_late is not None and not future.cancelled() and future.exception() is None:
                on_late(future.result())
        future.add_done_callback(late)

    def _call(self, task, fn, args, on_start):
        with self._lock:
            self._waiting.pop(task, None)
            self._busy[task] = time.monotonic()
        on_start()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._busy.pop(task, None)

    def _forget(self, task) -> None:
        with self._lock:
            self._waiting.pop(task, None)

    def _busy_error(self, why: str) -> ApiError:
        return ApiError(503, f"the server is busy preparing other requests ({why}); try again shortly",
                        kind="server_error", code="busy")

    def stats(self) -> dict:
        """Counts and ages in seconds; `degraded` when a task waited too long or every thread is stuck."""
        now = time.monotonic()
        with self._lock:
            waiting, busy, refused, abandoned = (list(self._waiting.values()), list(self._busy.values()), self.refused,
                                                 self.abandoned)
        oldest_wait = now - min(waiting) if waiting else 0.0
        # Every thread taken, and the most recent taken too long ago: the next request would wait however few come.
        stuck = len(busy) >= self.workers and now - max(busy) > self.degraded_after
        return {"workers": self.workers, "busy": len(busy), "waiting": len(waiting),
                "oldest_wait_s": round(oldest_wait, 3), "longest_busy_s": round(now - min(busy), 3) if busy else 0.0,
                "refused": refused, "abandoned": abandoned, "degraded": stuck or oldest_wait > self.degraded_after}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
