"""Explanations from an OpenAI-compatible server: a small local server on 127.0.0.1 answers, fails or stalls.

Also the crash test: the command line is killed mid-run (SIGKILL, SIGINT, SIGTERM), rerun, and the cache ends with
exactly one ok line per text, none lost.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from entityclip_hf.explain import (
    OpenAICompatibleExplainer,
    build_messages,
    build_plain_prompt,
    explain_texts,
    iter_cache_records,
    main,
)


class FakeOpenAIServer:
    """An OpenAI-compatible server whose answer depends on marker words in the text.

    Each text carries an id like ``item-07``; the answer is "Explanation of item-07." Markers: FAIL500 (500 on the
    first request, then ok), ALWAYS500, RATE429 (429 with Retry-After on the first request), BAD400, SLOW (answers
    after 1 s), EMPTY (empty content), NOTJSON. ``delay`` slows every answer down.
    """

    def __init__(self):
        self.delay = 0.0
        self.lock = threading.Lock()
        self.requests = []  # (path, headers, body) in arrival order
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, dict(self.headers), body))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, payload, headers = server.answer(self.path, body)
                    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request, client_address):
                pass  # a client that timed out and hung up is expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @staticmethod
    def prompt_of(path, body):
        return body["messages"][-1]["content"] if path.endswith("/chat/completions") else body["prompt"]

    def requests_for(self, marker):
        return [r for r in self.requests if marker in self.prompt_of(r[0], r[2])]

    def answer(self, path, body):
        prompt = self.prompt_of(path, body)
        item = re.search(r"item-\d+", prompt).group(0)
        with self.lock:
            seen = sum(item in self.prompt_of(p, b) for p, _, b in self.requests)
        time.sleep(self.delay)
        if "ALWAYS500" in prompt or ("FAIL500" in prompt and seen == 1):
            return 500, {"error": "overloaded"}, {}
        if "RATE429" in prompt and seen == 1:
            return 429, {"error": "slow down"}, {"Retry-After": "0"}
        if "BAD400" in prompt:
            return 400, {"error": {"message": "prompt too long"}}, {}
        if "NOTJSON" in prompt:
            return 200, "<html>proxy error</html>", {}
        if "SLOW" in prompt:
            time.sleep(1.0)
        content = "" if "EMPTY" in prompt else f"Explanation of {item}."
        if path.endswith("/chat/completions"):
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        else:
            choice = {"index": 0, "text": content + "\n\nText: another example", "finish_reason": "length"}
        return 200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice]}, {}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # never send the local requests through a proxy
    fake = FakeOpenAIServer()
    yield fake
    fake.close()


def make_explainer(server, **kwargs):
    options = dict(timeout=5.0, retries=2, backoff=0.01, concurrency=4, max_new_tokens=32)
    options.update(kwargs)
    return OpenAICompatibleExplainer(server.url, "tiny-server-model", **options)


def test_chat_requests_carry_the_prompt_model_and_key_and_answers_map_to_their_texts(server):
    explainer = OpenAICompatibleExplainer(
        server.url + "/v1/", "tiny-server-model", api_key="secret-key", max_new_tokens=32, concurrency=3
    )
    texts = [f"item-{i:02d} Barack Obama in Washington" for i in range(6)]
    results = [explainer.explain_one(text) for text in texts]
    assert [r.explanation for r in results] == [f"Explanation of item-{i:02d}." for i in range(6)]
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"  # a base URL ending in /v1 is not doubled
    assert headers["Authorization"] == "Bearer secret-key"
    assert body == {
        "model": "tiny-server-model",
        "max_tokens": 32,
        "temperature": 0.0,
        "messages": build_messages(texts[0]),
    }


def test_completions_endpoint_sends_the_plain_prompt_and_keeps_the_first_paragraph(server):
    explainer = make_explainer(server, endpoint="completions")
    result = explainer.explain_one("item-01 The Eiffel Tower")
    path, _, body = server.requests[0]
    assert path == "/v1/completions" and body["prompt"] == build_plain_prompt("item-01 The Eiffel Tower")
    assert result.ok and result.explanation == "Explanation of item-01."


def test_5xx_and_429_are_retried_then_succeed(server):
    explainer = make_explainer(server)
    assert explainer.explain_one("item-01 FAIL500").explanation == "Explanation of item-01."
    assert len(server.requests_for("FAIL500")) == 2
    assert explainer.explain_one("item-02 RATE429").explanation == "Explanation of item-02."
    assert len(server.requests_for("RATE429")) == 2


def test_persistent_5xx_gives_up_after_the_retries_with_the_message(server):
    result = make_explainer(server, retries=2).explain_one("item-01 ALWAYS500")
    assert not result.ok and len(server.requests_for("ALWAYS500")) == 3
    assert result.error.startswith("HTTP 500") and "overloaded" in result.error and "after 3 attempts" in result.error


def test_4xx_is_not_retried_and_is_recorded_as_a_failure(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    summary = explain_texts(["item-01 BAD400", "item-02 fine"], make_explainer(server), cache, progress=False)
    assert (summary.generated, summary.failed) == (1, 1)
    assert len(server.requests_for("BAD400")) == 1
    (failed,) = [r for r in iter_cache_records(cache) if not r["ok"]]
    assert failed["text"] == "item-01 BAD400" and failed["explanation"] is None
    assert failed["error"].startswith("HTTP 400") and "prompt too long" in failed["error"]


def test_timeout_is_a_failure_after_retries(server):
    started = time.monotonic()
    result = make_explainer(server, timeout=0.3, retries=1).explain_one("item-01 SLOW")
    assert not result.ok and "no answer within 0.3 s" in result.error and "after 2 attempts" in result.error
    assert len(server.requests_for("SLOW")) == 2
    assert time.monotonic() - started < 1.5  # did not wait for the slow answers


def test_empty_and_malformed_answers_are_failures(server):
    explainer = make_explainer(server)
    empty = explainer.explain_one("item-01 EMPTY")
    assert not empty.ok and empty.error == "empty generation" and empty.explanation is None
    not_json = explainer.explain_one("item-02 NOTJSON")
    assert not not_json.ok and "not JSON" in not_json.error and len(server.requests_for("NOTJSON")) == 1


def test_connection_refused_is_retried_then_recorded(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with socket.socket() as probe:  # a port on 127.0.0.1 that nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    explainer = OpenAICompatibleExplainer(f"http://127.0.0.1:{port}", "m", retries=2, backoff=0.01, timeout=2)
    result = explainer.explain_one("item-01 anything")
    assert not result.ok and result.error.startswith("connection error") and "after 3 attempts" in result.error


def test_concurrency_is_bounded_and_used(server, tmp_path):
    server.delay = 0.15
    texts = [f"item-{i:02d} text" for i in range(12)]
    summary = explain_texts(texts, make_explainer(server, concurrency=3), tmp_path / "c.jsonl", progress=False)
    assert summary.generated == 12
    assert server.max_in_flight == 3
    records = list(iter_cache_records(tmp_path / "c.jsonl"))
    assert sorted(r["text"] for r in records) == texts  # one whole line per text: writes never interleaved
    assert all(r["explanation"] == f"Explanation of {r['text'][:7]}." for r in records)


def test_cli_takes_the_api_key_from_the_environment_and_never_prints_it(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "env-secret-key")
    data = tmp_path / "texts.txt"
    data.write_text("item-01 Obama\n")
    argv = ["--input", str(data), "--cache", str(tmp_path / "c.jsonl"), "--server", server.url, "--server-model", "m"]
    assert main([*argv, "--no-progress"]) == 0
    assert server.requests[0][1]["Authorization"] == "Bearer env-secret-key"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "env-secret-key" not in capsys.readouterr().out


def test_cli_against_the_server_reports_failures_in_its_exit_code(server, tmp_path, capsys):
    data = tmp_path / "texts.txt"
    data.write_text("item-01 Obama\nitem-02 BAD400\nitem-03 Paris\n")
    cache = tmp_path / "cache.jsonl"
    argv = ["--input", str(data), "--cache", str(cache), "--server", server.url, "--server-model", "tiny-server-model"]
    assert main([*argv, "--no-progress", "--retries", "0"]) == 1
    out = capsys.readouterr().out
    assert "3 texts (3 unique): 2 done, 0 skipped (already in the cache), 1 failed" in out
    assert "HTTP 400" in out
    assert main([*argv, "--no-progress", "--no-retry-failed"]) == 0
    assert "3 skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--input", str(data), "--cache", str(cache), "--server", server.url])  # no --server-model


class CommandLineRun:
    """The command line running against the fake server, started in one of two ways.

    ``python -m entityclip_hf.explain`` in a fresh interpreter is the real thing, but importing the package costs
    seconds (torch). A forked child calling ``main(argv)`` (the console script's entry point) starts instantly; the
    interrupt tests use it. Either way the run is another process that gets a real signal.
    """

    def __init__(self, argv, folder, fresh_interpreter):
        self.out_path = folder / "output.txt"
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "HF_HUB_OFFLINE": "1"}
        if fresh_interpreter:
            with self.out_path.open("w") as out:
                command = [sys.executable, "-m", "entityclip_hf.explain", *argv]
                self.process = subprocess.Popen(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=env)
            self.pid = self.process.pid
            return
        self.process = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: run the entry point, then leave without running any of pytest's exit code
            code = 99
            try:
                # Python's own Ctrl-C handler, as in a terminal: a test session started as a background job of a
                # script (`bash -c 'pytest &'`) inherits SIGINT ignored, and so would this child.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                sys.stdout = sys.stderr = open(self.out_path, "w", buffering=1)
                os.environ.update(env)
                code = main(argv)
            finally:
                os._exit(code)
        self._status = None

    def poll(self):
        if self.process is not None:
            return self.process.poll()
        if self._status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._status = os.waitstatus_to_exitcode(status)
        return self._status

    def wait(self, timeout):
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"process {self.pid} did not stop: {self.output()}")
            time.sleep(0.02)
        return self.poll()

    def kill(self):
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait(10)

    def output(self):
        return self.out_path.read_text() if self.out_path.exists() else ""


STOP_SIGNALS = (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)


def test_runs_stopped_mid_way_lose_nothing_and_reruns_finish_without_duplicates(server, tmp_path):
    """SIGKILL (a crash), SIGINT (Ctrl-C) and SIGTERM (a scheduler) each stop a command-line run mid-way.

    The three runs go at once, each with its own texts and cache; the SIGKILL one is a fresh ``python -m``.
    """
    server.delay = 0.05
    runs = {}
    for number, stop_signal in enumerate(STOP_SIGNALS):
        folder = tmp_path / stop_signal.name
        folder.mkdir()
        texts = [f"item-{number}{i:02d} caption {i} of run {stop_signal.name}" for i in range(60)]
        data = folder / "texts.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        cache = folder / "cache.jsonl"
        argv = ["--input", str(data), "--cache", str(cache), "--server", server.url, "--server-model", "tiny-model"]
        process = CommandLineRun(
            [*argv, "--concurrency", "2", "--no-progress"], folder, fresh_interpreter=stop_signal == signal.SIGKILL
        )
        runs[stop_signal] = dict(process=process, texts=texts, cache=cache, argv=argv)
    try:
        waiting = set(STOP_SIGNALS)
        deadline = time.monotonic() + 90
        while waiting and time.monotonic() < deadline:
            for stop_signal in list(waiting):
                run = runs[stop_signal]
                assert run["process"].poll() is None, f"{stop_signal.name} run ended early: {run['process'].output()}"
                if run["cache"].exists() and run["cache"].read_bytes().count(b'"ok": true') >= 6:
                    os.kill(run["process"].pid, stop_signal)
                    waiting.remove(stop_signal)
            time.sleep(0.02)
        assert not waiting, f"runs wrote too little in time: {[s.name for s in waiting]}"
        for run in runs.values():
            run["returncode"] = run["process"].wait(timeout=30)
    finally:
        for run in runs.values():
            run["process"].kill()

    server.delay = 0.0
    for stop_signal, run in runs.items():
        cache, texts, output = run["cache"], run["texts"], run["process"].output()
        written_before = cache.read_bytes()
        done_before = {r["text"] for r in iter_cache_records(cache) if r["ok"]}
        assert 6 <= len(done_before) < len(texts), stop_signal.name
        if stop_signal == signal.SIGKILL:
            assert run["returncode"] == -signal.SIGKILL
        else:  # an orderly stop: whole lines only, and the summary says how far it got
            assert run["returncode"] == 130, (stop_signal.name, output)
            assert written_before.endswith(b"\n"), stop_signal.name
            assert "left for a rerun" in output and "rerun the same command" in output, output

        requests_before = len(server.requests)
        assert main([*run["argv"], "--no-progress"]) == 0
        assert cache.read_bytes().startswith(written_before), stop_signal.name  # the rerun only appended
        asked_again = [server.prompt_of(p, b) for p, _, b in server.requests[requests_before:]]
        assert not [t for t in done_before if any(t in prompt for prompt in asked_again)], stop_signal.name
        ok_records = [r for r in iter_cache_records(cache) if r["ok"]]
        assert sorted(r["text"] for r in ok_records) == sorted(texts), stop_signal.name  # none lost, none twice
        assert all(r["explanation"] == f"Explanation of {r['text'].split()[0]}." for r in ok_records)
