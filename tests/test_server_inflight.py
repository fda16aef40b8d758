"""Bodies and images in flight: a server-wide budget of body bytes that makes a request wait a bounded time and
then answers 503, a deadline on receiving a body (a client dripping bytes gets a 408 and frees its bytes), and a
deadline on a request's images that fails that request alone, also when its thread is stuck in one read.

Clients drip their bodies through httpx's ASGI transport, which asks the generator for each chunk as the app
reads: events, not sleeps, decide when the bytes come. Nothing leaves the process.
"""

import asyncio
import threading
import time

import httpx
import pytest
from PIL import Image as PILImage
from test_server_limits import _until, run

import sparkles.image as image_module
import sparkles.serve.server as server
from sparkles.conversation import Conversation
from sparkles.engine import Engine, EngineConfig
from sparkles.errors import ConfigError
from sparkles.formats import from_openai
from sparkles.generate import Chat
from sparkles.image import to_data_uri
from sparkles.serve.images import peek_pixels
from sparkles.serve.inflight import BodyBudget
from sparkles.serve.limits import Workers
from sparkles.serve.requests import ApiError
from sparkles.serve.server import ServeConfig, create_app

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
from fastapi.testclient import TestClient  # noqa: E402

URL = "/v1/chat/completions"


def body(content="Hi there", **changes):
    return {"model": "sparkles", "max_tokens": 3, "messages": [{"role": "user", "content": content}], **changes}


@pytest.fixture
def engine(tiny):
    engine = Engine.from_chat(Chat(*tiny), EngineConfig(max_batch=4))
    yield engine
    engine.close()


def drip(first: bytes, rest: bytes, go: asyncio.Event, sent: asyncio.Event):
    """A body that sends `first`, then the rest only once `go` is set (never, for a slowloris)."""

    async def chunks():
        yield first
        sent.set()
        await go.wait()
        yield rest

    return chunks()


# The budget itself


def test_a_large_body_waits_for_room_a_small_one_does_not_and_a_wait_ends_in_503():
    async def scenario():
        budget = BodyBudget(100, max_body=80, small=10, reserve=20)
        far = time.monotonic() + 30
        big = budget.lease()
        await big.take(80, far)  # the large bodies' share is full now
        waiting = budget.lease()
        blocked = asyncio.create_task(waiting.take(5 + 10, far))  # large: past `small`
        small = budget.lease()
        await asyncio.wait_for(small.take(10, far), 5)  # the reserve admits it at once
        await asyncio.sleep(0)
        assert not blocked.done() and budget.stats()["waiting"] == 1
        with pytest.raises(ApiError) as refused:
            await budget.lease().take(30, time.monotonic() + 0.01)
        big.release()
        await asyncio.wait_for(blocked, 5)  # woken by the release
        stats = budget.stats()
        small.release(), waiting.release(), waiting.release()  # releasing twice gives nothing back twice
        return refused.value, stats, budget.stats()

    refused, during, after = asyncio.run(scenario())
    assert refused.status == 503 and refused.code == "busy" and "bytes in flight" in str(refused)
    assert during["bytes"] == 25 and during["peak"] == 90 and during["refused"] == 1
    assert after["bytes"] == 0 and after["waiting"] == 0


def test_the_budget_must_hold_one_body_of_the_largest_size():
    with pytest.raises(ConfigError, match="must hold one body of the largest size"):
        BodyBudget(64, max_body=60)  # 60 > 64 - 64 // 8


# Over HTTP


def test_a_body_that_finds_no_room_gets_503_while_small_requests_are_answered(engine):
    config = ServeConfig(max_body_bytes=8000, max_body_in_flight=10_000, body_wait=0.05)
    app = create_app(engine, config)
    raw = httpx.Request("POST", URL, json=body()).content + b" " * 7000  # large, and valid JSON

    async def scenario(client):
        go, sent = asyncio.Event(), asyncio.Event()
        held = asyncio.create_task(client.post(URL, content=drip(raw[:100], raw[100:], go, sent),
                                               headers={"Content-Length": str(len(raw)),
                                                        "Content-Type": "application/json"}))
        await asyncio.wait_for(sent.wait(), 10)
        health = await _until(lambda h: h["bodies"]["bytes"] == len(raw), client)
        refused = await client.post(URL, content=raw)  # would overdraw the large bodies' share
        small = await client.post(URL, json=body("Hello"))  # the reserve is for requests like this
        go.set()
        return health, refused, small, await held, (await client.get("/health")).json()

    health, refused, small, held, after = run(app, scenario)
    assert health["bodies"]["limit"] == 10_000
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "busy" and "bytes in flight" in refused.json()["error"]["message"]
    assert small.status_code == 200 and held.status_code == 200, held.text
    assert after["bodies"]["bytes"] == 0 and after["bodies"]["refused"] == 1


