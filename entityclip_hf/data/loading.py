"""`load_entity_dataset`: any supported dataset folder -> a `datasets.DatasetDict` with the same columns, checked.

The pipeline, per split:
1. read the split file into records (bad records, empty texts, GoodNews' listed broken images are set aside);
2. join explanations (the row's own, then released files, then caches);
3. stat every image file (in threads): missing files are set aside;
4. write the rows to an Arrow file in the `datasets` cache, fingerprinted by their content and by each image
   file's size and modification time, then open + check each image in a cached `Dataset.map` (several processes
   for large splits): unreadable files are set aside. A second load of unchanged data reuses both files;
5. the `image` column becomes a `datasets.Image` feature (decoded lazily, on access).
Every row set aside is counted in the `DataReport` with the first few ids; `strict=True` raises instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets

from .explanations import clean_explanation, resolve_explanations
from .formats import SPLITS, BadRecord, EntityFormat, canonical_split, get_format, hashed_split, normalise_key
from .images import image_error
from .joins import images_per_file_name, join_explanations, report_shared_images, report_unused_explanations
from .report import DataError, DataReport, SplitReport
from .sources import ColumnMapping, load_source_dataset

logger = logging.getLogger(__name__)

IMAGE_CHECKS = ("none", "header", "decode")
CORE_COLUMNS = ("id", "image", "text", "explanation")
# Part of every cache fingerprint: bump it when the rows this module writes change for the same input files.
_CACHE_VERSION = "1"
# Below this many images a split is checked in-process: starting worker processes costs more than it saves.
_PARALLEL_CHECK_MIN_ROWS = 5000
_STAT_CHUNK = 512


def is_file_layout(name) -> bool:
    """True for the names of the file layouts (`n24news`, `jsonl`, ...), False for a `datasets` source."""
    try:
        get_format(str(name))
    except ValueError:
        return False
    return True


def clean_text(text: str | None) -> str:
    """Whitespace runs (newlines, GoodNews' \\r\\n) become one space, as CLIP's tokenizer does anyway."""
    return " ".join(text.split()) if text else ""


def _stat_chunk(paths: Sequence[str]) -> list[tuple[int, int] | str]:
    results: list[tuple[int, int] | str] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError as error:
            results.append(error.strerror or type(error).__name__)
            continue
        results.append((info.st_size, info.st_mtime_ns) if stat.S_ISREG(info.st_mode) else "not a regular file")
    return results


def _stat_images(paths: list[str], split: str) -> list[tuple[int, int] | str]:
    """(size, mtime) of each image file, or why it is missing; threads, because stat waits on the disk."""
    chunks = [paths[start : start + _STAT_CHUNK] for start in range(0, len(paths), _STAT_CHUNK)]
    results: list[tuple[int, int] | str] = []
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        progress = datasets.utils.tqdm(
            total=len(paths), desc=f"Finding {split} images", unit=" images", disable=len(chunks) < 8
        )
        for chunk_results in pool.map(_stat_chunk, chunks):
            results.extend(chunk_results)
            progress.update(len(chunk_results))
        progress.close()
    return results


def _check_images(paths: list[str], mode: str) -> dict[str, list[str | None]]:
    return {"image_error": [image_error(path, mode) for path in paths]}


def _is_readable(errors: list[str | None]) -> list[bool]:
    return [error is None for error in errors]


def _generate_rows(columns: dict[str, list]):
    names = list(columns)
    for values in zip(*(columns[name] for name in names), strict=True):
        yield dict(zip(names, values, strict=True))


def _fingerprint(header: list[str], rows: Iterable[tuple[str | None, ...]], stats: Iterable[tuple[int, int]]) -> str:
    """A digest of the rows (tuples of strings or None) and the image stats, streamed: rows are never copied."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(header).encode("utf-8"))
    for row in rows:
        # Unit and record separators cannot be confused with text; "\x00" marks None.
        digest.update("\x1f".join("\x00" if value is None else value for value in row).encode("utf-8", "surrogatepass"))
        digest.update(b"\x1e")
    for size, mtime in stats:
        digest.update(b"%d,%d\x1e" % (size, mtime))
    return digest.hexdigest()


def _read_split(
    fmt: EntityFormat,
    root: Path,
    split: str,
    path: Path,
    broken: set[str],
    split_report: SplitReport,
    limit: int,
    hashed: bool = False,
):
    """Steps 1 and 3: the rows of one split whose record, text and image file are usable, as columns + image stats.

    Rows keep their own explanation (JSON lines); the explanation files are joined later, once every split is read.
    `hashed`: `path` is a one-file release, of which this split takes the records `hashed_split` assigns to it.
    """
    test_percent, validation_percent = fmt.full_file_split
    rows: dict[str, list] = {
        "id": [], "image": [], "text": [], "explanation": [], "metadata": [], "image_key": [], "raw_text": []
    }  # fmt: skip
    seen_ids: set[str] = set()
    issues = split_report.issues
    for record in fmt.read_split(root, path, split):
        if hashed and hashed_split(record.id, test_percent, validation_percent) != split:
            continue
        split_report.rows_read += 1
        if isinstance(record, BadRecord):
            issues["bad_record"].add(record.id, record.reason, limit)
            continue
        text = clean_text(record.raw_text)
        if not text:
            issues["empty_text"].add(record.id, "", limit)
            continue
        if broken and os.path.basename(record.image_key) in broken:
            issues["broken_image"].add(record.id, record.image_key, limit)
            continue
        if record.id in seen_ids:
            issues["duplicate_id"].add(record.id, "", limit)
        seen_ids.add(record.id)
        rows["id"].append(record.id)
        rows["image"].append(record.image_path)
        rows["text"].append(text)
        rows["explanation"].append(clean_explanation(record.explanation))
        rows["metadata"].append(record.metadata)
        rows["image_key"].append(normalise_key(record.image_key))
        rows["raw_text"].append(record.raw_text)

    stats = _stat_images(rows["image"], split)
    present = [index for index, info in enumerate(stats) if isinstance(info, tuple)]
    for index, info in enumerate(stats):
        if isinstance(info, str):
            issues["missing_image"].add(rows["id"][index], f"{rows['image'][index]}: {info}", limit)
    if len(present) < len(stats):
        rows = {name: [values[index] for index in present] for name, values in rows.items()}
        stats = [stats[index] for index in present]
    return rows, stats


def _build_split(
    fmt: EntityFormat,
    split: str,
    rows: dict[str, list],
    stats: list[tuple[int, int]],
    metadata_columns: list[str],
    image_check: str,
    num_proc: int | None,
    cache_dir: str | None,
    split_report: SplitReport,
    limit: int,
    count_missing_explanations: bool,
) -> datasets.Dataset:
    """Steps 4-5: the cached Arrow file of the rows, the cached image check, and the final `Dataset`."""
    columns = {name: rows[name] for name in CORE_COLUMNS}
    for name in metadata_columns:
        columns[name] = [metadata.get(name) for metadata in rows["metadata"]]
    features = datasets.Features({name: datasets.Value("string") for name in columns})
    # The rows' content and each image file's size and mtime: a changed annotation or image file means new
    # cache files (and a new image check), unchanged data reuses them.
    fingerprint = _fingerprint(
        [_CACHE_VERSION, fmt.name, split, list(columns)], zip(*columns.values(), strict=True), stats
    )
    if columns["id"]:
        dataset = datasets.Dataset.from_generator(
            _generate_rows,
            gen_kwargs={"columns": columns},
            features=features,
            cache_dir=cache_dir,
            fingerprint=f"entityclip-{fmt.name}-{split}-{fingerprint}",
            split=datasets.NamedSplit(split),
        )
    else:  # every row was set aside; datasets' generator builder refuses to write an empty split
        dataset = datasets.Dataset.from_dict(columns, features=features, split=datasets.NamedSplit(split))
    if image_check != "none" and len(dataset):
        if num_proc is None:
            num_proc = os.cpu_count() or 1
        checked = dataset.map(
            _check_images,
            input_columns=["image"],
            batched=True,
            batch_size=256,
            fn_kwargs={"mode": image_check},
            num_proc=num_proc if len(dataset) >= _PARALLEL_CHECK_MIN_ROWS and num_proc > 1 else None,
            desc=f"Checking {split} images ({image_check})",
        )
        errors = checked.with_format("arrow")["image_error"].to_pylist()
        bad = {index for index, error in enumerate(errors) if error is not None}
        for index in sorted(bad):
            path, error = columns["image"][index], errors[index]
            detail = error if path in error else f"{path}: {error}"  # PIL often names the file already
            split_report.issues["corrupt_image"].add(columns["id"][index], detail, limit)
        if bad:
            checked = checked.filter(
                _is_readable, input_columns=["image_error"], batched=True, desc=f"Excluding unreadable {split} images"
            )
        dataset = checked.remove_columns("image_error")
    else:
        bad = set()
    for index, explanation in enumerate(columns["explanation"] if count_missing_explanations else ()):
        if explanation is None and index not in bad:
            split_report.issues["missing_explanation"].add(columns["id"][index], "", limit)
    split_report.rows_kept = len(dataset)
    return dataset.cast_column("image", datasets.Image())


def load_entity_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    explanations: str | os.PathLike | Sequence[str | os.PathLike] | None = "auto",
    *,
    columns: ColumnMapping | None = None,
    splits: Sequence[str] | None = None,
    strict: bool = False,
    check_images: str = "header",
    num_proc: int | None = None,
    explanation_model: str | None = None,
    explanation_prompt_version: str | None = None,
    max_examples: int = 5,
    cache_dir: str | None = None,
    return_report: bool = False,
) -> datasets.DatasetDict | tuple[datasets.DatasetDict, DataReport]:
    """Load an entity-centric image-text dataset as a `DatasetDict` (train / validation / test), bad rows reported.

    Every split has the columns `id`, `image` (a `datasets.Image` over absolute paths, decoded on access), `text`,
    `explanation` (a string, or None when the pair has none) and the dataset's metadata (N24News: `section`,
    `headline`; VisualNews: `topic`, `source`; GoodNews: `title`; JSON lines: every other field).

    Args:
        name: "n24news", "visualnews", "goodnews", "jsonl" or "demo" (any case: "N24News" works), or any other
            `datasets` source: a Hub dataset id, a folder of parquet / arrow / csv / json files or webdataset tar
            shards, a `save_to_disk` folder, or one such file (`root` unused; see `sources.load_source_dataset`).
        columns: for a `datasets` source, which of its columns hold the image, text, explanation and id
            (`ColumnMapping`; default: the usual names, e.g. `image`/`jpg`, `text`/`caption`/`txt`, `id`/`__key__`).
        root: the dataset folder (its layout is in `docs/datasets.md` and in the error when it is wrong). For
            "demo", a folder where the demo is built on first use (default: in the `datasets` cache).
        explanations: None, "auto" (the released files and `root/explanations/*.jsonl` caches found in the
            dataset folder), or paths of explanation files / folders. See `resolve_explanations`.
        splits: the splits to load (default: every split whose file exists); "val" and "dev" mean validation.
        strict: raise `DataError` if any row has a missing or unreadable image, an empty text, a bad record or a
            duplicate id, instead of leaving the row out (duplicates are kept) and reporting it.
        check_images: "header" (open each image and verify its header: cheap), "decode" (decode every pixel:
            also finds truncated files, slower) or "none" (only check that the files exist).
        num_proc: processes for the image check of large splits (default: all cores).
        explanation_model, explanation_prompt_version: restrict cache files to one generator / prompt.
        max_examples: offending ids kept per problem in the report.
        cache_dir: the `datasets` cache folder (default: `HF_DATASETS_CACHE`).
        return_report: also return the `DataReport`.

    The report is logged (as a warning when it lists problems) and returned with `return_report=True`.
    """
    if check_images not in IMAGE_CHECKS:
        raise ValueError(f"check_images must be one of {', '.join(IMAGE_CHECKS)}, got {check_images!r}")
    if not is_file_layout(name):
        return load_source_dataset(
            name, columns, explanations, splits=splits, strict=strict, check_images=check_images, num_proc=num_proc,
            explanation_model=explanation_model, explanation_prompt_version=explanation_prompt_version,
            max_examples=max_examples, cache_dir=cache_dir, return_report=return_report,
        )  # fmt: skip
    if columns is not None:
        raise ValueError(f"columns: only for datasets sources; the {name} layout has fixed fields")
    fmt = get_format(name)
    root = fmt.prepare_root(root)
    wanted = list(dict.fromkeys(canonical_split(split) for split in splits)) if splits is not None else list(SPLITS)
    split_files = {split: fmt.find_split_file(root, split) for split in wanted}
    missing = [split for split, path in split_files.items() if path is None]
    # A one-file release (no split file at all) is split by a hash of each record's id.
    full_file = fmt.find_full_file(root) if len(missing) == len(wanted) else None
    if full_file is not None:
        split_files, missing = dict.fromkeys(wanted, full_file), []
    # Asked-for splits must exist; by default, any split may be absent but not all of them.
    if (splits is not None and missing) or len(missing) == len(wanted):
        expected = ", ".join(str(path) for split in missing for path in fmt.split_file_candidates(root, split))
        raise FileNotFoundError(
            f"{fmt.name}: no split file for {', '.join(missing)} (looked for {expected}). "
            f"Expected layout:\n{fmt.layout}"
        )
    split_files = {split: path for split, path in split_files.items() if path is not None}

    # Released per-split files follow the authors' split, not the hashed one: with a one-file release, the files of
    # every split apply to every split.
    sources = resolve_explanations(
        fmt,
        root,
        list(SPLITS) if full_file is not None else list(split_files),
        explanations,
        model=explanation_model,
        prompt_version=explanation_prompt_version,
    )
    if full_file is not None:
        sources.share_all()
    report = DataReport(
        dataset=fmt.name,
        root=str(root),
        image_check=check_images,
        explanation_sources=sources.describe(),
        split_rule=fmt.split_rule() if full_file is not None else None,
    )
    broken = fmt.broken_images(root)
    read: dict[str, tuple[dict[str, list], list]] = {}
    for split, path in split_files.items():
        report.splits[split] = SplitReport(split=split, source=str(path))
        read[split] = _read_split(
            fmt, root, split, path, broken, report.splits[split], max_examples, hashed=full_file is not None
        )
    images_per_name = images_per_file_name(read)
    for split, (rows, _) in read.items():
        # A split's own released files are opened for its rows only (they can be large), then let go.
        split_sources = sources.split_sources(split)
        join_explanations(
            rows, split_sources + sources.shared_sources(), images_per_name, report.splits[split].issues, max_examples
        )
        report_unused_explanations(report, split_sources, max_examples)
    report_unused_explanations(report, sources.shared_sources(), max_examples)
    report_shared_images(report, read, max_examples)
    # The same metadata columns in every split, in order of first appearance (JSON lines may differ per split).
    metadata_columns = list(fmt.metadata_columns)
    for rows, _ in read.values():
        for metadata in rows["metadata"]:
            metadata_columns.extend(name for name in metadata if name not in metadata_columns)

    result = datasets.DatasetDict()
    for split, (rows, stats) in read.items():
        result[split] = _build_split(
            fmt,
            split,
            rows,
            stats,
            metadata_columns,
            check_images,
            num_proc,
            cache_dir,
            report.splits[split],
            max_examples,
            # explanations=None asks for none: rows without one are then no news (evaluation loads this way).
            count_missing_explanations=explanations is not None,
        )
    if report.has_problems:
        logger.warning("%s", report.summary())
    else:
        logger.info("%s", report.summary())
    if strict and report.has_strict_problems:
        raise DataError(report)
    return (result, report) if return_report else result


__all__ = ["IMAGE_CHECKS", "clean_text", "image_error", "is_file_layout", "load_entity_dataset"]
