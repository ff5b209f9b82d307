"""Faults a long explanation job meets: texts the cache cannot store, resets, trickling servers, dead servers, huge
answers. Each test here failed before its fix (issue 12, item 4).

The servers are raw sockets on 127.0.0.1, so that they can misbehave below HTTP; every loop in them is bounded.
"""

import json
import socket
import struct
import threading
import time

import pytest

from entityclip_hf.explain import (
    CircuitBreakerOpen,
    ExplanationCache,
    ExplanationResult,
    OpenAICompatibleExplainer,
    explain_texts,
    iter_cache_records,
    main,
    read_explanation_cache,
)

from .test_explain_http import FakeOpenAIServer


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class EchoExplainer:
    """A generator with no model: the explanation is made from the text (or what ``answer`` returns)."""

    model_id = "echo"
    batch_size = 2
    concurrency = 1

    def __init__(self, answer=lambda text: f"About {text}."):
        self.answer = answer
        self.asked = []

    def explain_batch(self, texts):
        self.asked.extend(texts)
        results = []
        for text in texts:
            answer = self.answer(text)
            results.append(ExplanationResult.failure(text, answer[1]) if isinstance(answer, tuple) else
                           ExplanationResult.from_generation(text, answer))  # fmt: skip
        return results


def chat_answer(content):
    return json.dumps(
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
    ).encode()


class RawServer:
    """An HTTP/1.1 server on a raw socket whose ``behaviour(connection, request_number)`` writes what it likes."""

    def __init__(self, behaviour, max_connections=50):
        self.behaviour = behaviour
        self.requests = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        self.max_connections = max_connections
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        for _ in range(self.max_connections):
            while not self.stopped.is_set():
                try:
                    connection, _ = self.listener.accept()
                    break
                except TimeoutError:
                    continue
            else:
                return
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _handle(self, connection):
        with connection:
            connection.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 1 << 20:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            )
            while len(body) < length:
                body += connection.recv(65536)
            self.requests += 1
            try:
                self.behaviour(connection, self.requests)
            except OSError:  # the client hung up: expected in these tests
                pass

    def close(self):
        self.stopped.set()
        self.thread.join(timeout=2)  # accept() wakes every 0.2 s to see the flag
        self.listener.close()


def send_answer(connection, body, status=b"200 OK"):
    connection.sendall(
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )  # fmt: skip


def reset(connection):
    # SO_LINGER with a zero timeout: close() sends a TCP RST, as a crashing proxy or server does.
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- (a) texts and answers UTF-8 cannot store -----------------------------------------------------------------


def test_a_lone_surrogate_in_a_text_is_one_failed_record_naming_it_and_the_rest_is_kept(tmp_path):
    texts = ["Obama in Washington.", "A caption cut inside an emoji \ud83d", "The Eiffel Tower."]
    explainer = EchoExplainer()
    cache = tmp_path / "cache.jsonl"
    summary = explain_texts(texts, explainer, cache, progress=False)
    assert (summary.generated, summary.failed) == (2, 1)
    assert "\ud83d" not in "".join(explainer.asked)  # never sent to the model
    records = list(iter_cache_records(cache))
    (failed,) = [r for r in records if not r["ok"]]
    assert failed["text"] == "A caption cut inside an emoji \\ud83d"  # escaped: the line names the text
    assert "U+D83D" in failed["error"] and "surrogate" in failed["error"]
    assert set(read_explanation_cache(cache)) == {texts[0], texts[2]}
    # Every rerun gets through too (the text stays a failure; nothing else is asked again).
    assert explain_texts(texts, EchoExplainer(), cache, progress=False).failed == 1


def test_an_answer_holding_a_lone_surrogate_fails_alone_and_the_rest_of_the_write_is_kept(tmp_path):
    cache_path = tmp_path / "cache.jsonl"
    with ExplanationCache(cache_path, "m") as cache:
        cache.append(
            [
                ExplanationResult("one", "Fine."),
                ExplanationResult("two", "Cut \udc00 answer."),
                ExplanationResult("three", "Also fine."),
            ]
        )
    records = list(iter_cache_records(cache_path))
    assert [(r["text"], r["ok"]) for r in records] == [("one", True), ("two", False), ("three", True)]
    assert "answer cannot be stored" in records[1]["error"] and "\\udc00" in records[1]["error"]


def test_a_server_answer_holding_a_lone_surrogate_is_a_failure_not_a_crash(tmp_path):
    class SurrogateServer(FakeOpenAIServer):
        def answer(self, path, body):
            status, payload, headers = super().answer(path, body)
            if "SURROGATE" in self.prompt_of(path, body):
                payload["choices"][0]["message"]["content"] = "Cut \ud83d"  # json.dumps writes the "\ud83d" escape
            return status, payload, headers

    server = SurrogateServer()
    try:
        explainer = OpenAICompatibleExplainer(server.url, "m", concurrency=2, retries=0)
        cache = tmp_path / "cache.jsonl"
        summary = explain_texts(["item-01 ok", "item-02 SURROGATE", "item-03 ok"], explainer, cache, progress=False)
    finally:
        server.close()
    assert (summary.generated, summary.failed) == (2, 1)
    by_text = {r["text"]: r for r in iter_cache_records(cache)}
    assert by_text["item-01 ok"]["ok"] and by_text["item-03 ok"]["ok"]
    assert not by_text["item-02 SURROGATE"]["ok"] and "cannot be stored" in by_text["item-02 SURROGATE"]["error"]


# --- (b) a connection reset mid-answer is retried -------------------------------------------------------------


