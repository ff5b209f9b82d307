"""LLM explanations of the entities in texts, with a cache that survives crashes and reruns.

EntityCLIP trains with one explanation per text: who or what its entities are, what they look like, where and when.
This module generates them with any local ``transformers`` causal LM (batched, chat template when the model has one)
or any OpenAI-compatible HTTP server (vLLM, TGI, llama.cpp server) with bounded concurrency, timeouts and retries.

Results go to a JSON-lines cache, one object per line::

    {"model": str, "prompt_version": str, "text": str, "explanation": str | null, "ok": bool, "error": str | null}

The file is append-only (flush + fsync per batch), so a killed run loses nothing it already wrote, and a rerun skips
every text that already has an ``ok`` entry for the same (model, prompt version). Failed or empty generations are
recorded with ``ok: false`` and retried on the next run. ``read_explanation_cache`` is what the data loaders use.

Command line: ``entityclip-explain --input captions.jsonl --cache explanations.jsonl --model PATH`` (or
``--server http://127.0.0.1:8000 --server-model NAME``); see ``entityclip-explain --help``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

try:  # POSIX only; elsewhere two runs on one cache file are not prevented
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

# The prompt lives here and only here. Any change to these strings must bump PROMPT_VERSION: the version is part of
# every cache key, so explanations written with an older prompt are never mistaken for new ones.
PROMPT_VERSION = "entity-v1"
SYSTEM_PROMPT = (
    "You are a knowledgeable news analyst. You explain the named entities (people, organisations, places, events, "
    "objects) mentioned in the text of a news image, so that someone can recognise them in the picture."
)
USER_PROMPT_TEMPLATE = (
    "Explain the entities in the following text: who or what each one is, what they typically look like "
    "(appearance, clothing, logos, buildings, landscape), where and when the scene takes place. Use only "
    "well-established facts and do not invent details. Answer in 2 to 4 concise sentences of plain text, without "
    "lists, headings or preamble.\n\nText: {text}"
)
# For models without a chat template (base models, /v1/completions): the same instructions as one document that
# the model continues after "Explanation:".
PLAIN_PROMPT_TEMPLATE = SYSTEM_PROMPT + "\n\n" + USER_PROMPT_TEMPLATE + "\n\nExplanation:"

CACHE_FIELDS = ("model", "prompt_version", "text", "explanation", "ok", "error")
EMPTY_GENERATION_ERROR = "empty generation"


def build_messages(text: str, use_system_role: bool = True) -> list[dict[str, str]]:
    """Chat messages asking for an explanation of the entities in ``text``.

    Some chat templates (older Mistral ones) reject a system role; with ``use_system_role=False`` the system prompt
    is put at the start of the user message instead.
    """
    user = USER_PROMPT_TEMPLATE.format(text=text)
    if use_system_role:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    return [{"role": "user", "content": SYSTEM_PROMPT + "\n\n" + user}]


def build_plain_prompt(text: str) -> str:
    """Plain-text prompt (no chat template) asking for an explanation of the entities in ``text``."""
    return PLAIN_PROMPT_TEMPLATE.format(text=text)


def clean_plain_continuation(generated: str) -> str:
    """Keep the first paragraph of a plain-prompt continuation.

    A base model continuing "Explanation:" tends to go on with a new "Text: ..." example after a blank line; the
    prompt asks for one paragraph, so everything after the first blank line is dropped.
    """
    return generated.strip().split("\n\n", 1)[0].strip()


@dataclass(frozen=True)
class ExplanationResult:
    """The outcome of one generation: an explanation, or the error that prevented it."""

    text: str
    explanation: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.explanation)

    @classmethod
    def from_generation(cls, text: str, generated: str | None) -> ExplanationResult:
        """Wrap a model's output; an empty (or whitespace-only) output is a failure, never an explanation."""
        explanation = (generated or "").strip()
        if not explanation:
            return cls(text=text, error=EMPTY_GENERATION_ERROR)
        return cls(text=text, explanation=explanation)

    @classmethod
    def failure(cls, text: str, error: str) -> ExplanationResult:
        return cls(text=text, error=error or "unknown error")


# ---------------------------------------------------------------------------------------------------------------
# The cache file
# ---------------------------------------------------------------------------------------------------------------


