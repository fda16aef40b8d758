"""GET /metrics: Prometheus's text format, read back with prometheus_client's own parser, counting what the
requests did (their answers' usage, their finish reasons, the errors), the prefix cache as /health shows it, and a
client that leaves a stream."""

import json
import time

import httpx
import pytest

from sparkles.generate import Chat
from sparkles.serve.server import ServeConfig, create_app

pytest.importorskip("fastapi")
parser = pytest.importorskip("prometheus_client.parser")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import ask, sse, two_images  # noqa: E402


@pytest.fixture
def chat(tiny):
    return Chat(*tiny)


def scrape(get) -> dict:
    """{(sample name, frozenset of labels but model_name): value} from one GET /metrics."""
    response = get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in parser.text_string_to_metric_families(response.text):
        for s in family.samples:
            assert s.labels.pop("model_name") == "sparkles"
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def test_metrics_count_the_requests_answers_errors_and_prefix_cache(chat):
    with TestClient(create_app(chat, ServeConfig(prefix_cache_mb=64))) as client:
        before = scrape(client.get)
        assert total(before, "sparkles_engine_up") == 1 and total(before, "sparkles_request_finished_total") == 0
        first = ask(client, two_images(), max_tokens=6, ignore_eos=True).json()
        follow = two_images() + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                                 {"role": "user", "content": "And now?"}]
        lines = ask(client, follow, max_tokens=5, stream=True, ignore_eos=True,
                    stream_options={"include_usage": True}).text.splitlines()
        chunks = [json.loads(d) for d in sse(lines) if d != "[DONE]"]
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        second = chunks[-1]["usage"]
        assert ask(client, two_images(), model="other").status_code == 404
        assert ask(client, [{"role": "user", "content": "IMAGE#3?"}]).status_code == 400
        samples, health = scrape(client.get), client.get("/health").json()

    usages = [first["usage"], second]
    assert total(samples, "sparkles_request_finished_total", finished_reason="length") == 2
    assert total(samples, "sparkles_request_finished_total") == 2
    assert total(samples, "sparkles_request_refused_total", status="404") == 1
    assert total(samples, "sparkles_request_refused_total", status="400") == 1
    for name, key in (("sparkles_request_prompt_tokens", "prompt_tokens"),
                      ("sparkles_request_generation_tokens", "completion_tokens")):
        assert total(samples, name + "_count") == 2
        assert total(samples, name + "_sum") == sum(u[key] for u in usages)
    assert total(samples, "sparkles_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert total(samples, "sparkles_generation_tokens_total") == 6 + 5
    # A first text exists only where an answer shows something; every request was queued and ended.
    texts = [first["choices"][0]["message"]["content"].strip(), streamed.strip()]
    assert total(samples, "sparkles_time_to_first_token_seconds_count") == sum(map(bool, texts))
    for name in ("sparkles_e2e_request_latency_seconds", "sparkles_request_queue_time_seconds",
                 "sparkles_request_prepare_seconds"):
        assert total(samples, name + "_count") == 2
        assert total(samples, name + "_bucket", le="+Inf") == 2
    assert total(samples, "sparkles_e2e_request_latency_seconds_sum") >= \
        total(samples, "sparkles_time_to_first_token_seconds_sum") > 0 or not any(texts)
    cache = health["prefix_cache"]
    assert cache["hits"] >= 1  # the follow-up resumed from the first request's prompt
    for name, key in (("hits", "hits"), ("misses", "misses"), ("reused_tokens", "tokens_reused")):
        assert total(samples, f"sparkles_prefix_cache_{name}_total") == cache[key]
    assert total(samples, "sparkles_prefix_cache_bytes") == cache["bytes"] > 0
    assert total(samples, "sparkles_num_requests_running") == 0
    images = health["image_cache"]  # the follow-up sent the same two images: decoded and preprocessed once
    assert total(samples, "sparkles_image_cache_hits_total", kind="pixels") == images["pixels_hits"] == 2
    assert total(samples, "sparkles_image_cache_hits_total", kind="inputs") == images["inputs_hits"] == 2
    assert total(samples, "sparkles_image_cache_bytes") == images["bytes"] > 0
    assert total(samples, "sparkles_prepare_workers", pool="heavy") == ServeConfig.workers


def test_two_apps_count_apart_and_a_client_that_leaves_is_cancelled(live, chat):
    url, app = live
    with TestClient(create_app(chat, ServeConfig())) as other:
        body = {"model": "sparkles", "messages": two_images(), "max_tokens": 900, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            while not next(lines).startswith("data: {\"id\""):
                pass
        deadline = time.monotonic() + 10
        while (total(samples := scrape(lambda p: httpx.get(url + p)), "sparkles_request_finished_total") < 1
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert total(samples, "sparkles_request_finished_total", finished_reason="cancelled") == 1
        assert total(samples, "sparkles_request_generation_tokens_count") == 0  # no final event was read
        assert total(scrape(other.get), "sparkles_request_finished_total") == 0
