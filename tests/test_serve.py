"""The server and its engine: answers, SSE, sampling options, every error as an OpenAI body, batching, cancelling,
limits, floods of bad requests, and the official `openai` client against a live server on 127.0.0.1."""

import asyncio
import base64
import json
import socket
import time

import httpx
import pytest
from PIL import Image as PILImage

from sparkles.config import SamplingParams
from sparkles.engine import Engine, EngineConfig
from sparkles.errors import ImageLoadError
from sparkles.formats import from_openai
from sparkles.generate import Chat
from sparkles.image import load_images, to_data_uri
from sparkles.serve.server import ServeConfig, create_app, fetch_image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]


def data_url(color, size=(40, 30)):
    return to_data_uri(PILImage.new("RGB", size, color))


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text(words):
    return {"type": "text", "text": words}


def two_images(first="red", second="blue", question="Compare IMAGE#1 with IMAGE#2."):
    return [{"role": "user", "content": [text("Look: "), image(data_url(first)), text(" and "),
                                         image(data_url(second)), text(" " + question)]}]


def expected(chat, messages, **params):
    """What `Chat` answers for the same messages alone, and the prompt's length."""
    conversation = load_images(from_openai(messages))
    return chat.answer(conversation, SamplingParams(**params)), len(chat.processor.render(conversation,
                                                                                          generation=True))


@pytest.fixture
def chat(tiny):
    return Chat(*tiny)


@pytest.fixture
def serve(chat, tmp_path):
    """A TestClient factory: `serve(**ServeConfig fields)`; each app's engine stops with its client."""
    clients = []

    def make(**config):
        client = TestClient(create_app(chat, ServeConfig(**config)))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def ask(client, messages, **body):
    return client.post("/v1/chat/completions", json={"model": "sparkles", "messages": messages, **body})