def test_a_body_over_the_limit_by_its_content_length_is_refused_before_it_is_read(engine):
    app = create_app(engine, ServeConfig(max_body_bytes=1000, max_body_in_flight=2000))

    async def scenario(client):
        go, sent = asyncio.Event(), asyncio.Event()
        response = await client.post(URL, content=drip(b"{", b"}", go, sent), headers={"Content-Length": "5000"})
        return response, sent.is_set(), (await client.get("/health")).json()

    response, read, health = run(app, scenario)
    assert response.status_code == 413 and response.headers["connection"] == "close"
    assert not read and health["bodies"]["peak"] == 0


def test_a_body_of_many_tiny_json_values_is_refused_before_parsing(engine, monkeypatch):
    """64 MiB of `[],` would parse to 1.4 GB; text with commas up to the text limit still passes."""
    import json
    from types import SimpleNamespace

    import sparkles.serve.inflight as inflight

    parsed = []
    monkeypatch.setattr(inflight, "json", SimpleNamespace(loads=lambda b: parsed.append(len(b)) or json.loads(b)))
    client = TestClient(create_app(engine, ServeConfig(max_text_chars=1000)))
    many = b'{"model": "sparkles", "messages": [], "metadata": [' + b"[]," * 110_000 + b"[]]}"
    refused = client.post(URL, content=many, headers={"Content-Type": "application/json"})
    commas = client.post(URL, json=body("a, " * 300))
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "too_large"
    values = many.count(b",") + many.count(b"[") + many.count(b"{")
    assert f"holds up to {values} JSON values (commas and brackets), more than the 101000" in refused.text
    assert commas.status_code == 200 and len(parsed) == 1  # the refused one was never parsed


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_dripping_body_gets_408_and_gives_its_bytes_back(engine, declared):
    app = create_app(engine, ServeConfig(body_timeout=0.3))
    raw = httpx.Request("POST", URL, json=body("Hello")).content

    async def scenario(client):
        go, sent = asyncio.Event(), asyncio.Event()  # `go` is never set: the rest never comes
        headers = {"Content-Length": str(len(raw))} if declared else {}
        dripped = await client.post(URL, content=drip(raw[:10], raw[10:], go, sent), headers=headers)
        return dripped, await client.post(URL, json=body("Hello")), (await client.get("/health")).json()

    dripped, normal, health = run(app, scenario)
    error = dripped.json()["error"]
    assert dripped.status_code == 408 and error["code"] == "timeout" and dripped.headers["connection"] == "close"
    assert "did not all arrive within 0.3 s (got 10 bytes)" in error["message"]
    assert normal.status_code == 200
    assert health["bodies"]["bytes"] == 0 and health["bodies"]["peak"] >= 10


# Images: one deadline per request


@pytest.fixture
def picture_dir(tmp_path):
    PILImage.new("RGB", (48, 48), "red").save(tmp_path / "red.png")
    return tmp_path


def image_body(path):
    return body([{"type": "image_url", "image_url": {"url": path}}, {"type": "text", "text": "What is it?"}])


def test_a_slow_file_fails_its_request_with_504_and_a_neighbour_is_answered(engine, picture_dir, monkeypatch):
    """A filesystem that returns each chunk late (a network mount): the deadline is checked between reads."""
    real_fdopen = image_module.os.fdopen

    class Slow:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

        def read(self, n):
            time.sleep(0.05)  # 4 bytes per 0.05 s: the whole file (about 120 bytes) would take 1.5 s or more
            return self.f.read(n)

    monkeypatch.setattr(image_module, "_CHUNK", 4)
    monkeypatch.setattr(image_module.os, "fdopen", lambda *a, **k: Slow(real_fdopen(*a, **k)))
    app = create_app(engine, ServeConfig(allowed_image_dir=str(picture_dir), image_timeout=0.3))

    async def scenario(client):
        return await asyncio.gather(client.post(URL, json=image_body("red.png")), client.post(URL, json=body()))

    slow, normal = run(app, scenario)
    error = slow.json()["error"]
    assert slow.status_code == 504 and error["code"] == "timeout" and error["type"] == "server_error", error
    assert "cannot read image file red.png: it came too slowly" in error["message"]
    assert str(picture_dir) not in slow.text
    assert normal.status_code == 200