def _record_problem(record: Any) -> str | None:
    """Why a parsed cache line is not a valid record, or None when it is."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [name for name in CACHE_FIELDS if name not in record]
    if missing:
        return f"missing field(s) {missing}"
    for name in ("model", "prompt_version", "text"):
        if not isinstance(record[name], str):
            return f"field {name!r} must be a string"
    if not isinstance(record["ok"], bool):
        return "field 'ok' must be true or false"
    if record["ok"] and not (isinstance(record["explanation"], str) and record["explanation"].strip()):
        return "an ok record needs a non-empty 'explanation'"
    return None


def iter_cache_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield the valid records of a cache file in file order.

    A line that cannot be read (typically the last line of a run killed mid-write) or is not a valid record is
    skipped with a warning naming its line number; it never stops the read.
    """
    path = Path(path)
    # Binary read: split on b"\n" only, so no Unicode line separator inside a text can cut a record in two.
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                torn = "" if raw.endswith(b"\n") else " (torn write from an interrupted run?)"
                logger.warning("%s line %d: not valid JSON%s; skipped", path, line_number, torn)
                continue
            problem = _record_problem(record)
            if problem is not None:
                logger.warning("%s line %d: %s; skipped", path, line_number, problem)
                continue
            yield record


def read_explanation_cache(
    path: str | os.PathLike, model: str | None = None, prompt_version: str | None = None
) -> dict[str, str]:
    """Map each text to its explanation from a cache file (ok entries only; later lines win).

    ``model`` and ``prompt_version`` restrict the entries to one generator / one prompt. With ``prompt_version=None``
    every version counts, but an entry of the current prompt (`PROMPT_VERSION`) wins over older ones whatever the
    line order, and the texts explained only by an older prompt are counted in a warning: a changed prompt is never
    silently mixed in. With ``model=None`` every model counts; the later line wins.
    """
    chosen: dict[str, tuple[bool, str]] = {}  # text -> (written with the current prompt, explanation)
    for record in iter_cache_records(path):
        if model is not None and record["model"] != model:
            continue
        if prompt_version is not None and record["prompt_version"] != prompt_version:
            continue
        if record["ok"]:
            current = record["prompt_version"] == PROMPT_VERSION
            if current or not chosen.get(record["text"], (False, ""))[0]:
                chosen[record["text"]] = (current, record["explanation"])
    older = [text for text, (current, _) in chosen.items() if not current]
    if older and prompt_version is None:
        logger.warning(
            "%s: %d of %d explanations come from a prompt version other than the current %r (e.g. for %r); pass "
            "prompt_version= to choose one, or rerun entityclip-explain to regenerate them",
            path, len(older), len(chosen), PROMPT_VERSION, older[0][:80],
        )  # fmt: skip
    return {text: explanation for text, (_, explanation) in chosen.items()}


class CacheLockedError(RuntimeError):
    """Another process holds the explanation cache file open for writing."""


class ExplanationCache:
    """The append-only JSON-lines cache of one (model, prompt version): what is done, and a crash-safe writer.

    Use as a context manager to append: it takes an exclusive lock on the file (a second run writing the same file
    would interleave lines), starts on a fresh line if the previous run was killed mid-line, and ``append`` flushes
    and fsyncs each batch. Write from one thread only.
    """

    def __init__(self, path: str | os.PathLike, model: str, prompt_version: str = PROMPT_VERSION):
        self.path = Path(path)
        self.model = model
        self.prompt_version = prompt_version
        self._handle = None

    def status(self) -> tuple[set[str], set[str]]:
        """Texts with an ok entry, and texts whose entries are all failures, for this model and prompt version."""
        done: set[str] = set()
        failed: set[str] = set()
        if not self.path.exists():
            return done, failed
        for record in iter_cache_records(self.path):
            if record["model"] != self.model or record["prompt_version"] != self.prompt_version:
                continue
            (done if record["ok"] else failed).add(record["text"])
        return done, failed - done

    def open(self) -> ExplanationCache:
        if self._handle is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("ab")
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise CacheLockedError(
                    f"another process is writing to the explanation cache {self.path}; "
                    "run one generator per cache file (or give each its own file)"
                ) from None
            except OSError as error:  # some network file systems have no locks: carry on without one
                logger.warning("could not lock %s (%s); do not run two generators on it at once", self.path, error)
        # A run killed mid-write leaves a last line without its newline: start on a fresh line so the torn line
        # stays alone (and is skipped on read) instead of swallowing our first record.
        if handle.tell() > 0:
            with self.path.open("rb") as reader:
                reader.seek(-1, os.SEEK_END)
                if reader.read(1) != b"\n":
                    handle.write(b"\n")
        self._handle = handle
        return self

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file releases the lock
            self._handle = None

    def __enter__(self) -> ExplanationCache:
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def append(self, results: Sequence[ExplanationResult]) -> None:
        """Append one line per result, then flush and fsync so that the batch survives a crash."""
        if self._handle is None:
            raise RuntimeError("ExplanationCache.append needs an open cache: use `with ExplanationCache(...) as cache`")
        if not results:
            return
        lines = []
        for result in results:
            record = {
                "model": self.model,
                "prompt_version": self.prompt_version,
                "text": result.text,
                "explanation": result.explanation if result.ok else None,
                "ok": result.ok,
                "error": None if result.ok else (result.error or EMPTY_GENERATION_ERROR),
            }
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        # One write per batch: an interrupt lands between whole lines in the buffer, never inside one.
        self._handle.write("".join(lines).encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())