def sse(lines):
    """The data payloads of an SSE body, [DONE] as the string."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_models_and_health(serve):
    client = serve()
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "sparkles"
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_an_answer_about_two_images_matches_chat_and_counts_image_tokens(serve, chat):
    messages = two_images()
    response = ask(serve(), messages, max_tokens=12)
    assert response.status_code == 200
    body = response.json()
    answer, prompt = expected(chat, messages, max_new_tokens=12)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": answer}
    k = chat.processor.config.tokens_per_image
    assert body["usage"]["prompt_tokens"] == prompt > 2 * k  # both images' tokens count
    assert body["usage"]["completion_tokens"] <= 12
    assert body["usage"]["total_tokens"] == prompt + body["usage"]["completion_tokens"]
    # Images across messages are numbered through the whole request, and later text may name them.
    follow = messages + [{"role": "assistant", "content": "ok"},
                         {"role": "user", "content": [image(data_url("green")), text("Is IMAGE#3 like IMAGE#1?")]}]
    response = ask(serve(), follow, max_tokens=6)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected(chat, follow, max_new_tokens=6)[0]


def test_streaming_sends_chunks_that_add_up_to_the_answer(serve, chat):
    client, messages = serve(), two_images("green", "red")
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "sparkles", "messages": messages, "max_tokens": 15, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse(list(response.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    answer, prompt = expected(chat, messages, max_new_tokens=15)
    assert content == answer
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == prompt


def test_sampling_options_are_honoured(serve):
    client, messages = serve(), two_images()
    content = lambda r: r.json()["choices"][0]["message"]["content"]  # noqa: E731
    hot = {"temperature": 1.5, "top_p": 0.95, "max_tokens": 20}
    assert content(ask(client, messages, seed=7, **hot)) == content(ask(client, messages, seed=7, **hot))
    draws = {content(ask(client, messages, seed=s, **hot)) for s in range(4)}
    assert len(draws) > 1
    full = ask(client, messages, max_tokens=30, ignore_eos=True).json()
    assert full["usage"]["completion_tokens"] == 30 and full["choices"][0]["finish_reason"] == "length"
    assert ask(client, messages, max_completion_tokens=3, max_tokens=30).json()["usage"]["completion_tokens"] <= 3
    greedy = content(ask(client, messages, max_tokens=30, ignore_eos=True))
    cut = greedy[4:6]
    stopped = ask(client, messages, max_tokens=30, stop=[cut])
    assert stopped.json()["choices"][0]["finish_reason"] == "stop"
    assert cut not in content(stopped) and greedy.startswith(content(stopped))


def _bad_requests(tmp_path):
    outside = tmp_path / "outside.png"
    PILImage.new("RGB", (8, 8), "red").save(outside)
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "link.png").symlink_to(outside)
    not_image = "data:image/png;base64," + base64.b64encode(b"just some text").decode()
    one = lambda url: [{"role": "user", "content": [image(url), text("hi")]}]  # noqa: E731
    body = lambda **k: json.dumps({"model": "sparkles", "messages": two_images(), **k})  # noqa: E731
    return [  # (raw body, status, words the message must hold)
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"messages": two_images()}), 400, "model"),
        (json.dumps({"model": "gpt-9", "messages": two_images()}), 404, "does not exist"),
        (json.dumps({"model": "sparkles", "messages": [{"role": "wizard", "content": "hi"}]}), 400, "wizard"),
        (json.dumps({"model": "sparkles", "messages": [{"role": "user", "content": "Is IMAGE#3 red?"}]}), 400,
         "IMAGE#3"),
        (json.dumps({"model": "sparkles", "messages": one("data:image/png;base64,%%%")}), 400, "base64"),
        (json.dumps({"model": "sparkles", "messages": one(not_image)}), 400, "not an image"),
        (json.dumps({"model": "sparkles", "messages": one(str(outside))}), 400, "outside the allowed"),
        (json.dumps({"model": "sparkles", "messages": one("../outside.png")}), 400, "outside the allowed"),
        (json.dumps({"model": "sparkles", "messages": one("link.png")}), 400, "outside the allowed"),
        (json.dumps({"model": "sparkles", "messages": one("file:///etc/passwd")}), 400, "outside the allowed"),
        (json.dumps({"model": "sparkles", "messages": one("http://127.0.0.1:1/a.png")}), 400, "turned off"),
        (json.dumps({"model": "sparkles", "messages": one("ftp://example.com/a.png")}), 400, "expected a data:"),
        (json.dumps({"model": "sparkles", "messages": [{"role": "user", "content": [
            image(data_url(c)) for c in COLORS[:4]]}]}), 400, "too many images"),
        (json.dumps({"model": "sparkles", "messages": one(data_url("red", (200, 200)))}), 400, "pixels"),
        (body(max_tokens=10**6), 400, "maximum context length"),
        (json.dumps({"model": "sparkles", "messages": [{"role": "user", "content": "x" * 2000}]}), 400, "tokens"),
        (body(n=3), 400, "n=3"),
        (body(temperature=-1), 400, "temperature"),
        (body(temperature="hot"), 400, "temperature"),
        (body(top_p=0), 400, "top_p"),
        (body(max_tokens=True), 400, "max_tokens"),
        (body(max_tokens=0), 400, "max_tokens"),
        (body(stop=["a"] * 20), 400, "stop"),
        (body(tools=[{"type": "function"}]), 400, "tools"),
        (body(messages="hello"), 400, "messages"),
        (json.dumps({"model": "sparkles", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}), 400,
         "audio"),
        (json.dumps({"model": "sparkles", "messages": [{"role": "assistant", "content": [image(data_url("red"))]}]}),
         400, "only user messages"),
        (b"x" * 300_000, 413, "limit"),
    ]


def test_every_bad_request_gets_a_4xx_with_an_openai_error_body(serve, tmp_path):
    client = serve(allowed_image_dir=str(tmp_path / "allowed"), max_images=3, max_image_pixels=150 * 100 - 1,
                   max_body_bytes=200_000)
    for raw, status, words in _bad_requests(tmp_path):
        response = client.post("/v1/chat/completions", content=raw)
        error = response.json()["error"]
        assert (response.status_code, words in error["message"]) == (status, True), (raw[:80], error)
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in response.text
    assert client.post("/v1/chat/completions", json={"model": "sparkles", "messages": [
        {"role": "user", "content": [image(data_url("red", (10, 10)))]}]}, headers={"x": "y"}).status_code == 200
    assert client.get("/v1/nowhere").json()["error"]["message"] == "Not Found"


def test_image_bytes_are_limited(serve):
    client = serve(max_image_bytes=100)
    response = ask(client, [{"role": "user", "content": [image(data_url("red", (64, 64)))]}])
    assert response.status_code == 400 and "larger than 100 bytes" in response.json()["error"]["message"]


def test_local_files_load_only_from_the_allowed_folder(serve, chat, tmp_path):
    PILImage.new("RGB", (20, 20), "red").save(tmp_path / "red.png")
    client = serve(allowed_image_dir=str(tmp_path))
    for url in ("red.png", str(tmp_path / "red.png"), (tmp_path / "red.png").as_uri()):
        response = ask(client, [{"role": "user", "content": [image(url), text("What is IMAGE#1?")]}], max_tokens=4)
        assert response.status_code == 200, response.text
    missing = ask(client, [{"role": "user", "content": [image("nope.png")]}]).json()["error"]["message"]
    assert "nope.png" in missing and str(tmp_path) not in missing  # the server's folders stay private


def test_a_bug_is_a_500_that_leaks_nothing(serve, monkeypatch):
    client = serve()
    monkeypatch.setattr(Engine, "encode", lambda self, c: (_ for _ in ()).throw(RuntimeError("secret detail")))
    response = ask(client, two_images())
    assert response.status_code == 500 and "secret" not in response.text
    assert response.json()["error"]["type"] == "server_error"


def test_a_full_queue_answers_429(chat):
    engine = Engine.from_chat(chat, EngineConfig(max_batch=1, max_queue=0))
    with TestClient(create_app(engine)) as client:
        response = ask(client, two_images())
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_http_images_never_come_from_private_addresses():
    png = base64.b64decode(data_url("red").split(",")[1])
    table = {"public.test": "93.184.216.34", "inside.test": "10.0.0.7", "mapped.test": "::ffff:127.0.0.1"}
    resolve = lambda host, port, **kw: [(socket.AF_INET, 1, 6, "", (table[host], port))]  # noqa: E731
    seen = []

    def handler(request):
        seen.append((str(request.url), request.headers["host"]))
        if request.url.path == "/hop":
            return httpx.Response(302, headers={"location": "http://inside.test/secret.png"})
        return httpx.Response(200, content=png)

    fetch = lambda url: fetch_image(url, max_bytes=10**6, timeout=5, resolve=resolve,  # noqa: E731
                                    transport=httpx.MockTransport(handler))
    assert fetch("http://public.test/a.png") == png
    assert seen == [("http://93.184.216.34/a.png", "public.test")]  # pinned to the checked address
    for url in ("http://public.test/hop", "http://inside.test/a.png", "http://mapped.test/a.png",
                "http://user:pw@public.test/a.png"):
        with pytest.raises(ImageLoadError):
            fetch(url)
    assert len(seen) == 2  # the redirect to a private address was never followed


def test_http_images_when_allowed_still_refuse_loopback(serve):
    response = ask(serve(allow_http=True), [{"role": "user", "content": [image("http://127.0.0.1:9/a.png")]}])
    assert response.status_code == 400 and "expected a public address" in response.json()["error"]["message"]


async def _together(app, requests):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
        return await asyncio.gather(*[client.post("/v1/chat/completions", json=r) for r in requests])


def test_concurrent_requests_are_batched_and_never_mix(chat):
    engine = Engine.from_chat(chat, EngineConfig(max_batch=4))
    # Each row samples with its own seed (one greedy), so a mix-up between rows would show.
    requests = [{"model": "sparkles", "messages": two_images(a, b, q), "max_tokens": 16, "temperature": t, "seed": i}
                for i, (a, b, q, t) in enumerate([("red", "blue", "Which is red?", 1.0), ("green", "yellow", "Hm?", 0),
                                                  ("purple", "orange", "IMAGE#2?", 1.0), ("blue", "red", "Red?", 0.7),
                                                  ("yellow", "green", "Differences?", 1.2), ("orange", "red", "?", 1)])]
    try:
        responses = asyncio.run(_together(create_app(engine), requests))
    finally:
        engine.close()
    answers = [r.json()["choices"][0]["message"]["content"] for r in responses]
    assert answers == [expected(chat, r["messages"], max_new_tokens=16, temperature=r["temperature"],
                                seed=r["seed"])[0] for r in requests]
    assert len(set(answers)) > 1 and engine.stats()["peak_batch"] >= 2


def test_the_prefix_cache_resumes_shared_histories_with_the_same_tokens_concurrently(chat):
    """Follow-ups that resend a history (images, earlier turns) resume from the prompt the cache holds; decoded side
    by side in one batch, greedy or seeded, each gets exactly what it gets without the cache, and /health counts."""
    first = two_images("red", "blue", "Which is red?")
    history = first + [{"role": "assistant", "content": "IMAGE#1 is red."}]
    follow = [history + [{"role": "user", "content": [text(q)] + ([image(data_url(c))] if c else [])}]
              for q, c in [("And IMAGE#2?", None), ("Is IMAGE#3 green?", "green"), ("Compare all.", "purple"),
                           ("Why?", None)]]
    params = [SamplingParams(max_new_tokens=12, temperature=t, seed=i) for i, t in enumerate([0, 1.0, 0, 0.8])]

    def answers(mb: float):
        engine = Engine.from_chat(chat, EngineConfig(max_batch=4, prefix_cache_mb=mb))
        encode = lambda messages: engine.encode(load_images(from_openai(messages)))  # noqa: E731
        try:
            *_, end = engine.submit(encode(first), SamplingParams(max_new_tokens=4))
            # Answered, its prompt is kept with the answer's tokens (all but the last, which was never fed), once the
            # engine has let go of its row (the final event comes just before).
            deadline = time.monotonic() + 10
            while engine.stats()["running"] and time.monotonic() < deadline:
                time.sleep(0.01)
            held = [len(e.ids) for e in engine.prefix._entries.values()]
            assert held == ([end.prompt_tokens + end.completion_tokens - 1] if mb else [])
            together = [engine.submit(encode(m), p) for m, p in zip(follow, params)]  # all join one prefill
            out = ["".join(event.text for event in request) for request in together]
            health = TestClient(create_app(engine)).get("/health").json()
        finally:
            engine.close()
        return out, health, engine.stats()

    cached, health, stats = answers(64)
    plain, _, plain_stats = answers(0)
    assert cached == plain and len(set(cached)) > 1
    assert cached[0] == expected(chat, follow[0], max_new_tokens=12)[0]
    prompt = len(chat.processor.render(load_images(from_openai(first)), generation=True))
    counts = health["prefix_cache"]
    # Each follow-up resumes at least the first prompt (a later one may resume an earlier follow-up's, longer).
    assert counts["hits"] == 4 and counts["misses"] == 1 and counts["tokens_reused"] >= 4 * prompt
    assert 0 < counts["bytes"] <= counts["capacity_bytes"] == 64 * 2**20 and stats["peak_batch"] >= 2
    assert plain_stats["prefix_cache"]["entries"] == 0 and plain_stats["prefix_cache"]["hits"] == 0


def test_the_prefix_cache_stays_within_its_bound_and_tells_images_apart():
    import torch

    from sparkles.prefix import PrefixCache

    layer = lambda n: [(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4))]  # noqa: E731  (1, H, L, d)
    cache = PrefixCache(capacity=3 * 2 * 2 * 10 * 4 * 4, tokens_per_image=2)  # room for about 3 entries of 10
    a = [1, 2, 9, 9, 3, 4, 5, 6, 7, 8]  # an image (id 9) at position 2
    cache.store(a, [(2, "a" * 64)], layer(10))
    assert cache.lookup(a + [11], [(2, "a" * 64)])[0] == 10
    assert cache.lookup(a + [11], [(2, "b" * 64)])[0] == 2  # same ids, another image: only what precedes it
    assert cache.lookup(a, [(2, "a" * 64)])[0] == 9  # never the whole prompt: its last position must run
    for n in range(5):
        cache.store([20 + n] * 10, [], layer(10))
    assert cache.nbytes <= cache.capacity and cache.counts["evicted"] >= 3
    assert cache.lookup(a + [11], [(2, "a" * 64)])[0] == 0  # the oldest went first


def test_the_prefix_cache_keeps_a_lone_prompt_without_a_copy_and_copies_a_batch_row():
    """A prompt prefilled alone is kept as it is (no copy before its next tokens); a row of a batch is copied, so
    the batch's memory goes with the batch and the entry counts only its own bytes."""
    import torch

    from sparkles.prefix import PrefixCache

    cache = PrefixCache(capacity=1 << 20, tokens_per_image=2)
    alone = (torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
    cache.store_rows([(0, list(range(6)), [], None)], [type("Layer", (), {"keys": alone[0], "values": alone[1]})])
    batch = (torch.randn(3, 2, 8, 4), torch.randn(3, 2, 8, 4))
    cache.store_rows([(1, list(range(10, 15)), [], None)], [type("Layer", (), {"keys": batch[0], "values": batch[1]})])
    (kept,), (row,) = (e.layers for e in cache._entries.values())
    assert kept[0].data_ptr() == alone[0].data_ptr() and kept[1].data_ptr() == alone[1].data_ptr()
    assert row[0].untyped_storage().nbytes() == row[0].nbytes == 2 * 5 * 4 * 4
    assert torch.equal(row[0], batch[0][1:2, :, -5:]) and torch.equal(row[1], batch[1][1:2, :, -5:])


def test_the_prefix_cache_keeps_a_slab_with_little_room_as_it_is_and_counts_all_of_it():
    """A prompt prefilled alone lives in a slab (keys and values in one buffer, room ahead): kept without a copy
    where it fills at least half of the buffer, the whole buffer counted; a short prompt in a roomy one is copied."""
    import torch

    from sparkles.prefix import PrefixCache
    from sparkles.slab import slab_class

    def slab(length, room):
        layer = slab_class()()
        layer.reserve = room
        layer.update(torch.randn(1, 2, length, 4), torch.randn(1, 2, length, 4))
        return layer

    cache = PrefixCache(capacity=1 << 20, tokens_per_image=2)
    full, roomy = slab(10, 12), slab(3, 12)
    cache.store_rows([(0, list(range(10)), [], None)], [full])
    cache.store_rows([(0, list(range(20, 23)), [], None)], [roomy])
    (kept,), (copied,) = (e.layers for e in cache._entries.values())
    assert kept[0].data_ptr() == full.keys.data_ptr() and kept[1].data_ptr() == full.values.data_ptr()
    assert copied[0].untyped_storage().nbytes() == copied[0].nbytes and torch.equal(copied[0], roomy.keys)
    first, second = cache._entries.values()
    assert first.nbytes == 2 * 2 * 12 * 4 * 4 + 10 * 8  # the buffer's 12 positions, keys and values; the ids
    assert second.nbytes == 2 * 2 * 3 * 4 * 4 + 3 * 8


def test_a_flood_of_bad_requests_leaves_it_serving(chat, tmp_path):
    engine = Engine.from_chat(chat)
    bad = [raw for raw, _, _ in _bad_requests(tmp_path)[:14]] * 8  # none that the default config allows
    # Room for all of them to wait for a worker: shedding load with 503 "busy" is tested in test_server_limits.py;
    # here each bad request must get its own 4xx.
    config = ServeConfig(max_waiting=len(bad))

    async def flood():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(engine, config)),
                                     base_url="http://test") as client:
            out = await asyncio.gather(*[client.post("/v1/chat/completions", content=raw) for raw in bad])
            good = await client.post("/v1/chat/completions", json={"model": "sparkles", "messages": two_images(),
                                                                   "max_tokens": 4})
            return out, good

    try:
        out, good = asyncio.run(flood())
    finally:
        engine.close()
    assert all(400 <= r.status_code < 500 for r in out) and good.status_code == 200
    assert engine.stats()["submitted"] == 1