def test_a_read_stuck_in_the_os_gives_504_and_health_counts_the_thread_until_it_returns(engine, picture_dir,
                                                                                     monkeypatch):
    """A read that blocks inside the OS cannot be interrupted: the request is answered at the hard deadline, the
    thread stays busy (and `abandoned`) until the read returns, and later requests use the other workers."""
    unstuck, real = threading.Event(), image_module._read_up_to

    def stuck(f, limit, deadline=None, path=None):
        assert unstuck.wait(30), "the test never let the read return"
        return real(f, limit, deadline, path)

    monkeypatch.setattr(image_module, "_read_up_to", stuck)
    app = create_app(engine, ServeConfig(allowed_image_dir=str(picture_dir), image_timeout=0.1, workers=2))

    async def scenario(client):
        slow = asyncio.create_task(client.post(URL, json=image_body("red.png")))
        await _until(lambda h: h["preparing"]["busy"] == 1, client)
        normal = await client.post(URL, json=body())
        slow = await slow
        during = (await client.get("/health")).json()
        unstuck.set()
        after = await _until(lambda h: h["preparing"]["busy"] == 0, client)
        return slow, normal, during, after

    slow, normal, during, after = run(app, scenario)
    assert slow.status_code == 504 and "preparing this request took over 1.2 s" in slow.json()["error"]["message"]
    assert normal.status_code == 200
    assert during["preparing"]["abandoned"] == 1 and during["preparing"]["busy"] == 1
    assert after["preparing"]["abandoned"] == 0 and after["bodies"]["bytes"] == 0


def test_a_start_that_comes_after_its_caller_gave_up_goes_to_on_late():
    workers = Workers(1, max_waiting=0, max_wait=5, degraded_after=5)
    release, late = threading.Event(), []

    async def scenario():
        with pytest.raises(ApiError) as timed_out:
            await workers.run(lambda: release.wait(30) and "handle", timeout=0.05, on_late=late.append)
        stats = workers.stats()
        release.set()
        for _ in range(1000):
            if late:
                break
            await asyncio.sleep(0.005)
        return timed_out.value, stats

    try:
        error, stats = asyncio.run(scenario())
    finally:
        release.set()
        workers.close()
    assert error.status == 504 and error.code == "timeout"
    assert stats["abandoned"] == 1 and stats["busy"] == 1 and stats["degraded"] is False
    assert late == ["handle"] and workers.stats()["abandoned"] == 0


# A lane of its own for requests of small images


def picture(size):
    return {"type": "image_url", "image_url": {"url": to_data_uri(PILImage.new("RGB", size, "red"))}}


def test_peek_pixels_reads_data_url_headers_and_gives_up_on_anything_else(picture_dir):
    def conversation(*parts) -> Conversation:
        return from_openai([{"role": "user", "content": [*parts, {"type": "text", "text": "Which?"}]}])

    assert peek_pixels(conversation(picture((64, 48)), picture((4096, 4096))), 8) == 64 * 48 + 4096 * 4096
    assert peek_pixels(conversation(), 8) == 0
    assert peek_pixels(conversation({"type": "image_url", "image_url": {"url": "red.png"}}), 8) is None
    assert peek_pixels(conversation({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}), 8) \
        is None
    assert peek_pixels(conversation(picture((8, 8)), picture((8, 8))), 1) is None  # too many: the pool says so


def test_a_request_of_small_images_is_prepared_while_heavy_ones_hold_every_worker(engine, picture_dir, monkeypatch):
    """Heavy requests (here files, which may block) fill the pool and its queue; one of two 64x64 data: images
    has a thread of its own and is answered before any of them."""
    release, real = threading.Event(), server.load_request_images

    def load(conversation, *args, **kwargs):
        if any(not (image.source or "").startswith("data:") for image in conversation.slots):
            assert release.wait(30), "the test never released the heavy loads"
        return real(conversation, *args, **kwargs)

    monkeypatch.setattr(server, "load_request_images", load)
    app = create_app(engine, ServeConfig(allowed_image_dir=str(picture_dir), workers=1, max_waiting=4))

    async def scenario(client):
        heavy = [asyncio.create_task(client.post(URL, json=image_body("red.png"))) for _ in range(3)]
        during = await _until(lambda h: h["preparing"]["busy"] == 1 and h["preparing"]["waiting"] == 2, client)
        light = await client.post(URL, json=body([picture((64, 64)), picture((64, 64)),
                                                  {"type": "text", "text": "Which is brighter?"}]))
        still = (await client.get("/health")).json()
        release.set()
        return during, light, still, await asyncio.gather(*heavy)

    try:
        during, light, still, heavy = run(app, scenario)
    finally:
        release.set()
    assert light.status_code == 200 and still["preparing"]["busy"] == 1  # the heavy ones were still held
    assert during["preparing_light"]["busy"] == 0 and still["preparing_light"]["busy"] == 0
    assert [r.status_code for r in heavy] == [200] * 3
