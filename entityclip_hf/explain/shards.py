"""Splitting the texts over workers, and merging their caches into one file.

A text's shard comes from a stable hash of its UTF-8 bytes (SHA-256), never Python's ``hash()`` (salted per
process): every worker, on any machine, puts each text in the same shard.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from .cache import CacheLockedError, cache_files, iter_cache_records, write_json_lines_atomically, writer_is_running
from .prompt import PROMPT_VERSION

logger = logging.getLogger(__name__)


def text_hash(text: str) -> str:
    """SHA-256 of the text's UTF-8 bytes, as hex (lone surrogates hashed as their UTF-16 code unit)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def shard_of(text: str, count: int) -> int:
    """The shard (0 .. count-1) that ``text`` belongs to, the same in every process."""
    return int(text_hash(text)[:16], 16) % count


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int)) or count < 1 or not 0 <= index < count:
        raise ValueError(f"a shard is (index, count) with 0 <= index < count, got {shard!r}")
    return index, count


def parse_shard(value: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)``, shards numbered from 0 (``0/3``, ``1/3``, ``2/3``)."""
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/N with whole numbers, e.g. 0/4, got {value!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard i/N needs 0 <= i < N (shards count from 0), got {value!r}")
    return index, count


def merge_caches(
    sources: Sequence[str | os.PathLike], output: str | os.PathLike, keep_failures: bool = False
) -> dict[str, int]:
    """Write one cache file from several (files or folders of files), atomically.

    For each (model, text) one record survives: an ok record of the current prompt version wins over ok records of
    older versions, and among equals the later one (in file order, sources in the order given) wins, as
    ``read_explanation_cache`` chooses. Failures are dropped unless ``keep_failures`` (then a text's last failure is
    kept only when it has no ok record). The output is written to a temporary file beside it, fsynced, then
    renamed over ``output``: a crash leaves the old file or the new one, never half of one. Returns counts.

    An ``output`` a generator is writing to is refused (``CacheLockedError``): the rename would cut that writer off,
    and what it wrote next would be lost. A source still being written is merged as it is now, with a warning.
    """
    output = Path(output)
    if writer_is_running(output):
        raise CacheLockedError(
            f"a generator is writing to {output}: merging over it would lose what it writes next; "
            "merge into another file, or wait until it ends"
        )
    chosen: dict[tuple[str, str], dict] = {}
    failures: dict[tuple[str, str], dict] = {}
    read = 0
    files = [file for source in sources for file in cache_files(source)]
    for file in files:
        if writer_is_running(file):
            logger.warning(
                "%s is still being written (its worker is running): merged as it is now; merge again when it ends",
                file,
            )
        for record in iter_cache_records(file):
            read += 1
            key = (record["model"], record["text"])
            if not record["ok"]:
                failures[key] = record
                continue
            current = record["prompt_version"] == PROMPT_VERSION
            previous = chosen.get(key)
            if previous is None or current or previous["prompt_version"] != PROMPT_VERSION:
                chosen[key] = record
    records = list(chosen.values())
    if keep_failures:
        records += [record for key, record in failures.items() if key not in chosen]
    write_json_lines_atomically(output, records)
    return {"files": len(files), "records_read": read, "written": len(records), "ok": len(chosen)}
