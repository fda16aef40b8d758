"""What one request may cost before the model sees it: text refused by its length before tokenizing, images by
their headers before decoding, a bounded number prepared at once, and a /health that tells a starved pool from a
healthy one. A tiny random model behind FastAPI's test client or httpx's ASGI transport; nothing leaves the process.
"""

import asyncio
import io
import random
import threading

import httpx
import pytest
from PIL import Image as PILImage
from PIL import ImageFile

import sparkles.serve.server as server
from sparkles.engine import Engine, EngineConfig
from sparkles.errors import ConfigError
from sparkles.generate import Chat
from sparkles.image import load_image, to_data_uri
from sparkles.serve.limits import Workers, longest_token, text_limit
from sparkles.serve.requests import ApiError
from sparkles.serve.server import ServeConfig, create_app

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
from fastapi.testclient import TestClient  # noqa: E402


def user(content):
    return {"role": "user", "content": content}


def body(content="Hi there", **changes):
    return {"model": "sparkles", "max_tokens": 3, "messages": [user(content)], **changes}


def picture(size, color="red"):
    return {"type": "image_url", "image_url": {"url": to_data_uri(PILImage.new("RGB", size, color))}}


@pytest.fixture
def chat(tiny):
    return Chat(*tiny)


@pytest.fixture
def engine(chat):
    engine = Engine.from_chat(chat, EngineConfig(max_batch=4))
    yield engine
    engine.close()


@pytest.fixture
def decodes(monkeypatch):
    """How many images PIL decoded: every decode of a file-backed image goes through ImageFile.load."""
    calls = []
    real = ImageFile.ImageFile.load

    def load(self):
        if self.tile:  # still undecoded (PIL calls load again on a loaded image, as a no-op)
            calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def run(app, scenario):
    """Run `scenario(client)` against the app on one event loop, as concurrent clients would."""

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await scenario(client)

    return asyncio.run(main())


# Text


def test_the_text_bound_is_safe_for_byte_level_and_merged_tokenizers(chat):
    """No text has fewer tokens than characters / longest vocabulary entry, so the bound never refuses one that
    fits: checked on the byte tokenizer and the shapes world's BPE, over ASCII, merges and multi-byte text."""
    from sparkles.tokenizer import NAMED

    rng = random.Random(0)
    words = ["background", " together", " triangles", "é", "漢字", "🙂", " ", "\n", "IMAGE#1"]
    for tokenizer in (chat.processor.tokenizer, NAMED.get("world-bpe")(image_token="<image>")):
        longest = longest_token(tokenizer)
        for _ in range(40):
            text = "".join(rng.choice(words) for _ in range(rng.randint(1, 300)))
            tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            assert tokens * longest >= len(text), (text[:40], tokens, longest)
    assert text_limit(1024, chat.processor.tokenizer) == 1024 * longest_token(chat.processor.tokenizer)


