"""The OpenAI Batch JSONL format: export the texts a cache still lacks as requests, import the answers into it.

A request line (what ``vllm run-batch`` and the hosted batch APIs read)::

    {"custom_id": "ec-<sha256 of the text>", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": ..., "messages": [...], "max_tokens": ..., "temperature": ...}}

An output line (what they write; ``error`` set, or ``response.status_code`` >= 400, for a failed request)::

    {"id": ..., "custom_id": ..., "response": {"status_code": 200, "request_id": ..., "body": {chat completion}},
     "error": null}

``custom_id`` is ``ec-`` + the SHA-256 of the text. Beside each request file a sidecar ``<file>.ids.jsonl`` maps
every custom_id back to its text and records the cache key (model name, prompt version) and the endpoint, so an
import needs nothing but the request files and the output files. Importing is idempotent: a result already in the
cache (the same ok text, or the same failure) is not written again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import ExplanationCache, iter_cache_records, unstorable_text_problem, write_json_lines_atomically
from .prompt import PROMPT_VERSION, build_messages, build_plain_prompt
from .results import DEFAULT_MAX_ANSWER_CHARS, ExplanationResult, cap_answer, result_from_completion
from .shards import check_shard, shard_of, text_hash

logger = logging.getLogger(__name__)

CUSTOM_ID_PREFIX = "ec-"
SIDECAR_SUFFIX = ".ids.jsonl"
# The hosted APIs take at most 50,000 requests per batch file.
DEFAULT_REQUESTS_PER_FILE = 50_000
ENDPOINT_URLS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def custom_id_of(text: str) -> str:
    """The Batch ``custom_id`` of a text: stable across runs and machines, unique per distinct text."""
    return CUSTOM_ID_PREFIX + text_hash(text)


def sidecar_path(request_file: str | os.PathLike) -> Path:
    request_file = Path(request_file)
    return request_file.with_name(request_file.name + SIDECAR_SUFFIX)


def batch_request(text: str, model: str, endpoint: str, max_new_tokens: int, temperature: float) -> dict[str, Any]:
    """One Batch request line for ``text``: the same body the server backend posts."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_new_tokens, "temperature": temperature}
    if endpoint == "chat":
        body["messages"] = build_messages(text)
    else:
        body["prompt"] = build_plain_prompt(text)
    return {"custom_id": custom_id_of(text), "method": "POST", "url": ENDPOINT_URLS[endpoint], "body": body}


@dataclass
class BatchExport:
    """What ``export_batch`` wrote."""

    files: list[Path] = field(default_factory=list)
    requests: int = 0
    skipped: int = 0  # already in the cache
    unstorable: int = 0  # texts UTF-8 cannot hold (lone surrogates): not exported


def export_batch(
    texts: Iterable[str],
    cache_path: str | os.PathLike,
    output: str | os.PathLike,
    server_model: str,
    *,
    model_id: str | None = None,
    endpoint: str = "chat",
    max_new_tokens: int = 160,
    temperature: float = 0.0,
    prompt_version: str = PROMPT_VERSION,
    retry_failed: bool = True,
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
    requests_per_file: int = DEFAULT_REQUESTS_PER_FILE,
) -> BatchExport:
    """Write the texts the cache lacks (for ``model_id`` or ``server_model``) as Batch request files.

    One file ``output`` when the requests fit in ``requests_per_file``, else ``<stem>-00000<suffix>``, ... Each file
    gets its sidecar (``<file>.ids.jsonl``). Texts are chosen as ``explain_texts`` chooses them (distinct, limit,
    shard, skipping ok ones and, without ``retry_failed``, failed ones).
    """
    if endpoint not in ENDPOINT_URLS:
        raise ValueError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}")
    if requests_per_file < 1:
        raise ValueError(f"requests_per_file must be >= 1, got {requests_per_file}")
    model_id = model_id or server_model
    unique = list(dict.fromkeys(texts))
    if limit is not None:
        unique = unique[:limit]
    if shard is not None:
        index, count = check_shard(shard)
        unique = [text for text in unique if shard_of(text, count) == index]
    cache = ExplanationCache(cache_path, model_id, prompt_version)
    done, failed = cache.status()
    skip = done if retry_failed else done | failed
    pending = [text for text in unique if text not in skip]
    summary = BatchExport(skipped=len(unique) - len(pending))
    storable = []
    for text in pending:
        problem = unstorable_text_problem(text)
        if problem is None:
            storable.append(text)
        else:
            summary.unstorable += 1
            logger.warning("not exported: %s", problem)

    output = Path(output)
    chunks = [storable[start : start + requests_per_file] for start in range(0, len(storable), requests_per_file)]
    for number, chunk in enumerate(chunks):
        path = output if len(chunks) == 1 else output.with_name(f"{output.stem}-{number:05d}{output.suffix}")
        # The sidecar first: a request file never exists without the map that reads its answers back.
        header = {"model": model_id, "prompt_version": prompt_version, "endpoint": endpoint, "requests": path.name}
        write_json_lines_atomically(
            sidecar_path(path), [header, *({"custom_id": custom_id_of(text), "text": text} for text in chunk)]
        )
        write_json_lines_atomically(
            path, (batch_request(text, server_model, endpoint, max_new_tokens, temperature) for text in chunk)
        )
        summary.files.append(path)
        summary.requests += len(chunk)
    return summary


