"""Adversarial requests: each bad one gets its own 4xx with an OpenAI error body that says what was wrong, and no
request, however odd, can fail another's. The server runs a tiny random model through FastAPI's test client."""

import asyncio
import json

import httpx
import pytest
from PIL import Image as PILImage

import sparkles.engine
from sparkles.config import SamplingParams
from sparkles.engine import Engine, EngineConfig
from sparkles.formats import from_openai
from sparkles.generate import Chat
from sparkles.image import load_images, to_data_uri
from sparkles.serve.server import ServeConfig, create_app

pytest.importorskip("fastapi", reason="the server needs the [serve] extra, which .ci/run installs")
from fastapi.testclient import TestClient  # noqa: E402

RED = to_data_uri(PILImage.new("RGB", (40, 30), "red"))


def user(content):
    return {"role": "user", "content": content}


def body(**changes):
    return {"model": "sparkles", "max_tokens": 4, "messages": [user("Hi there")], **changes}


# (a JSON body, or raw text for what json.dumps cannot write; the status; words the error message must hold)
BAD = [
    (body(seed=2**64), 400, "seed must be an integer in [-9223372036854775808, 18446744073709551615], got 1844"),
    (body(seed=-2**63 - 1), 400, "seed must be an integer in"),
    (body(seed=1.5), 400, "seed must be an integer, got 1.5"),
    (body(temperature=2.5), 400, "temperature must be in [0, 2], got 2.5"),
    (body(temperature=-1e-300), 400, "temperature must be in [0, 2]"),
    ('{"model": "sparkles", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', 400,
     "temperature must be in [0, 2], got inf"),
    ('{"model": "sparkles", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "temperature must be in [0, 2], got nan"),
    (body(temperature=10**400), 400, "temperature must be in [0, 2], got inf"),
    (body(top_p=0), 400, "top_p must be in (0, 1], got 0"),
    (body(top_p=1.01), 400, "top_p must be in (0, 1]"),
    (body(repetition_penalty=1e300, temperature=1), 400, "repetition_penalty must be in (0, 10]"),
    (body(repetition_penalty=0), 400, "repetition_penalty must be in (0, 10]"),
    (body(max_tokens=0), 400, "max_tokens must be at least 1, got 0"),
    (body(max_completion_tokens=0), 400, "max_completion_tokens must be at least 1, got 0"),
    (body(max_tokens=None, max_completion_tokens=-5), 400, "max_completion_tokens must be at least 1, got -5"),
    (body(max_tokens=0, max_completion_tokens=5), 400, "max_tokens must be at least 1"),
    (body(stop=""), 400, "stop[0] must be a non-empty string of at most 256 characters, got \"\""),
    (body(stop=["ok", ""]), 400, "stop[1] must be a non-empty string"),
    (body(stop="x" * 257), 400, "at most 256 characters, got 257 characters"),
    (body(stop=["a", "b", "c", "d", "e"]), 400, "a list of at most 4 strings, got 5"),
    (body(stop=[1]), 400, "stop[0] must be a non-empty string of at most 256 characters, got 1"),
    (body(messages=[user("")]), 400, "messages[0] is a user message with no content"),
    (body(messages=[user(None)]), 400, "messages[0] is a user message with no content"),
    (body(messages=[user([])]), 400, "messages[0] is a user message with no content"),
    (body(messages=[user("Hi"), {"role": "assistant", "content": "Hello"}]), 400,
     "the conversation must end with a user message for the model to answer, but it ends with an assistant message"),
    (body(messages=[{"role": "system", "content": "Be brief."}]), 400, "it ends with a system message"),
    (body(messages=[]), 400, "but it ends with no message at all"),
    ('{"model": "sparkles", "messages": [{"role": "user", "content": "caf\\ud800"}]}', 400,
     "messages[0].content is not valid Unicode text: a lone surrogate '\\ud800' at character 3"),
    ('{"model": "sparkles", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
     '{"url": "a\\udc80.png"}}]}]}', 400, "messages[0].content[0].image_url.url is not valid Unicode text"),
    ('{"model": "sparkles", "messages": [{"role": "user", "content": "hi"}], "stop": "\\udfff"}', 400,
     "stop is not valid Unicode text"),
    ('{"model": "sparkles", "messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}', 400,
     "a key of messages[0] is not valid Unicode text"),
    ('{"model": "\\ud800"}', 400, "model is not valid Unicode text"),
]


@pytest.fixture
def chat(tiny):
    return Chat(*tiny)


@pytest.fixture
def client(chat, tmp_path):
    with TestClient(create_app(chat, ServeConfig(allowed_image_dir=str(tmp_path)))) as client:
        yield client


@pytest.mark.parametrize(("request_body", "status", "words"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_bad_request_gets_a_4xx_that_says_what_was_wrong(client, request_body, status, words):
    raw = request_body if isinstance(request_body, str) else json.dumps(request_body)
    response = client.post("/v1/chat/completions", content=raw.encode("utf-8"),
                           headers={"Content-Type": "application/json"})
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert response.status_code == status and words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text


def test_the_server_serves_on_after_every_bad_request(client, chat):
    for request_body, _, _ in BAD:
        raw = request_body if isinstance(request_body, str) else json.dumps(request_body)
        client.post("/v1/chat/completions", content=raw.encode("utf-8"))
    response = client.post("/v1/chat/completions", json=body(max_tokens=6))
    assert response.status_code == 200 and client.get("/health").json()["status"] == "ok"


def test_a_tiny_temperature_is_greedy_and_the_limits_are_inclusive(client):
    def answer(**changes):
        response = client.post("/v1/chat/completions", json=body(max_tokens=8, **changes))
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    greedy = answer()
    assert answer(temperature=1e-300, repetition_penalty=10.0) == answer(repetition_penalty=10.0)
    assert answer(temperature=1e-300, seed=2**64 - 1) == greedy == answer(temperature=0, seed=-2**63)
    assert answer(max_completion_tokens=8, stop=["x" * 256, "a\n", "###", "zz"], top_p=1e-9) is not None


async def _together(app, bodies):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
        return await asyncio.gather(*[client.post("/v1/chat/completions", json=b) for b in bodies])


def test_poisoned_requests_beside_a_good_one_leave_its_answer_alone(chat):
    """Sent together: values that once broke a decode step for everyone are refused alone, or are safe."""
    messages = [user([{"type": "image_url", "image_url": {"url": RED}}, {"type": "text", "text": "Describe it."}])]
    good = body(messages=messages, max_tokens=12, temperature=1.0, seed=5)
    poisoned = [body(seed=2**64, temperature=1), body(temperature=1e-300, repetition_penalty=10.0),
                body(repetition_penalty=1e300, temperature=1), body(stop="x" * 10**5)]
    engine = Engine.from_chat(chat, EngineConfig(max_batch=8))
    try:
        responses = asyncio.run(_together(create_app(engine), [good, *poisoned, good]))
    finally:
        engine.close()
    assert [r.status_code for r in responses] == [200, 400, 200, 400, 400, 200]
    alone = chat.answer(load_images(from_openai(messages)), SamplingParams(max_new_tokens=12, temperature=1.0, seed=5))
    assert [responses[i].json()["choices"][0]["message"]["content"] for i in (0, 5)] == [alone, alone]


def test_a_row_that_fails_in_the_engine_fails_alone(chat, monkeypatch):
    """Past validation (a bug, or a value torch refuses): the engine ends that row with an error, the rest go on."""
    real = sparkles.engine.sample

    def sample(logits, params, generator=None, seen=None):
        if params.top_k == 7:  # the marked request's sampling breaks
            raise FloatingPointError("probability tensor contains inf")
        return real(logits, params, generator, seen)

    monkeypatch.setattr(sparkles.engine, "sample", sample)
    conversation = load_images(from_openai([user([{"type": "image_url", "image_url": {"url": RED}},
                                                  {"type": "text", "text": "Describe it."}])]))
    good = SamplingParams(max_new_tokens=30, temperature=1.0, seed=3)
    engine = Engine.from_chat(chat, EngineConfig(max_batch=4))
    try:
        encoded = engine.encode(conversation)
        first = engine.submit(encoded, good, ignore_eos=True)
        events = iter(first)
        head = next(events)  # the good one is decoding; the others join its batch
        with engine._cond:  # the scheduler waits while a seed that validation refuses is forced through
            broken = [engine.submit(encoded, SamplingParams(max_new_tokens=30, top_k=7)), engine.submit(encoded, good)]
            object.__setattr__(broken[1].params, "seed", 2**70)
        ends = [list(r)[-1] for r in broken]
        text = head.text + "".join(e.text for e in events)
    finally:
        engine.close()
    assert [e.finish_reason for e in ends] == ["error", "error"]
    assert "FloatingPointError" in ends[0].error and "seed" in ends[1].error
    alone = Engine.from_chat(chat, EngineConfig(max_batch=1))
    try:
        expected = "".join(e.text for e in alone.submit(alone.encode(conversation), good, ignore_eos=True))
    finally:
        alone.close()
    assert text == expected and engine.stats()["peak_batch"] >= 2 and engine.stats()["error"] == 2


def test_a_request_whose_sampling_breaks_gets_a_500_and_its_neighbour_its_answer(chat, monkeypatch):
    """Over HTTP: the broken row ends alone, with a JSON 500 (retrying would not help); the other is untouched."""
    real = sparkles.engine.sample

    def sample(logits, params, generator=None, seen=None):
        if params.top_k == 7:
            raise FloatingPointError("probability tensor contains inf")
        return real(logits, params, generator, seen)

    monkeypatch.setattr(sparkles.engine, "sample", sample)
    messages = [user([{"type": "image_url", "image_url": {"url": RED}}, {"type": "text", "text": "Describe it."}])]
    good = body(messages=messages, max_tokens=12, temperature=1.0, seed=5)
    engine = Engine.from_chat(chat, EngineConfig(max_batch=8))
    try:
        responses = asyncio.run(_together(create_app(engine), [good, body(top_k=7, max_tokens=12), good]))
        assert engine.alive and engine.stats()["error"] == 1
    finally:
        engine.close()
    assert [r.status_code for r in responses] == [200, 500, 200]
    error = responses[1].json()["error"]
    assert error["type"] == "server_error" and error["message"].startswith("generation failed for this request")
    alone = chat.answer(load_images(from_openai(messages)), SamplingParams(max_new_tokens=12, temperature=1.0, seed=5))
    assert [responses[i].json()["choices"][0]["message"]["content"] for i in (0, 2)] == [alone, alone]