# ---------------------------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------------------------


class Explainer(Protocol):
    """What ``explain_texts`` needs from a generator."""

    model_id: str  # the "model" of the cache key
    batch_size: int  # texts per ``explain_batch`` call
    concurrency: int  # ``explain_batch`` calls in flight at once (threads)

    def explain_batch(self, texts: Sequence[str]) -> list[ExplanationResult]:
        """One result per text, in order; errors are returned as failures, never raised."""
        ...


def _resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class TransformersExplainer:
    """Explanations from a local ``transformers`` causal LM (a path or a hub name), batched with left padding.

    The prompt goes through the tokenizer's chat template when it has one, else the plain prompt is used. Greedy
    decoding by default (``temperature > 0`` samples). ``model_id`` (default: ``model_name_or_path``) is the name
    recorded in the cache.
    """

    concurrency = 1

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        *,
        model_id: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 160,
        temperature: float = 0.0,
        device: str = "auto",
        dtype: str = "auto",
        device_map: str | None = None,
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
        name = str(model_name_or_path)
        self.model_id = model_id or name.rstrip("/")
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

        self.tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        # Decoder-only batched generation pads on the left so that every prompt ends where its new tokens start.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer of {name} has neither a pad nor an eos token; batching needs one")
            self.tokenizer.pad_token = self.tokenizer.eos_token

        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
        if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
            raise ValueError(f"dtype must be 'auto' or a torch dtype name like 'bfloat16', got {dtype!r}")
        self.model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch_dtype, device_map=device_map, trust_remote_code=trust_remote_code
        )
        if device_map is None:
            self.model.to(_resolve_device(device))
        self.model.eval()

        self.uses_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.use_system_role = self.uses_chat_template and self._template_accepts_system_role()
        self.generation_config = self._generation_config()

    def _template_accepts_system_role(self) -> bool:
        try:
            self.tokenizer.apply_chat_template(build_messages("x"), tokenize=False, add_generation_prompt=True)
        except Exception:  # jinja's TemplateError from the template's raise_exception, or anything it raises
            return False
        return True

    def _generation_config(self):
        # A copy of the model's own settings (eos ids, suppressed tokens...) with our decoding choices on top; the
        # model's sampling defaults are cleared for greedy decoding so they neither apply nor warn.
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = self.max_new_tokens
        config.max_length = None
        if self.temperature > 0:
            config.do_sample = True
            config.temperature = self.temperature
        else:
            config.do_sample = False
            config.temperature = config.top_p = config.top_k = None
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        return config

    def prompt(self, text: str) -> str:
        """The exact string the model is given for ``text``."""
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(
                build_messages(text, use_system_role=self.use_system_role), tokenize=False, add_generation_prompt=True
            )
        return build_plain_prompt(text)

    def explain_batch(self, texts: Sequence[str]) -> list[ExplanationResult]:
        """Generate for ``texts`` in one ``generate`` call; a failing batch is retried text by text."""
        import torch

        try:
            # A chat template writes its own special tokens (BOS...); adding them again would double them.
            inputs = self.tokenizer(
                [self.prompt(text) for text in texts],
                padding=True,
                add_special_tokens=not self.uses_chat_template,
                return_tensors="pt",
            ).to(self.model.device)
            with torch.inference_mode():
                output = self.model.generate(**inputs, generation_config=self.generation_config)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            generated = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        except Exception as error:  # out of memory, a prompt longer than the context...: isolate the culprit
            if len(texts) > 1:
                logger.warning(
                    "batch of %d failed (%s: %s); retrying one by one", len(texts), type(error).__name__, error
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                return [result for text in texts for result in self.explain_batch([text])]
            return [ExplanationResult.failure(texts[0], f"{type(error).__name__}: {error}")]
        if not self.uses_chat_template:
            generated = [clean_plain_continuation(g) for g in generated]
        return [ExplanationResult.from_generation(text, g) for text, g in zip(texts, generated, strict=True)]


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


# ---------------------------------------------------------------------------------------------------------------
# The run: cache bookkeeping, batching, concurrency, progress
# ---------------------------------------------------------------------------------------------------------------


class ExplainInterrupted(KeyboardInterrupt):
    """A run of ``explain_texts`` stopped by Ctrl-C (or SIGTERM from the CLI); ``summary`` counts what was done."""

    def __init__(self, summary: ExplainSummary):
        super().__init__(str(summary))
        self.summary = summary


@dataclass
class ExplainSummary:
    """Counts of one run of ``explain_texts``."""

    texts: int = 0  # texts given (after the limit)
    unique: int = 0  # distinct texts among them
    generated: int = 0  # new ok explanations written
    skipped: int = 0  # already in the cache (ok, or failed with retry_failed=False)
    failed: int = 0  # failures written in this run
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)  # a few error messages, for the report

    def __str__(self) -> str:
        line = (
            f"{self.texts} texts ({self.unique} unique): {self.generated} done, {self.skipped} skipped "
            f"(already in the cache), {self.failed} failed"
        )
        if self.interrupted:
            line += f"; interrupted, {self.unique - self.generated - self.skipped - self.failed} left for a rerun"
        return line