def test_a_request_joins_a_running_batch_and_leaves_it_alone(chat):
    """Continuous batching: a short request joins a long one mid-decode; both answer as if alone."""
    engine = Engine.from_chat(chat, EngineConfig(max_batch=4))
    conversations = [load_images(from_openai(two_images(a, b))) for a, b in (("red", "blue"), ("green", "red"))]
    params = [SamplingParams(max_new_tokens=80), SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)]
    try:
        long = engine.submit(engine.encode(conversations[0]), params[0], ignore_eos=True)
        events = iter(long)
        first = next(events)
        short = list(engine.submit(engine.encode(conversations[1]), params[1]))
        rest = list(events)
    finally:
        engine.close()
    assert rest and rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 80
    assert engine.stats()["peak_batch"] == 2  # the short one ran inside the long one's batch
    alone = engine.chat
    assert "".join(e.text for e in short) == alone.answer(conversations[1], params[1])
    long_text = first.text + "".join(e.text for e in rest)
    assert long_text.strip() == _run_ignoring_eos(alone, conversations[0], 80)


def test_the_batch_writes_its_cache_in_place_and_grows_it_past_the_room_made(chat, monkeypatch):
    """Each decoding step writes its keys and values into the batch's buffers (slab.py), not a copy of the whole
    cache; an answer longer than the room made ahead grows them by half, and two rows answer as `Chat` does."""
    import collections

    import sparkles.engine as engine_module
    from sparkles.slab import slab_class

    monkeypatch.setattr(engine_module, "ROOM_AHEAD", 2)
    slab, writes, buffers = slab_class(), [], set()
    for name in ("append", "update"):
        def spy(self, *args, _real=getattr(slab, name), **kwargs):
            out = _real(self, *args, **kwargs)
            writes.append(id(self))
            buffers.add((id(self), self._buffer.data_ptr(), tuple(self._buffer.shape)))
            return out
        monkeypatch.setattr(slab, name, spy)
    engine = Engine.from_chat(chat, EngineConfig(max_batch=4))
    conversations = [load_images(from_openai(two_images(a, b))) for a, b in (("red", "blue"), ("green", "red"))]
    params = SamplingParams(max_new_tokens=24)
    try:
        requests = [engine.submit(engine.encode(c), params) for c in conversations]
        answers = ["".join(e.text for e in r) for r in requests]
    finally:
        engine.close()
    assert answers == [chat.answer(c, params) for c in conversations]
    # the layer that wrote most (a join or a leave moves the batch to new layer objects)
    layer, steps = collections.Counter(writes).most_common(1)[0]
    assert steps >= 8, "too few steps to tell in-place writes from copies"
    # a new buffer at the first write, at growths by half, at a join or a leave: far fewer than the steps
    assert len({b for b in buffers if b[0] == layer}) <= 6 < steps


