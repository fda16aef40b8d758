"""The OpenAI-compatible client: answers, bounded retries with the same model, errors that are not retried."""

import json

import httpx
import pytest

from sparkles.client import Client, EndpointConfig, EndpointError


def endpoint(replies):
    """A transport that answers each request with the next (status, body) and records the requests."""
    seen = []

    def handle(request):
        seen.append(json.loads(request.content))
        status, body = replies[min(len(seen), len(replies)) - 1]
        return httpx.Response(status, text=body if isinstance(body, str) else json.dumps(body))

    return httpx.MockTransport(handle), seen


def ok(text="fine"):
    return 200, {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}, "model": "judge-1"}


def client(transport, **kw):
    return Client(EndpointConfig("http://127.0.0.1:9/v1", "judge-1", **kw), transport=transport, sleep=lambda s: None)


def test_an_answer_with_usage():
    transport, seen = endpoint([ok("hello")])
    done = client(transport).chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=5)
    assert done.text == "hello" and done.usage["total_tokens"] == 4 and done.attempts == 1
    assert seen[0] == {"model": "judge-1", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                       "max_tokens": 5}


def test_retries_are_bounded_and_keep_the_model():
    transport, seen = endpoint([(503, "busy"), (429, "slow down"), (200, "not json"), ok("at last")])
    done = client(transport, max_attempts=4).chat([{"role": "user", "content": "hi"}])
    assert done.text == "at last" and done.attempts == 4
    assert {s["model"] for s in seen} == {"judge-1"}
    transport, seen = endpoint([(500, "down")])
    with pytest.raises(EndpointError, match="no usable answer in 3 attempts; last: HTTP 500: down"):
        client(transport, max_attempts=3).chat([])
    assert len(seen) == 3


def test_a_bad_request_is_not_retried():
    transport, seen = endpoint([(400, '{"error": {"message": "bad model"}}')])
    with pytest.raises(EndpointError, match="HTTP 400") as caught:
        client(transport).chat([])
    assert len(seen) == 1 and caught.value.status == 400


def test_the_key_comes_from_the_named_variable(monkeypatch):
    headers = []
    transport = httpx.MockTransport(lambda r: headers.append(r.headers.get("authorization")) or httpx.Response(
        200, json=ok()[1]))
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    client(transport, api_key_env="MY_JUDGE_KEY").chat([])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client(transport).chat([])
    assert headers == ["Bearer sk-test", None]