@dataclass
class RequestMap:
    """custom_id -> text, and the cache key and endpoint, from the sidecars of one or more request files."""

    model: str
    prompt_version: str
    endpoint: str
    texts: dict[str, str]

    @classmethod
    def from_request_files(cls, request_files: Sequence[str | os.PathLike]) -> RequestMap:
        keys = None
        texts: dict[str, str] = {}
        for request_file in request_files:
            path = sidecar_path(request_file)
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} not found: import-batch needs the sidecar that export-batch wrote beside {request_file}"
                )
            with path.open(encoding="utf-8") as handle:
                header = json.loads(handle.readline() or "null")
                if not isinstance(header, dict) or not {"model", "prompt_version", "endpoint"} <= header.keys():
                    raise ValueError(f"{path} line 1: not an export-batch sidecar header")
                key = (header["model"], header["prompt_version"], header["endpoint"])
                if keys is not None and key != keys:
                    raise ValueError(
                        f"{path}: written for model/prompt/endpoint {key}, but the other request files for {keys}; "
                        "import them into their own caches"
                    )
                keys = key
                for line_number, line in enumerate(handle, start=2):
                    try:
                        entry = json.loads(line)
                        texts[entry["custom_id"]] = entry["text"]
                    except (ValueError, KeyError, TypeError):
                        raise ValueError(f"{path} line {line_number}: not a {{custom_id, text}} entry") from None
        if keys is None:
            raise ValueError("import-batch needs at least one request file (--requests)")
        return cls(model=keys[0], prompt_version=keys[1], endpoint=keys[2], texts=texts)


def _batch_error_message(line: dict[str, Any]) -> str | None:
    """The error of a Batch output line, or None when it carries a successful response."""
    error = line.get("error")
    if error:
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
            return f"batch error{f' {code}' if code else ''}: {message or json.dumps(error)[:300]}"
        return f"batch error: {str(error)[:300]}"
    response = line.get("response")
    if not isinstance(response, dict):
        return "batch output line has neither a response nor an error"
    status = response.get("status_code")
    if status != 200:
        body = response.get("body")
        detail = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(detail, dict):
            detail = detail.get("message") or json.dumps(detail)
        return f"HTTP {status}: {str(detail)[:300]}"
    return None


def _output_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield line_number, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                logger.warning("%s line %d: not valid JSON; skipped", path, line_number)
                yield line_number, None


@dataclass
class BatchImport:
    """What ``import_batch`` did."""

    lines: int = 0
    imported: int = 0  # ok explanations written
    failed: int = 0  # failure records written
    already: int = 0  # the same result was already in the cache
    unreadable: int = 0  # lines that are not JSON, or carry a custom_id no request file knows
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.lines} output lines: {self.imported} explanations imported, {self.failed} failures recorded, "
            f"{self.already} already in the cache, {self.unreadable} unreadable"
        )


def import_batch(
    output_files: Sequence[str | os.PathLike],
    request_files: Sequence[str | os.PathLike],
    cache_path: str | os.PathLike,
    *,
    max_answer_chars: int | None = DEFAULT_MAX_ANSWER_CHARS,
    truncate_long_answers: bool = False,
    write_every: int = 1000,
) -> BatchImport:
    """Read Batch output (and error) files into the cache, under the key the request files were exported for.

    Each line becomes an ok record, or a failed record naming the error (the line's ``error``, or the HTTP status
    and message of its response). A text that already has an ok record is left alone, and a failure already
    recorded with the same message is not recorded again: importing the same files twice adds nothing.
    """
    requests = RequestMap.from_request_files(request_files)
    cache = ExplanationCache(cache_path, requests.model, requests.prompt_version)
    summary = BatchImport()
    with cache:
        ok_texts: set[str] = set()
        failures_seen: set[tuple[str, str]] = set()
        if cache.path.exists():
            for record in iter_cache_records(cache.path):
                if record["model"] == requests.model and record["prompt_version"] == requests.prompt_version:
                    if record["ok"]:
                        ok_texts.add(record["text"])
                    else:
                        failures_seen.add((record["text"], record["error"]))
        pending: list[ExplanationResult] = []

        def write(results: list[ExplanationResult]) -> None:
            for stored in cache.append(results):  # as stored: an answer UTF-8 cannot hold is a failure
                if stored.ok:
                    summary.imported += 1
                else:
                    summary.failed += 1
                    if len(summary.errors) < 5:
                        summary.errors.append(f"{stored.text[:60]!r}: {stored.error}")

        for output_file in map(Path, output_files):
            for line_number, line in _output_lines(output_file):
                summary.lines += 1
                text = requests.texts.get(line.get("custom_id")) if isinstance(line, dict) else None
                if text is None:
                    summary.unreadable += 1
                    if isinstance(line, dict):
                        logger.warning(
                            "%s line %d: custom_id %r is in none of the request files; skipped",
                            output_file, line_number, line.get("custom_id"),
                        )  # fmt: skip
                    continue
                if text in ok_texts:
                    summary.already += 1
                    continue
                error = _batch_error_message(line)
                if error is None:
                    result = result_from_completion(text, line["response"].get("body"), requests.endpoint)
                else:
                    result = ExplanationResult.failure(text, error)
                result = cap_answer(result, max_answer_chars, truncate_long_answers)
                if result.ok:
                    ok_texts.add(text)
                elif (text, result.error) in failures_seen:
                    summary.already += 1
                    continue
                else:
                    failures_seen.add((text, result.error))
                pending.append(result)
                if len(pending) >= write_every:
                    write(pending)
                    pending = []
        write(pending)
    return summary