def test_prompt_lookup_in_the_engine_answers_as_without_it_and_leaves_an_exact_cache(chat):
    """With `lookahead`, a lone greedy request checks guessed tokens a step: the same answers, finish reasons and
    token counts as without it (a stop string inside a chunk of kept guesses included) in fewer steps, and the prefix
    kept after it resumes the next turn with that turn's own answer."""
    messages = two_images("red", "blue")
    params = SamplingParams(max_new_tokens=40)
    plain = chat.answer(load_images(from_openai(messages)), params)
    stop = SamplingParams(max_new_tokens=40, stop=(plain[12:15],))
    follow = messages + [{"role": "assistant", "content": plain}, {"role": "user", "content": "And now?"}]

    def run(lookahead):
        engine = Engine.from_chat(chat, EngineConfig(max_batch=4, prefix_cache_mb=64, lookahead=lookahead))

        def ask(messages, params):
            *events, end = engine.submit(engine.encode(load_images(from_openai(messages))), params)
            return "".join(e.text or "" for e in [*events, end]), end.finish_reason, end.completion_tokens

        try:
            return [ask(messages, params), ask(messages, stop), ask(follow, params)], engine.stats()
        finally:
            engine.close()

    (ahead, stats), (without, _) = run(4), run(0)
    assert ahead == without
    assert ahead[0][0] == plain and len(plain) > 15 and ahead[1][0] != plain
    assert ahead[2][0] == chat.answer(load_images(from_openai(follow)), params)
    assert stats["lookahead_tokens"] > stats["lookahead_steps"] > 0  # guesses were kept
    assert stats["prefix_cache"]["tokens_reused"] > 0


