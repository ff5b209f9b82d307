"""A generation run: what the cache still lacks, batching, concurrency, progress, and the summary."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from .backends.base import Explainer
from .cache import ExplanationCache, escape_unstorable, unstorable_text_problem
from .prompt import PROMPT_VERSION
from .results import DEFAULT_MAX_ANSWER_CHARS, ExplanationResult, cap_answer
from .shards import check_shard, shard_of


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


class CircuitBreakerOpen(RuntimeError):
    """A run stopped after too many consecutive failures (a dead server, a wrong model name...).

    Everything finished is in the cache; ``summary`` counts it and ``last_error`` is the last failure's message.
    """

    def __init__(self, summary: ExplainSummary, consecutive: int, last_error: str):
        super().__init__(
            f"stopped after {consecutive} consecutive failures (the last: {last_error}); the cache is intact: fix the "
            "cause and rerun the same command (--max-consecutive-failures 0 never stops)"
        )
        self.summary = summary
        self.consecutive = consecutive
        self.last_error = last_error


DEFAULT_MAX_CONSECUTIVE_FAILURES = 32


def _run_batches(explainer: Explainer, batches: list[list[str]], on_results, should_stop=lambda: False) -> None:
    """Run ``explainer.explain_batch`` over ``batches`` and hand each result list to ``on_results``.

    ``on_results`` is always called from the calling thread, so the cache is written by one thread and lines never
    interleave. With concurrency > 1 the work runs in daemon threads: an interrupt stops waiting at once (a request
    in flight does not hold the process) after writing every result already finished. After each write
    ``should_stop()`` may end the run the same way (the circuit breaker).
    """
    concurrency = max(1, int(getattr(explainer, "concurrency", 1)))
    if concurrency == 1 or len(batches) <= 1:
        for batch in batches:
            on_results(explainer.explain_batch(batch))
            if should_stop():
                return
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
                if should_stop():
                    stop.set()
                    return
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
    shard: tuple[int, int] | None = None,
    max_answer_chars: int | None = DEFAULT_MAX_ANSWER_CHARS,
    truncate_long_answers: bool = False,
    max_consecutive_failures: int | None = DEFAULT_MAX_CONSECUTIVE_FAILURES,
) -> ExplainSummary:
    """Generate an explanation for every text not yet in the cache, appending results as they come.

    Identical texts are generated once. Texts with an ok entry for (``explainer.model_id``, ``prompt_version``) are
    skipped; texts whose entries are all failures are retried unless ``retry_failed=False``. ``limit`` keeps the
    first ``limit`` distinct texts. ``shard=(i, n)`` keeps only the texts of shard ``i`` of ``n`` (by a stable hash
    of the text: see ``shards.shard_of``), after the limit. Longer texts go first and batches group similar lengths
    (less padding, and an out-of-memory shows up at once).

    A text UTF-8 cannot store (a lone surrogate) is recorded as a failure naming it, without asking the model. An
    answer longer than ``max_chars`` characters is a failure (cut instead with ``truncate_long_answers``). After
    ``max_consecutive_failures`` failures in a row (None or 0: never) the run stops, everything finished written,
    with ``CircuitBreakerOpen``. On KeyboardInterrupt everything finished is written, then ``ExplainInterrupted`` (a
    KeyboardInterrupt carrying the summary) is raised.
    """
    from tqdm.auto import tqdm

    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {index} must be a string, got {type(text).__name__}")
    unique = list(dict.fromkeys(texts))
    if limit is not None:
        unique = unique[:limit]
    if shard is not None:
        index, count = check_shard(shard)
        unique = [text for text in unique if shard_of(text, count) == index]
    if limit is not None or shard is not None:
        kept = set(unique)
        texts = [text for text in texts if text in kept]
    summary = ExplainSummary(texts=len(texts), unique=len(unique))
    breaker = {"consecutive": 0, "last_error": ""}

    cache = ExplanationCache(cache_path, explainer.model_id, prompt_version)
    with cache:
        done, failed_before = cache.status()
        skip = done if retry_failed else done | failed_before
        pending = [text for text in unique if text not in skip]
        summary.skipped = len(unique) - len(pending)
        # The cache records unstorable texts under their escaped form: never sent, failed at once, every run.
        unstorable = [
            ExplanationResult.failure(escape_unstorable(text), problem)
            for text in pending
            if (problem := unstorable_text_problem(text)) is not None
        ]
        if unstorable:
            pending = [text for text in pending if unstorable_text_problem(text) is None]
        pending.sort(key=len, reverse=True)
        batch_size = max(1, int(explainer.batch_size))
        batches = [pending[start : start + batch_size] for start in range(0, len(pending), batch_size)]

        bar = tqdm(total=len(pending), unit="text", desc="explain", disable=not progress or not pending)

        def record(results: list[ExplanationResult], generated: bool = True) -> None:
            results = cache.append([cap_answer(result, max_answer_chars, truncate_long_answers) for result in results])
            for result in results:
                if result.ok:
                    summary.generated += 1
                    breaker["consecutive"] = 0
                else:
                    summary.failed += 1
                    if generated:
                        breaker["consecutive"] += 1
                        breaker["last_error"] = result.error
                    if len(summary.errors) < 5:
                        summary.errors.append(f"{result.text[:60]!r}: {result.error}")
            if generated:
                bar.update(len(results))
            if summary.failed:
                bar.set_postfix(failed=summary.failed, refresh=False)

        def breaker_open() -> bool:
            return bool(max_consecutive_failures) and breaker["consecutive"] >= max_consecutive_failures

        try:
            if unstorable:
                record(unstorable, generated=False)
            _run_batches(explainer, batches, record, breaker_open)
        except KeyboardInterrupt as interrupt:
            summary.interrupted = True
            raise ExplainInterrupted(summary) from interrupt
        finally:
            bar.close()
    if breaker_open():
        summary.interrupted = True
        raise CircuitBreakerOpen(summary, breaker["consecutive"], breaker["last_error"])
    return summary
