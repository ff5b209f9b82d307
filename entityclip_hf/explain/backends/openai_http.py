"""Explanations from an OpenAI-compatible HTTP server (vLLM, TGI, llama.cpp server)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..cache import ExplanationResult
from ..prompt import build_messages, build_plain_prompt, clean_plain_continuation


class _RequestFailed(Exception):
    pass


class OpenAICompatibleExplainer:
    """Explanations from an OpenAI-compatible HTTP server (vLLM, TGI, llama.cpp server...).

    ``endpoint="chat"`` posts ``build_messages`` to ``{base_url}/v1/chat/completions`` (the server applies the
    model's chat template); ``endpoint="completions"`` posts ``build_plain_prompt`` to ``{base_url}/v1/completions``.
    Each request waits at most ``timeout`` seconds; connection errors, timeouts, 429 and 5xx answers are retried up
    to ``retries`` times with exponential backoff (honouring Retry-After); other 4xx answers fail at once. Failures
    are returned as results carrying the error message. ``concurrency`` requests run at once (one thread each).
    """

    batch_size = 1

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        endpoint: str = "chat",
        model_id: str | None = None,
        max_new_tokens: int = 160,
        temperature: float = 0.0,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        concurrency: int = 8,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"server URL must start with http:// or https://, got {base_url!r}")
        if endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}")
        if concurrency < 1 or retries < 0 or timeout <= 0:
            raise ValueError(
                f"need concurrency >= 1, retries >= 0, timeout > 0 (got {concurrency}, {retries}, {timeout})"
            )
        root = base_url.rstrip("/")
        # Accept both conventions: "http://host:8000" and the OpenAI client's "http://host:8000/v1".
        root = root[: -len("/v1")] if root.endswith("/v1") else root
        self.url = root + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")
        self.server_model = model
        self.model_id = model_id or model
        self.endpoint = endpoint
        self.api_key = api_key
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = concurrency
        self._local = threading.local()  # a requests.Session is not thread-safe: one per worker thread

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["Content-Type"] = "application/json"
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
        return session

    def payload(self, text: str) -> dict[str, Any]:
        """The JSON body posted for ``text``."""
        body: dict[str, Any] = {"model": self.server_model, "max_tokens": self.max_new_tokens}
        body["temperature"] = self.temperature
        if self.endpoint == "chat":
            body["messages"] = build_messages(text)
        else:
            body["prompt"] = build_plain_prompt(text)
        return body

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        if retry_after:
            try:
                delay = max(delay, min(self.max_backoff, float(retry_after)))
            except ValueError:  # an HTTP date: keep our own backoff
                pass
        return delay

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import requests

        attempts = self.retries + 1
        last_error = "no attempt made"
        retry_after = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self._delay(attempt, retry_after))
            retry_after = None
            try:
                response = self._session().post(self.url, json=body, timeout=self.timeout)
            except requests.Timeout:
                last_error = f"no answer within {self.timeout:g} s"
                continue
            except requests.ConnectionError as error:
                last_error = f"connection error: {error}"
                continue
            except requests.RequestException as error:  # invalid URL and the like: retrying cannot help
                raise _RequestFailed(f"request error: {error}") from None
            if response.status_code == 429 or response.status_code >= 500:
                last_error = f"HTTP {response.status_code}: {response.text[:300]}"
                retry_after = response.headers.get("Retry-After")
                continue
            if response.status_code >= 400:
                raise _RequestFailed(f"HTTP {response.status_code}: {response.text[:300]}")
            try:
                return response.json()
            except ValueError:
                raise _RequestFailed(f"answer is not JSON: {response.text[:300]!r}") from None
        raise _RequestFailed(f"{last_error} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})")

    def explain_one(self, text: str) -> ExplanationResult:
        """Ask the server about one text; any failure comes back as a failed result."""
        try:
            answer = self._post(self.payload(text))
        except _RequestFailed as error:
            return ExplanationResult.failure(text, str(error))
        try:
            choice = answer["choices"][0]
            generated = choice["message"]["content"] if self.endpoint == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError):
            return ExplanationResult.failure(text, f"unexpected answer: {json.dumps(answer)[:300]}")
        if generated is not None and not isinstance(generated, str):
            return ExplanationResult.failure(text, f"unexpected answer: {json.dumps(answer)[:300]}")
        if self.endpoint == "completions":
            generated = clean_plain_continuation(generated or "")
        return ExplanationResult.from_generation(text, generated)

    def explain_batch(self, texts: Sequence[str]) -> list[ExplanationResult]:
        return [self.explain_one(text) for text in texts]