def _run_ignoring_eos(chat, conversation, n):
    engine = Engine.from_chat(chat, EngineConfig(max_batch=1))
    try:
        request = engine.submit(engine.encode(conversation), SamplingParams(max_new_tokens=n), ignore_eos=True)
        return "".join(e.text for e in request).strip()
    finally:
        engine.close()


def test_cancelling_stops_generation(chat):
    engine = Engine.from_chat(chat)
    conversation = load_images(from_openai(two_images()))
    try:
        request = engine.submit(engine.encode(conversation), SamplingParams(max_new_tokens=900), ignore_eos=True)
        events = iter(request)
        next(events)
        request.cancel()
        last = list(events)[-1]
    finally:
        engine.close()
    assert last.finish_reason == "cancelled" and last.completion_tokens < 900
    assert engine.stats()["cancelled"] == 1 and engine.stats()["running"] == 0


def test_the_openai_client_talks_to_a_live_server_with_two_images(live, chat):
    openai = pytest.importorskip("openai")
    url, _ = live
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = two_images("red", "green", "What differs between IMAGE#1 and IMAGE#2?")
    reply = client.chat.completions.create(model="sparkles", messages=messages, max_tokens=12)
    answer, prompt = expected(chat, messages, max_new_tokens=12)
    assert reply.choices[0].message.content == answer and reply.usage.prompt_tokens == prompt
    stream = client.chat.completions.create(model="sparkles", messages=messages, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer
    assert [m.id for m in client.models.list()] == ["sparkles"]
    with pytest.raises(openai.BadRequestError, match="IMAGE#5"):
        client.chat.completions.create(model="sparkles", messages=[{"role": "user", "content": "IMAGE#5?"}])


def test_a_client_that_hangs_up_stops_its_generation(live):
    url, app = live
    engine = app.state.engine
    body = {"model": "sparkles", "messages": two_images(), "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: {\"id\""):
            pass
    deadline = time.monotonic() + 10
    while engine.stats().get("cancelled", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["cancelled"] == 1 and engine.stats()["running"] == 0
    assert engine.stats()["tokens"] < 900


def test_the_serve_command_line():
    from sparkles.cli import _parser

    args = _parser("serve").parse_args(["serve", "--port", "9001", "--allow-http", "--max-batch", "2",
                                        "--max-queue", "3", "--allowed-image-dir", ".", "--max-images", "4"])
    assert (args.port, args.allow_http, args.max_batch, args.max_queue, args.max_images) == (9001, True, 2, 3, 4)
    assert args.host == "127.0.0.1" and args.run.__module__ == "sparkles.serve.server"
    assert args.prefix_cache_mb == ServeConfig.prefix_cache_mb
    assert _parser("serve").parse_args(["serve", "--prefix-cache-mb", "0"]).prefix_cache_mb == 0
    assert args.image_cache_mb == ServeConfig.image_cache_mb
    assert _parser("serve").parse_args(["serve", "--image-cache-mb", "0"]).image_cache_mb == 0
