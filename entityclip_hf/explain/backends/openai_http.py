"""Explanations from OpenAI-compatible HTTP servers (vLLM, TGI, llama.cpp server), one or several at once."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..prompt import build_messages, build_plain_prompt
from ..results import ExplanationResult, result_from_completion
from .http_transport import DeadlineAdapter, RequestAttempt, ServerPool

DEFAULT_MAX_RESPONSE_BYTES = 1 << 20


class _RequestFailed(Exception):
    pass


class _RetryableFailure(Exception):
    """The server is in trouble (no connection, reset, timeout, 429, 5xx): try again, maybe elsewhere."""

    def __init__(self, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _server_root(base_url: str) -> str:
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"server URL must start with http:// or https://, got {base_url!r}")
    root = base_url.rstrip("/")
    # Accept both conventions: "http://host:8000" and the OpenAI client's "http://host:8000/v1".
    return root[: -len("/v1")] if root.endswith("/v1") else root


class OpenAICompatibleExplainer:
    """Explanations from OpenAI-compatible HTTP servers (vLLM, TGI, llama.cpp server...).

    ``endpoint="chat"`` posts ``build_messages`` to ``{base_url}/v1/chat/completions`` (the server applies the
    model's chat template); ``endpoint="completions"`` posts ``build_plain_prompt`` to ``{base_url}/v1/completions``.
    ``base_url`` may be a list of servers serving the same model: requests go to the least loaded healthy one
    (``ServerPool``), and a server that fails is passed over for a while.

    Each attempt has a total deadline of ``timeout`` seconds (connecting, the status line, headers and body
    together). Connection errors (refused, reset mid-answer), timeouts, 429 and 5xx answers are retried up to
    ``retries`` times with exponential backoff (honouring Retry-After); other 4xx answers fail at once. An answer
    body over ``max_response_bytes`` fails without being read further. Failures are returned as results carrying
    the error message. ``concurrency`` requests run at once (one thread each).
    """

    batch_size = 1

    def __init__(
        self,
        base_url: str | Sequence[str],
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
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("need at least one server URL")
        if endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}")
        if concurrency < 1 or retries < 0 or timeout <= 0 or max_response_bytes < 1:
            raise ValueError(
                "need concurrency >= 1, retries >= 0, timeout > 0, max_response_bytes >= 1 "
                f"(got {concurrency}, {retries}, {timeout}, {max_response_bytes})"
            )
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        self.urls = [_server_root(url) + path for url in urls]
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"the same server is given twice: {urls}")
        self.url = self.urls[0]
        self.servers = ServerPool(self.urls, backoff=backoff, max_backoff=min(max_backoff, 30.0))
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
        self.max_response_bytes = max_response_bytes
        self._local = threading.local()  # a requests.Session is not thread-safe: one per worker thread

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            adapter = DeadlineAdapter()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["Content-Type"] = "application/json"
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
        return session

    def _drop_session(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None

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

    def _read_body(self, response, attempt: RequestAttempt) -> bytes:
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(chunk_size=1 << 16):
            size += len(chunk)
            if size > self.max_response_bytes:
                response.close()
                raise _RequestFailed(
                    f"answer larger than {self.max_response_bytes} bytes; not read further (max_response_bytes)"
                )
            chunks.append(chunk)
            if attempt.remaining() <= 0:
                raise TimeoutError
        return b"".join(chunks)

    def _attempt(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request to one server; raises _RetryableFailure or _RequestFailed, or returns the parsed answer."""
        import requests

        with RequestAttempt(self.timeout) as attempt:
            try:
                response = self._session().post(url, json=body, timeout=(self.timeout, self.timeout), stream=True)
                with response:
                    status = response.status_code
                    data = self._read_body(response, attempt)
            except _RequestFailed:
                raise
            except requests.exceptions.InvalidURL as error:  # retrying cannot help
                raise _RequestFailed(f"request error: {error}") from None
            except (requests.RequestException, OSError, TimeoutError) as error:
                # A reset or a watchdog shutdown mid-answer surfaces as ChunkedEncodingError or ConnectionError.
                self._drop_session()  # its connection may be half-read: never reuse it
                if attempt.expired or isinstance(error, (requests.Timeout, TimeoutError)):
                    raise _RetryableFailure(f"no answer within {self.timeout:g} s") from None
                raise _RetryableFailure(f"connection error: {error}") from None
        if attempt.expired:  # the deadline passed just as the answer completed: the socket is shut, drop it
            self._drop_session()
        shown = data[:300].decode("utf-8", "replace")
        if status == 429 or status >= 500:
            raise _RetryableFailure(f"HTTP {status}: {shown}", response.headers.get("Retry-After"))
        if status >= 400:
            raise _RequestFailed(f"HTTP {status}: {shown}")
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _RequestFailed(f"answer is not JSON: {shown!r}") from None

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        attempts = self.retries + 1
        last_error = "no attempt made"
        retry_after = None
        last_server = None
        for attempt in range(attempts):
            if attempt and not (last_server is not None and self.servers.another_is_healthy(last_server)):
                time.sleep(self._delay(attempt, retry_after))
            server = self.servers.acquire()
            last_server = server
            server_failed = False
            try:
                return self._attempt(self.urls[server], body)
            except _RetryableFailure as failure:
                server_failed = True
                where = f" from {self.urls[server]}" if len(self.urls) > 1 else ""
                last_error, retry_after = f"{failure}{where}", failure.retry_after
            finally:
                self.servers.release(server, server_failed)
        raise _RequestFailed(f"{last_error} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})")

    def explain_one(self, text: str) -> ExplanationResult:
        """Ask a server about one text; any failure comes back as a failed result."""
        try:
            answer = self._post(self.payload(text))
        except _RequestFailed as error:
            return ExplanationResult.failure(text, str(error))
        return result_from_completion(text, answer, self.endpoint)

    def explain_batch(self, texts: Sequence[str]) -> list[ExplanationResult]:
        return [self.explain_one(text) for text in texts]
