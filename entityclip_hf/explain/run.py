"""A generation run: what the cache still lacks, batching, concurrency, progress, and the summary."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from .backends.base import Explainer
from .cache import ExplanationCache, ExplanationResult
from .prompt import PROMPT_VERSION


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