def _run_batches(explainer: Explainer, batches: list[list[str]], on_results) -> None:
    """Run ``explainer.explain_batch`` over ``batches`` and hand each result list to ``on_results``.

    ``on_results`` is always called from the calling thread, so the cache is written by one thread and lines never
    interleave. With concurrency > 1 the work runs in daemon threads: an interrupt stops waiting at once (a request
    in flight does not hold the process) after writing every result already finished.
    """
    concurrency = max(1, int(getattr(explainer, "concurrency", 1)))
    if concurrency == 1 or len(batches) <= 1:
        for batch in batches:
            on_results(explainer.explain_batch(batch))
        return

    tasks: queue.SimpleQueue[list[str]] = queue.SimpleQueue()
    for batch in batches:
        tasks.put(batch)
    finished: queue.SimpleQueue[list[ExplanationResult]] = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                batch = tasks.get_nowait()
            except queue.Empty:
                return
            try:
                results = explainer.explain_batch(batch)
            except Exception as error:  # a bug in a generator must not leave the main thread waiting forever
                results = [ExplanationResult.failure(text, f"{type(error).__name__}: {error}") for text in batch]
            finished.put(results)

    for _ in range(min(concurrency, len(batches))):
        threading.Thread(target=work, name="entityclip-explain", daemon=True).start()

    def take_finished(block: bool) -> list[ExplanationResult]:
        taken: list[ExplanationResult] = []
        try:
            # A short timeout keeps the main thread responsive to Ctrl-C.
            taken.extend(finished.get(timeout=0.2) if block else finished.get_nowait())
            while True:  # everything else already finished goes into the same write
                taken.extend(finished.get_nowait())
        except queue.Empty:
            pass
        return taken

    remaining = sum(len(batch) for batch in batches)
    try:
        while remaining:
            results = take_finished(block=True)
            if results:
                remaining -= len(results)
                on_results(results)
    except BaseException:
        stop.set()
        results = take_finished(block=False)
        if results:
            on_results(results)
        raise


