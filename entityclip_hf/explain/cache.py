"""The explanation cache: results, the append-only JSON-lines file, and its readers.

One JSON object per line::

    {"model": str, "prompt_version": str, "text": str, "explanation": str | null, "ok": bool, "error": str | null}

Appends are flushed and fsynced per batch, so a killed run loses nothing it already wrote; a torn last line is
skipped on read.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .prompt import PROMPT_VERSION
from .results import EMPTY_GENERATION_ERROR, ExplanationResult

try:  # POSIX only; elsewhere two runs on one cache file are not prevented
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

CACHE_FIELDS = ("model", "prompt_version", "text", "explanation", "ok", "error")


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


def cache_files(path: str | os.PathLike) -> list[Path]:
    """The cache file ``path``, or the ``*.jsonl`` / ``*.ndjson`` files of the folder ``path`` (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(file for file in path.iterdir() if file.suffix.lower() in (".jsonl", ".ndjson"))
        if not files:
            raise FileNotFoundError(f"no cache files (*.jsonl) in the folder {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"explanation cache not found: {path}")
    return [path]


def writer_is_running(path: str | os.PathLike) -> bool:
    """Whether a generator (an open ``ExplanationCache``) holds the cache file ``path`` for writing right now."""
    path = Path(path)
    if fcntl is None or not path.is_file():
        return False
    with path.open("rb") as handle:
        try:  # a shared lock is refused while a writer holds its exclusive one; closing the file releases ours
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without locks: nothing to tell
            return False
    return False


def read_explanation_cache(
    path: str | os.PathLike, model: str | None = None, prompt_version: str | None = None
) -> dict[str, str]:
    """Map each text to its explanation from a cache file, or a folder of them (ok entries only; later lines win).

    A folder (e.g. one cache per ``--shard`` worker) is read as its ``*.jsonl`` files in name order, as if they
    were one file. ``model`` and ``prompt_version`` restrict the entries to one generator / one prompt. With
    ``prompt_version=None`` every version counts, but an entry of the current prompt (`PROMPT_VERSION`) wins over
    older ones whatever the line order, and the texts explained only by an older prompt are counted in a warning: a
    changed prompt is never silently mixed in. With ``model=None`` every model counts; the later line wins.
    """
    chosen: dict[str, tuple[bool, str]] = {}  # text -> (written with the current prompt, explanation)
    records = (record for file in cache_files(path) for record in iter_cache_records(file))
    for record in records:
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

    def append(self, results: Sequence[ExplanationResult]) -> list[ExplanationResult]:
        """Append one line per result, then flush and fsync so that the batch survives a crash.

        A result that cannot be stored as UTF-8 (a lone surrogate in its text or answer) becomes a failed record
        naming the problem; the other results of the batch are written as usual. Returns the results as stored.
        """
        if self._handle is None:
            raise RuntimeError("ExplanationCache.append needs an open cache: use `with ExplanationCache(...) as cache`")
        if not results:
            return []
        encoded = [self._encode_record(result) for result in results]
        # One write per batch: an interrupt lands between whole lines in the buffer, never inside one.
        self._handle.write(b"".join(line for line, _ in encoded))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        return [stored for _, stored in encoded]

    def _record(self, text: str, explanation: str | None, ok: bool, error: str | None) -> bytes:
        record = {
            "model": self.model,
            "prompt_version": self.prompt_version,
            "text": text,
            "explanation": explanation,
            "ok": ok,
            "error": error,
        }
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")

    def _encode_record(self, result: ExplanationResult) -> tuple[bytes, ExplanationResult]:
        try:
            line = self._record(
                result.text,
                result.explanation if result.ok else None,
                result.ok,
                None if result.ok else (result.error or EMPTY_GENERATION_ERROR),
            )
            return line, result
        except UnicodeEncodeError:
            pass
        # Something in the record is not valid Unicode; find what, and store a failure that says so.
        text_problem = unstorable_text_problem(result.text)
        if text_problem is not None:
            # The text itself cannot be a key: record its escaped form, so the line names it and reads back.
            stored = ExplanationResult.failure(escape_unstorable(result.text), text_problem)
            return self._record(stored.text, None, False, stored.error), stored
        answer = result.explanation if result.ok else result.error
        problem = unstorable_text_problem(answer or "") or "not valid Unicode"
        what = "answer" if result.ok else "error message"
        error = f"the {what} cannot be stored: {problem}; it began {escape_unstorable((answer or '')[:200])!r}"
        return self._record(result.text, None, False, error), ExplanationResult.failure(result.text, error)


def escape_unstorable(text: str) -> str:
    """``text`` with every character UTF-8 cannot hold (lone surrogates) written as a ``\\udXXX`` escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unstorable_text_problem(text: str) -> str | None:
    """Why ``text`` cannot be written to the cache (UTF-8), naming the character and where; None when it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        return (
            f"text holds a lone UTF-16 surrogate U+{ord(bad):04X} at character {error.start} (a string cut inside "
            f"an emoji?), which UTF-8 cannot store: {escape_unstorable(text[:200])!r}"
        )
    return None


def write_json_lines_atomically(path: Path, lines: Iterable[dict[str, Any]]) -> None:
    """Write `lines` as JSON lines to `path` in one rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            for line in lines:
                handle.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
