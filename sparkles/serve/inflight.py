"""Request bodies in flight: a server-wide budget of body bytes being read, parsed or prepared at once, and a
deadline on reading each body, so that neither many large uploads nor a client dripping bytes (slowloris) can hold
the server's memory or a slot for ever.

No web framework here beyond the ASGI `receive` protocol that `read_json` reads through Starlette's request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from ..errors import ConfigError
from .requests import ApiError


class BodyBudget:
    """At most `limit` bytes of request bodies held at once, server-wide; a request whose bytes do not fit waits
    at most until its deadline for others to finish, then gets a 503 with Retry-After.

    A body past `small` bytes may not take the last `reserve` bytes: those stay for ordinary requests (a question
    and a few images), so that large uploads filling the budget cannot make a small request wait. Thread-safe, and
    usable from any event loop: a release wakes waiters on their own loops.
    """

    def __init__(self, limit: int, *, max_body: int, small: int = 2**20, reserve: int | None = None):
        reserve = limit // 8 if reserve is None else reserve
        if limit < 1 or not 0 <= reserve < limit or max_body > limit - reserve:
            raise ConfigError(f"the body budget ({limit} B, of which {reserve} B kept for bodies up to {small} B) "
                              f"must hold one body of the largest size allowed ({max_body} B); raise it")
        self.limit, self.small, self.reserve = limit, small, reserve
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.used = self.peak = self.refused = self.timed_out = 0

    def lease(self) -> BodyLease:
        return BodyLease(self)

    def _try_take(self, size: int, held: int) -> bool:
        room = self.limit if held + size <= self.small else self.limit - self.reserve
        if self.used + size > room:
            return False
        self.used += size
        self.peak = max(self.peak, self.used)
        return True

    async def _take(self, size: int, held: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._try_take(size, held):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    self.refused += 1
                    raise ApiError(503, f"the server is reading other requests' bodies ({self.used} of its "
                                   f"{self.limit} bytes in flight); try again shortly", kind="server_error",
                                   code="busy")
                waiter = (loop, loop.create_future())
                self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter[1], left)
            except TimeoutError:
                pass  # one more look, then the 503 above
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    def _give(self, size: int) -> None:
        with self._lock:
            self.used -= size
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:  # all of them look again: a small one may fit where a large one does not
            if not loop.is_closed():
                loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_result(None))

    def stats(self) -> dict:
        with self._lock:
            return {"bytes": self.used, "limit": self.limit, "peak": self.peak, "waiting": len(self._waiters),
                    "refused": self.refused, "timed_out": self.timed_out}


class BodyLease:
    """The bytes one request holds of a `BodyBudget`; `release` (idempotent) gives them all back."""

    def __init__(self, budget: BodyBudget):
        self.budget, self.held = budget, 0

    async def take(self, size: int, deadline: float) -> None:
        if size > 0:
            await self.budget._take(size, self.held, deadline)
            self.held += size

    def release(self) -> None:
        held, self.held = self.held, 0
        if held:
            self.budget._give(held)


async def read_json(http, lease: BodyLease, *, limit: int, timeout: float, wait: float, max_values: int) -> Any:
    """The body of `http` parsed as JSON, its bytes taken from `lease` as they come (all at once when the client
    states a Content-Length): a 413 past `limit` bytes or `max_values` JSON values, a 408 when it has not all
    arrived within `timeout` seconds of being let in, a 503 when the budget has no room within `wait` seconds."""
    from starlette.requests import ClientDisconnect

    declared = http.headers.get("content-length", "")
    declared = int(declared) if declared.isdigit() else None
    if declared is not None and declared > limit:  # refused before a byte is read or held
        raise ApiError(413, f"the request body is over this server's limit of {limit} bytes", code="too_large")
    if declared:
        await lease.take(declared, time.monotonic() + wait)
    deadline = time.monotonic() + timeout  # from when the body may come: a wait for room is not the client's fault
    body = bytearray()
    try:
        async with asyncio.timeout(deadline - time.monotonic()):
            async for chunk in http.stream():  # counted as it comes: a chunked body has no length, and a length can lie
                body += chunk
                if len(body) > limit or (declared is not None and len(body) > declared):
                    raise ApiError(413, f"the request body is over this server's limit of {limit} bytes"
                                   if len(body) > limit else "the request body is longer than its Content-Length",
                                   code="too_large")
                if declared is None:
                    await lease.take(len(chunk), min(deadline, time.monotonic() + wait))
    except TimeoutError:
        with lease.budget._lock:
            lease.budget.timed_out += 1
        raise ApiError(408, f"the request body did not all arrive within {timeout:g} s (got {len(body)} bytes); send "
                       "it faster or in a smaller request", code="timeout") from None
    except ClientDisconnect:
        raise ApiError(400, "the client went away before its request body arrived", code="disconnected") from None
    check_values(body, max_values)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:120]}") from None


def check_values(body: bytes | bytearray, limit: int) -> None:
    """Refuse a body of many small JSON values before parsing it: 64 MiB of ``[],`` parse to 1.4 GB of lists (22
    bytes per byte), of ``1.5,`` to 8 per byte, while strings parse to one byte per byte. Every value but the first
    of each array or object follows a comma, so commas and openings bound the values from above; commas inside
    text count too, which is safe since `limit` leaves room for all the text a request may hold."""
    if (values := body.count(b",") + body.count(b"[") + body.count(b"{")) > limit:
        raise ApiError(413, f"the request body holds up to {values} JSON values (commas and brackets), more than "
                       f"the {limit} this server parses", code="too_large")