def test_a_text_too_long_to_fit_is_refused_without_tokenizing(engine, monkeypatch):
    app = create_app(engine)
    limit = app.state.max_text_chars
    calls = []
    tokenizer_type = type(engine.processor.tokenizer)
    real_call, real_encode = tokenizer_type.__call__, engine.processor.encode
    monkeypatch.setattr(tokenizer_type, "__call__", lambda self, *a, **k: calls.append("tokenize") or
                        real_call(self, *a, **k))
    monkeypatch.setattr(engine.processor, "encode", lambda *a, **k: calls.append("encode") or real_encode(*a, **k))
    client = TestClient(app)
    for size in (limit + 1, 5 * 2**20):  # just over, and 5 MB (50 MB once took 112 s and 8 GB)
        words = ("Describe this. " * (size // 15 + 1))[:size]
        response = client.post("/v1/chat/completions", json=body([{"type": "text", "text": words[:10]},
                                                                  {"type": "text", "text": words[10:]}]))
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == "context_length_exceeded", error
        assert f"the messages hold {size} characters of text, more than the {limit} that can fit" in error["message"]
    assert calls == []  # neither the tokenizer nor the processor ever saw them
    assert client.post("/v1/chat/completions", json=body()).status_code == 200 and "tokenize" in calls


def test_the_text_limit_can_be_set_and_counts_every_message(engine):
    client = TestClient(create_app(engine, ServeConfig(max_text_chars=20)))
    messages = [{"role": "system", "content": "0123456789"}, user("0123456789"), {"role": "assistant",
                                                                                 "content": "x"}, user("y")]
    response = client.post("/v1/chat/completions", json={"model": "sparkles", "messages": messages})
    assert response.status_code == 400 and "22 characters of text, more than the 20" in response.json()["error"][
        "message"]
    assert client.post("/v1/chat/completions", json=body("0123456789")).status_code == 200


# Pixels


def test_an_image_over_the_request_budget_is_refused_from_its_header(engine, decodes):
    client = TestClient(create_app(engine, ServeConfig(max_request_pixels=1000 * 1000)))
    response = client.post("/v1/chat/completions", json=body([picture((4000, 4000)), {"type": "text", "text": "?"}]))
    error = response.json()["error"]
    assert response.status_code == 413 and error["code"] == "too_large" and error["param"] == "messages"
    assert "more than 1000000 pixels once decoded (the limit per request): IMAGE#1 is 4000x4000" in error["message"]
    assert decodes == []  # refused from the header: not one pixel decoded


def test_the_budget_is_for_the_whole_request_and_stops_at_the_image_that_overdraws_it(engine, decodes):
    client = TestClient(create_app(engine, ServeConfig(max_request_pixels=3 * 600 * 600)))
    content = [picture((600, 600), c) for c in ("red", "blue", "green", "white")] + [{"type": "text", "text": "?"}]
    response = client.post("/v1/chat/completions", json=body(content))
    assert response.status_code == 413, response.text
    assert "IMAGE#4 is 600x600 and brings the total to 1440000" in response.json()["error"]["message"]
    assert decodes == [(600, 600)] * 3  # the fourth never decoded
    decodes.clear()
    response = client.post("/v1/chat/completions", json=body(content[1:]))
    # Blue and green were decoded for the first request and kept (the image cache): only white is decoded now.
    assert response.status_code == 200 and decodes == [(600, 600)]
    decodes.clear()
    response = client.post("/v1/chat/completions", json=body(content))
    assert response.status_code == 413 and "brings the total to 1440000" in response.json()["error"]["message"]
    assert decodes == []  # every image was kept, yet each still counts against the request's budget


def test_a_file_over_the_budget_is_refused_without_decoding_and_without_its_real_path(engine, decodes, tmp_path):
    PILImage.new("RGB", (3000, 2000), "blue").save(tmp_path / "big.png")
    client = TestClient(create_app(engine, ServeConfig(allowed_image_dir=str(tmp_path), max_request_pixels=10**6)))
    response = client.post("/v1/chat/completions", json=body([{"type": "image_url", "image_url": {"url": "big.png"}},
                                                              {"type": "text", "text": "What is it?"}]))
    assert response.status_code == 413 and "IMAGE#1 is 3000x2000" in response.json()["error"]["message"]
    assert str(tmp_path) not in response.text and decodes == []


def test_load_image_checks_the_header_size_before_decoding(decodes):
    buffer = io.BytesIO()
    PILImage.new("RGB", (64, 48)).save(buffer, "PNG")
    seen = []

    def refuse(size):
        seen.append(size)
        raise ApiError(413, "over budget")

    with pytest.raises(ApiError, match="over budget"):
        load_image(buffer.getvalue(), check_size=refuse)
    assert seen == [(64, 48)] and decodes == []
    assert load_image(buffer.getvalue(), check_size=seen.append).pixels.size == (64, 48) and len(decodes) == 1


# Workers: how many requests are prepared at once, and a /health that sees a starved pool (light_pixels=0: every
# request shares the one pool under test; the lane for light requests is tested in test_server_inflight.py)


@pytest.fixture
def slow_loads(monkeypatch):
    """Image loading that counts who is inside at once and holds everyone until `release` is set."""

    class Gate:
        def __init__(self):
            self.lock, self.inside, self.peak = threading.Lock(), 0, 0
            self.entered, self.release = threading.Event(), threading.Event()

    gate, real = Gate(), server.load_request_images

    def load(*args, **kwargs):
        with gate.lock:
            gate.inside += 1
            gate.peak = max(gate.peak, gate.inside)
        gate.entered.set()
        try:
            assert gate.release.wait(30), "the test never released the loader"
            return real(*args, **kwargs)
        finally:
            with gate.lock:
                gate.inside -= 1

    monkeypatch.setattr(server, "load_request_images", load)
    yield gate
    gate.release.set()


async def _until(condition, client):
    """Poll /health (each poll a round trip through the app) until `condition(health)` holds."""
    for _ in range(2000):
        health = (await client.get("/health")).json()
        if condition(health):
            return health
        await asyncio.sleep(0.005)
    raise AssertionError(f"never reached: {health}")


def test_the_workers_bound_how_many_requests_are_prepared_at_once(engine, slow_loads):
    app = create_app(engine, ServeConfig(workers=2, max_waiting=8, light_pixels=0))

    async def scenario(client):
        posts = [asyncio.create_task(client.post("/v1/chat/completions", json=body(f"Hello {i}"))) for i in range(6)]
        # busy counts a worker before it reaches the loader: wait for both inside, or the release could come first
        await _until(lambda h: h["preparing"]["busy"] == 2 and h["preparing"]["waiting"] == 4
                     and slow_loads.inside == 2, client)
        slow_loads.release.set()
        return await asyncio.gather(*posts)

    responses = run(app, scenario)
    assert [r.status_code for r in responses] == [200] * 6
    assert slow_loads.peak == 2


def test_past_the_waiting_limit_a_request_gets_503_with_retry_after(engine, slow_loads):
    app = create_app(engine, ServeConfig(workers=1, max_waiting=1, light_pixels=0))

    async def scenario(client):
        first = asyncio.create_task(client.post("/v1/chat/completions", json=body("one")))
        await _until(lambda h: h["preparing"]["busy"] == 1, client)
        second = asyncio.create_task(client.post("/v1/chat/completions", json=body("two")))
        await _until(lambda h: h["preparing"]["waiting"] == 1, client)
        third = await client.post("/v1/chat/completions", json=body("three"))
        slow_loads.release.set()
        return await first, await second, third

    first, second, third = run(app, scenario)
    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 503)
    error = third.json()["error"]
    assert third.headers["retry-after"] == "1" and error["code"] == "busy" and error["type"] == "server_error"
    assert "busy preparing other requests (1 already waiting for a worker)" in error["message"]


def test_a_request_that_waits_too_long_for_a_worker_gets_503(engine, slow_loads):
    app = create_app(engine, ServeConfig(workers=1, max_waiting=4, worker_wait=0.01, light_pixels=0))

    async def scenario(client):
        first = asyncio.create_task(client.post("/v1/chat/completions", json=body("one")))
        await _until(lambda h: h["preparing"]["busy"] == 1, client)
        second = await client.post("/v1/chat/completions", json=body("two"))  # the only worker is held
        health = (await client.get("/health")).json()
        slow_loads.release.set()
        return await first, second, health

    first, second, health = run(app, scenario)
    assert first.status_code == 200 and second.status_code == 503
    assert "no worker was free for 0.01 s" in second.json()["error"]["message"]
    assert health["preparing"]["waiting"] == 0 and health["preparing"]["refused"] == 1  # it left no task behind


def test_health_says_degraded_while_the_pool_is_starved_and_ok_after(engine, slow_loads):
    app = create_app(engine, ServeConfig(workers=1, degraded_after=0.0, light_pixels=0))

    async def scenario(client):
        before = await client.get("/health")
        first = asyncio.create_task(client.post("/v1/chat/completions", json=body("one")))
        stuck = await _until(lambda h: h["preparing"]["busy"] == 1, client)
        second = asyncio.create_task(client.post("/v1/chat/completions", json=body("two")))
        starved = await _until(lambda h: h["preparing"]["waiting"] == 1, client)
        starved_response = await client.get("/health")
        slow_loads.release.set()
        answers = [await first, await second]
        return before, stuck, starved, starved_response, answers, await client.get("/health")

    before, stuck, starved, starved_response, answers, after = run(app, scenario)
    assert before.status_code == 200 and before.json()["status"] == "ok"
    assert before.json()["preparing"] | {"degraded": False} == before.json()["preparing"]
    assert stuck["status"] == "degraded" and stuck["preparing"]["degraded"]  # every worker held
    assert starved["status"] == "degraded" and starved["preparing"]["oldest_wait_s"] >= 0
    assert starved_response.status_code == 503 and starved_response.headers.get("content-type") == "application/json"
    assert [a.status_code for a in answers] == [200, 200]
    assert after.status_code == 200 and after.json()["status"] == "ok"
    assert after.json()["preparing"]["busy"] == after.json()["preparing"]["waiting"] == 0


def test_workers_refuse_a_config_that_cannot_work():
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        Workers(0, max_waiting=1, max_wait=1, degraded_after=1)