def test_a_connection_reset_mid_answer_is_retried():
    body = chat_answer("Explanation after a reset.")

    def behaviour(connection, number):
        if number == 1:  # headers and half the body, then a reset
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            connection.sendall(head + body[: len(body) // 2])
            time.sleep(0.05)
            reset(connection)
            return
        send_answer(connection, body)

    server = RawServer(behaviour)
    try:
        explainer = OpenAICompatibleExplainer(server.url, "m", retries=2, backoff=0.01, timeout=5)
        result = explainer.explain_one("item-01 text")
    finally:
        server.close()
    assert result.ok and result.explanation == "Explanation after a reset.", result.error
    assert server.requests == 2


# --- (c) --timeout is a total deadline ------------------------------------------------------------------------


def trickle(connection, number):
    # One byte every 0.2 s, status line included: every single read is quick, the whole answer never ends.
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + b" " * 400
    for byte in answer[:400]:  # bounded: at most 80 s, and the client hangs up long before
        connection.sendall(bytes([byte]))
        time.sleep(0.2)


def test_timeout_is_a_total_deadline_against_a_server_that_trickles(tmp_path, capsys):
    server = RawServer(trickle)
    data = tmp_path / "texts.txt"
    data.write_text("item-01 Obama\n")
    argv = ["--input", str(data), "--cache", str(tmp_path / "c.jsonl"), "--server", server.url, "--server-model", "m"]
    started = time.monotonic()
    try:
        code = main([*argv, "--timeout", "1", "--retries", "0", "--no-progress"])
    finally:
        server.close()
    elapsed = time.monotonic() - started
    assert code == 1
    assert elapsed < 3.0, f"a 1 s deadline took {elapsed:.1f} s"
    (record,) = iter_cache_records(tmp_path / "c.jsonl")
    assert not record["ok"] and "no answer within 1 s" in record["error"]


# --- (d) the circuit breaker ----------------------------------------------------------------------------------


def dead_url():
    with socket.socket() as probe:  # a port on 127.0.0.1 that nobody listens on
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_a_dead_server_trips_the_circuit_breaker_with_a_message_and_exit_code_3(tmp_path, capsys):
    data = tmp_path / "texts.txt"
    data.write_text("".join(f"item-{i:03d} text\n" for i in range(200)))
    cache = tmp_path / "c.jsonl"
    argv = ["--input", str(data), "--cache", str(cache), "--server", dead_url(), "--server-model", "m"]
    started = time.monotonic()
    code = main([*argv, "--retries", "0", "--concurrency", "4", "--max-consecutive-failures", "8", "--no-progress"])
    assert code == 3
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "stopped after" in err and "consecutive failures" in err and "connection error" in err
    records = list(iter_cache_records(cache))  # the cache is intact: whole lines, far fewer than 200
    assert 8 <= len(records) < 40 and cache.read_bytes().endswith(b"\n")


def test_successes_reset_the_breaker_and_zero_disables_it(tmp_path):
    alternating = EchoExplainer(lambda text: ("fail", "boom") if text.startswith("bad!") else f"About {text}.")
    texts = [f"{'bad!' if i % 2 else 'good'} {i:03d}" for i in range(40)]
    for text in texts:
        assert len(text) == 8  # same length: the run keeps this order (longest first), so failures alternate
    summary = explain_texts(texts, alternating, tmp_path / "a.jsonl", progress=False, max_consecutive_failures=3)
    assert (summary.generated, summary.failed) == (20, 20)

    always = EchoExplainer(lambda text: ("fail", "boom"))
    with pytest.raises(CircuitBreakerOpen, match="stopped after 4 consecutive failures") as stopped:
        explain_texts(texts, always, tmp_path / "b.jsonl", progress=False, max_consecutive_failures=4)
    assert stopped.value.summary.failed == 4 and len(always.asked) == 4
    summary = explain_texts(texts, always, tmp_path / "c.jsonl", progress=False, max_consecutive_failures=None)
    assert summary.failed == 40


# --- (e) a cap on an answer's size ----------------------------------------------------------------------------


def test_an_over_long_answer_is_a_failure_or_is_cut_with_the_flag(tmp_path):
    rambling = EchoExplainer(lambda text: "word " * 5000)  # 25,000 characters
    summary = explain_texts(["a text"], rambling, tmp_path / "a.jsonl", progress=False)
    (record,) = iter_cache_records(tmp_path / "a.jsonl")
    assert summary.failed == 1 and not record["ok"] and "answer too long: 24999 characters" in record["error"]

    explain_texts(["a text"], rambling, tmp_path / "b.jsonl", progress=False, truncate_long_answers=True)
    (record,) = iter_cache_records(tmp_path / "b.jsonl")
    assert record["ok"] and len(record["explanation"]) <= 16384 and record["explanation"].endswith("word")

    explain_texts(["a text"], rambling, tmp_path / "c.jsonl", progress=False, max_answer_chars=None)
    (record,) = iter_cache_records(tmp_path / "c.jsonl")
    assert record["ok"] and len(record["explanation"]) == 24999


def test_a_huge_server_answer_is_not_read_whole(tmp_path):
    body = chat_answer("x" * (5 << 20))  # a 5 MB answer

    server = RawServer(lambda connection, number: send_answer(connection, body))
    try:
        explainer = OpenAICompatibleExplainer(server.url, "m", retries=0, timeout=10)
        result = explainer.explain_one("item-01 text")
    finally:
        server.close()
    assert not result.ok and "answer larger than 1048576 bytes" in result.error