def explain_texts(
    texts: Iterable[str],
    explainer: Explainer,
    cache_path: str | os.PathLike,
    *,
    prompt_version: str = PROMPT_VERSION,
    retry_failed: bool = True,
    limit: int | None = None,
    progress: bool = True,
) -> ExplainSummary:
    """Generate an explanation for every text not yet in the cache, appending results as they come.

    Identical texts are generated once. Texts with an ok entry for (``explainer.model_id``, ``prompt_version``) are
    skipped; texts whose entries are all failures are retried unless ``retry_failed=False``. ``limit`` keeps the
    first ``limit`` distinct texts. Longer texts go first and batches group similar lengths (less padding, and an
    out-of-memory shows up at once). On KeyboardInterrupt everything finished is written, then
    ``ExplainInterrupted`` (a KeyboardInterrupt carrying the summary) is raised.
    """
    from tqdm.auto import tqdm

    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {index} must be a string, got {type(text).__name__}")
    unique = list(dict.fromkeys(texts))
    if limit is not None:
        unique = unique[:limit]
        kept = set(unique)
        texts = [text for text in texts if text in kept]
    summary = ExplainSummary(texts=len(texts), unique=len(unique))

    cache = ExplanationCache(cache_path, explainer.model_id, prompt_version)
    with cache:
        done, failed_before = cache.status()
        skip = done if retry_failed else done | failed_before
        pending = [text for text in unique if text not in skip]
        summary.skipped = len(unique) - len(pending)
        pending.sort(key=len, reverse=True)
        batch_size = max(1, int(explainer.batch_size))
        batches = [pending[start : start + batch_size] for start in range(0, len(pending), batch_size)]

        bar = tqdm(total=len(pending), unit="text", desc="explain", disable=not progress or not pending)

        def on_results(results: list[ExplanationResult]) -> None:
            cache.append(results)
            for result in results:
                if result.ok:
                    summary.generated += 1
                else:
                    summary.failed += 1
                    if len(summary.errors) < 5:
                        summary.errors.append(f"{result.text[:60]!r}: {result.error}")
            bar.update(len(results))
            if summary.failed:
                bar.set_postfix(failed=summary.failed, refresh=False)

        try:
            _run_batches(explainer, batches, on_results)
        except KeyboardInterrupt as interrupt:
            summary.interrupted = True
            raise ExplainInterrupted(summary) from interrupt
        finally:
            bar.close()
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Input files and the command line
# ---------------------------------------------------------------------------------------------------------------


