"""A small client for OpenAI-compatible chat endpoints: the teacher for synthesis, the judge and remote models for
evaluation, and our own server in tests.

Plain HTTP through httpx, no torch. Retries are bounded, with exponential back-off, and every attempt uses the same
model: the original retried forever and silently switched a judge from one model to another (spec §12.2).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, SparklesError


class EndpointError(SparklesError):
    """The endpoint did not give a usable answer within the allowed attempts."""

    def __init__(self, message: str, *, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status, self.body = status, body


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens, total_tokens when reported
    model: str = ""
    attempts: int = 1


@dataclass(frozen=True)
class EndpointConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the variable that holds the key; an unset variable means no key
    timeout: float = 60.0  # seconds per attempt
    max_attempts: int = 4
    backoff: float = 1.0  # seconds before the second attempt; doubles each time, with jitter


# 408/409/429 and 5xx are worth another try; any other 4xx is our request's fault and will not change.
RETRYABLE = {408, 409, 429}


class Client:
    """Synchronous and thread-safe: callers that want concurrency run it from a thread pool."""

    def __init__(self, config: EndpointConfig, *, transport=None, sleep=time.sleep):
        import httpx

        if not config.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint base URL must start with http:// or https://, got {config.base_url!r}")
        key = os.environ.get(config.api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.config, self.sleep = config, sleep
        self.http = httpx.Client(base_url=config.base_url.rstrip("/") + "/", headers=headers,
                                 timeout=config.timeout, transport=transport)

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> Completion:
        """One chat completion; `params` (temperature, max_tokens, seed, stop, …) go into the request body."""
        body = {"model": self.config.model, "messages": messages, **params}
        last = "no attempt made"
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                return self._once(body, attempt)
            except EndpointError as e:
                if e.status is not None and e.status < 500 and e.status not in RETRYABLE:
                    raise
                last = str(e)
            if attempt < self.config.max_attempts:
                delay = self.config.backoff * 2 ** (attempt - 1)
                self.sleep(delay * (0.5 + random.random()))
        raise EndpointError(f"{self.config.base_url} gave no usable answer in {self.config.max_attempts} attempts; "
                            f"last: {last}")

    def _once(self, body: dict, attempt: int) -> Completion:
        import httpx

        try:
            response = self.http.post("chat/completions", json=body)
        except httpx.HTTPError as e:
            raise EndpointError(f"request failed: {type(e).__name__}: {e}") from None
        if response.status_code != 200:
            text = response.text[:500]
            raise EndpointError(f"HTTP {response.status_code}: {text}", status=response.status_code, body=text)
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(f"not a chat completion: {response.text[:200]!r}") from None
        return Completion(text=text, finish_reason=choice.get("finish_reason"), usage=data.get("usage") or {},
                          model=data.get("model", self.config.model), attempts=attempt)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
