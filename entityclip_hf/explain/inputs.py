"""The texts to explain, read from JSON-lines, JSON or plain-text files."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


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