def _texts_from_records(records: Iterable[tuple[str, Any]], source: str, text_field: str) -> Iterator[str]:
    for where, record in records:
        if isinstance(record, str):
            value = record
        elif isinstance(record, dict):
            if text_field not in record:
                raise ValueError(
                    f"{source}: {where} has no field {text_field!r} (fields: {sorted(record)}); "
                    "choose the field with --text-field"
                )
            value = record[text_field]
        else:
            raise ValueError(f"{source}: {where} must be an object or a string, got {type(record).__name__}")
        if not isinstance(value, str):
            raise ValueError(f"{source}: {where} field {text_field!r} must be a string, got {type(value).__name__}")
        yield value


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {line_number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {line_number} is not valid JSON ({error.msg})") from None


def read_texts(paths: str | os.PathLike | Sequence[str | os.PathLike], text_field: str = "text") -> list[str]:
    """Read the texts to explain from JSON-lines, JSON or plain-text files, in order.

    ``.jsonl``/``.ndjson``: one record per line. ``.json``: a list of records (or of strings), or an object mapping
    ids to records (a ``.json`` file that is really JSON lines is read as such). Any other file: one text per line.
    Records give their text in ``text_field``; a missing or non-string field is an error naming the record. Empty
    texts are skipped with a warning (there is nothing to explain).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    texts: list[str] = []
    for path in map(Path, paths):
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            found = list(_texts_from_records(_json_lines(path), str(path), text_field))
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                if error.msg != "Extra data":
                    raise ValueError(f"{path}: not valid JSON ({error})") from None
                data = None  # several JSON values in a row: JSON lines under a .json name
            if data is None:
                records: Iterable[tuple[str, Any]] = _json_lines(path)
            elif isinstance(data, list):
                records = ((f"record {index}", record) for index, record in enumerate(data))
            elif isinstance(data, dict):
                records = ((f"record {key!r}", record) for key, record in data.items())
            else:
                raise ValueError(
                    f"{path}: expected a list of records or an object of records, got {type(data).__name__}"
                )
            found = list(_texts_from_records(records, str(path), text_field))
        else:
            with path.open(encoding="utf-8") as handle:
                found = [line.rstrip("\r\n") for line in handle]
        empty = sum(1 for text in found if not text.strip())
        if empty:
            logger.warning("%s: %d empty text(s) skipped", path, empty)
        texts.extend(text for text in found if text.strip())
    return texts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entityclip-explain",
        description="Generate LLM explanations of the entities in texts into a resumable JSON-lines cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True, help="JSON-lines, JSON or plain-text file(s) of texts")
    parser.add_argument("--text-field", default="text", help="field holding the text in JSON records")
    parser.add_argument("--cache", required=True, help="JSON-lines cache file (created or appended to)")
    backend = parser.add_mutually_exclusive_group(required=True)
    backend.add_argument("--model", help="local transformers causal LM: a folder or a hub name")
    backend.add_argument("--server", help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--server-model", help="model name the server serves (required with --server)")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat", help="server API to call")
    # No default shown here: --help must never print a key taken from the environment.
    parser.add_argument("--api-key", help="server API key; default: the OPENAI_API_KEY environment variable")
    parser.add_argument("--model-name", help="name recorded in the cache (default: --model or --server-model)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="longest explanation, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per generate call (local model)")
    parser.add_argument("--device", default="auto", help="local model device: auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--device-map", help="spread a large local model over devices, e.g. 'auto' (accelerate)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the local model's own code")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (server)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each server answer")
    parser.add_argument("--retries", type=int, default=3, help="retries on connection errors, timeouts, 429, 5xx")
    parser.add_argument("--limit", type=int, help="only the first N distinct texts")
    parser.add_argument("--no-retry-failed", action="store_true", help="skip texts whose earlier attempts failed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns 0 when every text has an explanation, 1 when some failed, 130 if stopped."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.server and not args.server_model:
        parser.error("--server needs --server-model (the model name the server serves)")
    if args.limit is not None and args.limit < 0:
        parser.error("--limit must be >= 0")
    # A Hub id is 'name' or 'user/name': anything else that does not exist is a missing folder.
    if args.model and not os.path.exists(os.path.expanduser(args.model)):
        if os.path.isabs(args.model) or args.model.startswith((".", "~")) or args.model.count("/") > 1:
            parser.error(f"--model {args.model}: no such folder")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)

    try:
        texts = read_texts(args.input, args.text_field)
    except UnicodeDecodeError as error:  # which file, at which byte: the decoder only knows its buffer's position
        from .data.formats import first_utf8_error

        located = (first_utf8_error(path) for path in args.input if os.path.isfile(path))
        parser.error(next((message for message in located if message), str(error)))
    except (OSError, ValueError) as error:
        parser.error(str(error))

    try:
        if args.server:
            explainer: Explainer = OpenAICompatibleExplainer(
                args.server,
                args.server_model,
                api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
                endpoint=args.endpoint,
                model_id=args.model_name,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                timeout=args.timeout,
                retries=args.retries,
                concurrency=args.concurrency,
            )
            where = f"{explainer.url} (model {args.server_model}, concurrency {args.concurrency})"
        else:
            explainer = TransformersExplainer(
                args.model,
                model_id=args.model_name,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                device=args.device,
                dtype=args.dtype,
                device_map=args.device_map,
                trust_remote_code=args.trust_remote_code,
            )
            template = "chat template" if explainer.uses_chat_template else "plain prompt"
            where = f"{args.model} on {explainer.model.device} ({template}, batch size {args.batch_size})"
    except (OSError, ValueError) as error:  # a model folder or Hub id that cannot be loaded, a bad option value
        first_line = str(error).splitlines()[0] if str(error) else repr(error)
        parser.error(f"--model {args.model}: cannot load it: {first_line}" if args.model else first_line)
    print(
        f"entityclip-explain: {len(texts)} texts from {len(args.input)} file(s) -> {args.cache}\n"
        f"  generator: {where}\n  cache key: model={explainer.model_id!r} prompt_version={PROMPT_VERSION!r}",
        flush=True,
    )

    # A scheduler's SIGTERM (preemption, timeout) goes the same orderly way as Ctrl-C.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if in_main_thread else None
    try:
        summary = explain_texts(
            texts,
            explainer,
            args.cache,
            retry_failed=not args.no_retry_failed,
            limit=args.limit,
            progress=not args.no_progress,
        )
    except ExplainInterrupted as interrupt:
        print(f"entityclip-explain: {interrupt.summary}", flush=True)
        print("entityclip-explain: everything finished is in the cache; rerun the same command to continue", flush=True)
        return 130
    except KeyboardInterrupt:  # before generation started: nothing to lose
        return 130
    except CacheLockedError as error:
        print(f"entityclip-explain: error: {error}", file=sys.stderr, flush=True)
        return 1
    except OSError as error:  # the cache cannot be opened or written (a folder, no permission, a full disk)
        print(f"entityclip-explain: error: cache {args.cache}: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm if previous_sigterm is not None else signal.SIG_DFL)
    print(f"entityclip-explain: {summary}", flush=True)
    for error in summary.errors:
        print(f"  failed: {error}", flush=True)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
