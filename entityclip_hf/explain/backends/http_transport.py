"""HTTP plumbing for the server backend: a per-request total deadline, a size cap on answers, several servers.

``requests``' ``timeout`` bounds each socket operation, not a request: a server that trickles one byte at a time holds
a request for as long as it likes. Here a watchdog shuts the request's socket down when its deadline passes, which
wakes a blocked read wherever it is (status line, headers or body), so a request never outlives its deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection

_current = threading.local()  # the attempt the calling thread is making (one request at a time per thread)


class RequestAttempt:
    """One HTTP attempt under a deadline: the watchdog shuts its socket down when the time is up."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._socket = sock
            if self.expired:
                self._shutdown()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._socket is not None:
            try:  # shutdown (not close) wakes a read blocked in another thread at once
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> RequestAttempt:
        _current.attempt = self
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()
        _current.attempt = None


def _watch_current_socket(connection) -> None:
    attempt = getattr(_current, "attempt", None)
    if attempt is not None:
        attempt.watch(connection.sock)


class _WatchedHTTPConnection(HTTPConnection):
    def getresponse(self, *args, **kwargs):
        _watch_current_socket(self)  # the request is sent; from here on the server decides how long we wait
        return super().getresponse(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def getresponse(self, *args, **kwargs):
        _watch_current_socket(self)
        return super().getresponse(*args, **kwargs)


class DeadlineAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose connections let the current ``RequestAttempt`` shut them down at its deadline."""

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        pool = super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        pool.ConnectionCls = _WatchedHTTPSConnection if pool.scheme == "https" else _WatchedHTTPConnection
        return pool


class ServerPool:
    """Spreads requests over several servers: the least loaded healthy one, round-robin among equals.

    A server whose request failed in a way that says it is in trouble (connection error, timeout, 429, 5xx) is
    passed over for a backoff that doubles with each failure in a row (``backoff`` .. ``max_backoff`` seconds) and
    resets on its next success. When every server is backing off, the one whose backoff ends first is used.
    """

    def __init__(self, urls: Sequence[str], backoff: float = 1.0, max_backoff: float = 30.0):
        if not urls:
            raise ValueError("need at least one server URL")
        self.urls = list(urls)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.in_flight = [0] * len(self.urls)
        self.failures_in_a_row = [0] * len(self.urls)
        self.down_until = [0.0] * len(self.urls)
        self.requests = [0] * len(self.urls)
        self._next = 0
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            now = time.monotonic()
            count = len(self.urls)
            order = [(self._next + offset) % count for offset in range(count)]
            healthy = [index for index in order if self.down_until[index] <= now]
            if healthy:
                chosen = min(healthy, key=lambda index: self.in_flight[index])  # min keeps the first of equals
            else:
                chosen = min(order, key=lambda index: self.down_until[index])
            self._next = (chosen + 1) % count
            self.in_flight[chosen] += 1
            self.requests[chosen] += 1
            return chosen

    def release(self, index: int, server_failed: bool) -> None:
        with self._lock:
            self.in_flight[index] -= 1
            if server_failed:
                self.failures_in_a_row[index] += 1
                wait = min(self.max_backoff, self.backoff * 2 ** (self.failures_in_a_row[index] - 1))
                self.down_until[index] = time.monotonic() + wait
            else:
                self.failures_in_a_row[index] = 0
                self.down_until[index] = 0.0

    def another_is_healthy(self, index: int) -> bool:
        """Whether a server other than ``index`` can take a request now (then a retry need not wait)."""
        with self._lock:
            now = time.monotonic()
            return any(self.down_until[other] <= now for other in range(len(self.urls)) if other != index)
