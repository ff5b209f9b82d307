"""Any `datasets` source as an entity dataset: a Hub dataset id, a local folder of parquet / arrow / csv / json files
or webdataset tar shards, a `save_to_disk` folder, or one such file.

Its columns are mapped onto the loaders' own (`id`, `image`, `text`, `explanation`; every other column is kept), and
its rows go through the same checks as the file layouts' (`DataReport`: bad records, empty texts, missing and
unreadable images, duplicate ids, explanation joins, images shared by two splits). Images may be a `datasets.Image`
column (encoded bytes, or paths) or a column of path strings (relative paths: to the source folder).

`load_source_dataset` returns checked map-style splits; `open_source_stream` an `IterableDataset` of one split whose
bad rows are left out on the fly (counted per worker, logged), for `--streaming` training.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets.data_files import DataFilesDict, get_data_patterns

from .explanations import EXPLANATIONS_SUBDIR, clean_explanation, resolve_explanations
from .formats import FORMATS, SPLITS, canonical_split, get_format, normalise_key
from .images import image_error
from .joins import images_per_file_name, join_explanations, report_shared_images, report_unused_explanations
from .report import DataError, DataReport, SplitReport, one_line

logger = logging.getLogger(__name__)

# Columns tried, in order, when no mapping is given: the usual names, and webdataset's file extensions.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "image_path")
TEXT_COLUMN_CANDIDATES = ("text", "caption", "txt", "captioning")
ID_COLUMN_CANDIDATES = ("id", "image_id", "__key__")
EXPLANATION_COLUMN_CANDIDATES = ("explanation",)
# A single data file given as the source: the `datasets` builder that reads it.
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json",
                 ".tar": "webdataset"}  # fmt: skip
# Helper columns of the check, removed before the splits are returned.
_CHECK_COLUMNS = ("_problem", "_detail", "_image_key", "_raw_text")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ColumnMapping:
    """Which source column holds each of `image`, `text`, `explanation`, `id` (None: the first usual name present)."""

    image: str | None = None
    text: str | None = None
    explanation: str | None = None
    id: str | None = None

    def resolve(self, column_names: Sequence[str], where: str) -> dict[str, str | None]:
        """Our column name -> the source's (None: the source has none; ids and explanations are optional)."""
        present = list(column_names)
        chosen: dict[str, str | None] = {}
        for name, given, candidates, required in (
            ("image", self.image, IMAGE_COLUMN_CANDIDATES, True),
            ("text", self.text, TEXT_COLUMN_CANDIDATES, True),
            ("explanation", self.explanation, EXPLANATION_COLUMN_CANDIDATES, False),
            ("id", self.id, ID_COLUMN_CANDIDATES, False),
        ):
            if given is not None:
                if given not in present:
                    raise ValueError(f"{where}: no column {given!r} (--{name}_column); its columns: {present}")
                chosen[name] = given
                continue
            chosen[name] = next((column for column in candidates if column in present), None)
            if required and chosen[name] is None:
                raise ValueError(
                    f"{where}: no {name} column (looked for {', '.join(candidates)}); its columns: {present}. "
                    f"Name it with --{name}_column (Python: columns=ColumnMapping({name}=...))"
                )
        return chosen


def is_saved_to_disk(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def looks_like_hub_id(source: str) -> bool:
    """`name` or `user/name`, and no local file or folder of that name."""
    return bool(_HUB_ID.match(source)) and not os.path.exists(source)


def _is_explanation_file(path: Path, folder: Path) -> bool:
    """Released explanation files (`CapDsc_mistral_train.json`) and `explanations/` caches are joined, not data."""
    relative = path.relative_to(folder)
    released_prefixes = {prefix for fmt in FORMATS.values() for prefix in fmt.explanation_prefixes}
    return relative.parts[0] == EXPLANATIONS_SUBDIR or path.name.startswith(tuple(released_prefixes))


def split_data_files(folder: Path) -> dict[str, list[str]]:
    """The data files of each split as datasets finds them in `folder` (its split name patterns), less the
    explanation files that the same patterns match (`CapDsc_mistral_train.json` would be read as train rows)."""
    patterns = get_data_patterns(str(folder))
    found = DataFilesDict.from_local_or_remote(patterns, base_path=str(folder))
    kept = {
        split: [file for file in files if not _is_explanation_file(Path(file), folder.resolve())]
        for split, files in found.items()
    }
    return {split: files for split, files in kept.items() if files}


def _split_name(name: str) -> str:
    try:
        return canonical_split(name)
    except ValueError:
        return name  # another split name (e.g. "extra") is kept as it is


def _rows_of(stream):
    yield from stream


def open_source(
    source: str | os.PathLike,
    *,
    streaming: bool = False,
    splits: Sequence[str] | None = None,
    cache_dir: str | None = None,
    stream_shards: int = 256,
) -> tuple[dict, Path | None]:
    """The splits of `source` as `datasets` gives them (map-style, or iterable with `streaming=True`), by canonical
    split name, and the local folder they came from (None for a Hub id).

    `splits`: only these (canonical names; those the source lacks are left out), and only their files are read: the
    evaluation splits of a streamed training run never convert the training files. A Hub source's splits without
    its train split are streamed into the cache (a Hub `load_dataset` prepares every split).
    A `save_to_disk` folder streams from its Arrow files, in `stream_shards` shards (at most one per row) so that
    processes and DataLoader workers each get some.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    wanted = None if splits is None else {canonical_split(split) for split in splits}

    def keep(names) -> list:
        return [name for name in names if wanted is None or _split_name(name) in wanted]

    if path.is_dir() and is_saved_to_disk(path):
        loaded = datasets.load_from_disk(str(path))
        found = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        found = {name: found[name] for name in keep(found)}
        if streaming:
            found = {
                name: split.to_iterable_dataset(num_shards=max(1, min(stream_shards, len(split))))
                for name, split in found.items()
            }
        root = path.resolve()
    elif path.is_dir():
        # datasets infers the builder (parquet, arrow, csv, json, webdataset, ...) and the splits from the file names.
        files = split_data_files(path)
        files = {name: files[name] for name in keep(files)}
        if not files:
            return {}, path.resolve()
        found = dict(datasets.load_dataset(str(path), data_files=files, streaming=streaming, cache_dir=cache_dir))
        root = path.resolve()
    elif path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{path}: not a data file datasets reads here (expected {', '.join(FILE_BUILDERS)})")
        if not keep(["train"]):
            return {}, path.resolve().parent
        found = dict(
            datasets.load_dataset(builder, data_files={"train": str(path)}, streaming=streaming, cache_dir=cache_dir)
        )
        root = path.resolve().parent
    elif looks_like_hub_id(text):
        partial = not streaming and wanted is not None and "train" not in wanted
        try:
            found = dict(datasets.load_dataset(text, streaming=streaming or partial, cache_dir=cache_dir))
        except (ConnectionError, FileNotFoundError) as error:
            raise FileNotFoundError(
                f"{text}: not a dataset layout ({', '.join(sorted(FORMATS))}), no such file or folder, and the Hub "
                f"dataset could not be loaded ({one_line(error)}). Offline (HF_HUB_OFFLINE=1), a Hub dataset loads "
                "from the datasets cache once it has been loaded there"
            ) from error
        found = {name: found[name] for name in keep(found)}
        if partial:
            found = {
                name: datasets.Dataset.from_generator(
                    _rows_of, gen_kwargs={"stream": stream}, features=stream.features, cache_dir=cache_dir
                )
                for name, stream in found.items()
            }
        root = None
    else:
        raise FileNotFoundError(
            f"{text}: not a dataset layout ({', '.join(sorted(FORMATS))}), no such file or folder, and not a Hub "
            "dataset id (user/name)"
        )
    return {_split_name(name): split for name, split in found.items()}, root


def _renamed(dataset, chosen: dict[str, str | None]):
    """`dataset` with the chosen source columns under our names; a source column already holding one of our names
    but not chosen for it keeps its values as `<name>_original`."""
    renames: dict[str, str] = {}
    for ours, theirs in chosen.items():
        if theirs is not None and theirs != ours:
            if ours in dataset.column_names and ours not in chosen.values():
                renames[ours] = f"{ours}_original"
            renames[theirs] = ours
    return dataset.rename_columns(renames) if renames else dataset


def _image_value(value, root: Path | None):
    """(encoded bytes or None, absolute path or None) of an image value: a `datasets.Image` dict or a path string."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, str):
        data, path = None, value
    else:
        return None, None
    if data is None and path and not os.path.isabs(path) and root is not None and "://" not in path:
        path = str(root / path)  # relative paths are relative to the source folder, not the current directory
    return data, path


def row_problem(row: dict, root: Path | None, image_check: str) -> tuple[str | None, str]:
    """(problem, detail) of one mapped row, the problem one of report.EXCLUDED_PROBLEMS, or (None, "")."""
    text, explanation, sample_id = row.get("text"), row.get("explanation"), row.get("id")
    if text is not None and not isinstance(text, str):
        return "bad_record", f"field 'text' is {type(text).__name__}, not a string"
    if explanation is not None and not isinstance(explanation, str):
        return "bad_record", f"field 'explanation' is {type(explanation).__name__}, not a string"
    if sample_id is not None and (isinstance(sample_id, bool) or not isinstance(sample_id, (str, int))):
        return "bad_record", f"field 'id' is {type(sample_id).__name__}, not a string or an integer"
    data, path = _image_value(row.get("image"), root)
    if data is None and not path:
        return "bad_record", "no image (neither bytes nor a path)"
    if not text or not text.strip():
        return "empty_text", ""
    if data is None:
        if "://" not in path and not os.path.isfile(path):
            return "missing_image", f"{path}: no such file"
        if image_check == "none":
            return None, ""
    if image_check != "none":
        error = image_error(data if data is not None else path, image_check)
        if error is not None:
            return "corrupt_image", error if (path and path in error) else f"{path or 'bytes'}: {error}"
    return None, ""


def _mapped_rows(batch: dict[str, list], indices: list[int], *, split: str, root: Path | None, image_check: str):
    """The check of a batch of rows: normalised columns plus each row's problem, image key and raw text."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    out: dict[str, list] = {name: [] for name in ("id", "image", "text", "explanation", *_CHECK_COLUMNS)}
    for index, row in zip(indices, rows, strict=True):
        problem, detail = row_problem(row, root, image_check)
        data, path = _image_value(row.get("image"), root)
        sample_id = row.get("id")
        text = row.get("text") if isinstance(row.get("text"), str) else None
        explanation = row.get("explanation") if isinstance(row.get("explanation"), str) else None
        out["id"].append(str(sample_id) if isinstance(sample_id, (str, int)) else f"{split}-{index}")
        out["image"].append({"bytes": data, "path": path})
        out["text"].append(" ".join(text.split()) if text else "")
        out["explanation"].append(clean_explanation(explanation))
        out["_problem"].append(problem)
        out["_detail"].append(detail)
        # What released explanation files are keyed by: the image's path under the source folder, else its name.
        key = path or out["id"][-1]
        if path and root is not None and path.startswith(str(root) + os.sep):
            key = os.path.relpath(path, root)
        out["_image_key"].append(normalise_key(key))
        out["_raw_text"].append(text)
    return out


def _prepare_columns(dataset, columns: ColumnMapping, where: str):
    """Mapped column names, undecoded images, and the optional columns present (None-filled)."""
    chosen = columns.resolve(dataset.column_names, where)
    dataset = _renamed(dataset, chosen)
    feature = (dataset.features or {}).get("image")
    if isinstance(feature, datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    elif feature is not None and not (
        isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    ):
        raise ValueError(f"{where}: image column {chosen['image']!r} is {feature}, expected images or path strings")
    absent = [name for name in ("explanation", "id") if chosen[name] is None]
    if absent:
        dataset = dataset.map(_none_columns, batched=True, fn_kwargs={"names": absent})
    return dataset


def _none_columns(batch: dict[str, list], names: list[str]) -> dict[str, list]:
    rows = len(next(iter(batch.values())))
    return {name: [None] * rows for name in names}


def _output_features(dataset) -> datasets.Features:
    features = dict(dataset.features)
    for name in ("id", "text", "explanation", *_CHECK_COLUMNS):
        features[name] = datasets.Value("string")
    features["image"] = datasets.Image(decode=False)
    return datasets.Features(features)


def load_source_dataset(
    source: str | os.PathLike,
    columns: ColumnMapping | None = None,
    explanations=None,
    *,
    splits: Sequence[str] | None = None,
    strict: bool = False,
    check_images: str = "header",
    num_proc: int | None = None,
    explanation_model: str | None = None,
    explanation_prompt_version: str | None = None,
    max_examples: int = 5,
    cache_dir: str | None = None,
    return_report: bool = False,
):
    """A `datasets` source as checked splits with the columns of `load_entity_dataset` (see there for the arguments).

    `explanations`: None, "auto" (a local source folder's `CapDsc_mistral_<split>.json` files and `explanations/`
    caches, as for JSON lines; a Hub source has none) or files / folders. A row's own explanation column wins.
    """
    columns = columns or ColumnMapping()
    wanted = list(dict.fromkeys(canonical_split(split) for split in splits)) if splits is not None else None
    raw, root = open_source(source, splits=wanted, cache_dir=cache_dir)
    if wanted is not None and (missing := [split for split in wanted if split not in raw]):
        raise FileNotFoundError(f"{source}: no split {', '.join(missing)} (its splits: {', '.join(raw)})")
    names = wanted or [split for split in SPLITS if split in raw] + [split for split in raw if split not in SPLITS]
    fmt = get_format("jsonl")  # released explanation files are named as for the plain format
    if root is None and isinstance(explanations, str) and explanations == "auto":
        sources = resolve_explanations(fmt, Path("."), names, None)
    else:
        sources = resolve_explanations(
            fmt,
            root or Path("."),
            names,
            explanations,
            model=explanation_model,
            prompt_version=explanation_prompt_version,
        )
    report = DataReport(dataset="datasets source", root=str(source), image_check=check_images,
                        explanation_sources=sources.describe())  # fmt: skip
    checked: dict[str, datasets.Dataset] = {}
    read: dict[str, tuple[dict[str, list], None]] = {}
    for split in names:
        split_report = report.splits[split] = SplitReport(split=split, source=f"{source} [{split}]")
        dataset = _prepare_columns(raw[split], columns, f"{source} [{split}]")
        dataset = dataset.map(
            _mapped_rows,
            batched=True,
            batch_size=256,
            with_indices=True,
            fn_kwargs={"split": split, "root": root, "image_check": check_images},
            features=_output_features(dataset),
            num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) >= 5000 else None,
            desc=f"Checking {split} rows ({check_images})",
        )
        split_report.rows_read = len(dataset)
        table = dataset.with_format("arrow").select_columns(["id", "_problem", "_detail", "image"])[:]
        ids = table["id"].to_pylist()
        seen: set[str] = set()
        for sample_id, problem, detail in zip(ids, table["_problem"].to_pylist(), table["_detail"].to_pylist(),
                                              strict=True):  # fmt: skip
            if problem is not None:
                split_report.issues[problem].add(sample_id, detail or "", max_examples)
                continue
            if sample_id in seen:
                split_report.issues["duplicate_id"].add(sample_id, "", max_examples)
            seen.add(sample_id)
        if any(issue.count for name, issue in split_report.issues.items() if name != "duplicate_id"):
            dataset = dataset.filter(lambda problems: [p is None for p in problems], input_columns=["_problem"],
                                     batched=True, desc=f"Excluding bad {split} rows")  # fmt: skip
        kept = dataset.with_format("arrow").select_columns(
            ["id", "text", "explanation", "_image_key", "_raw_text", "image"]
        )[:]
        images = kept["image"].to_pylist()
        rows = {
            "id": kept["id"].to_pylist(),
            "text": kept["text"].to_pylist(),
            "explanation": kept["explanation"].to_pylist(),
            "image_key": kept["_image_key"].to_pylist(),
            "raw_text": kept["_raw_text"].to_pylist(),
            # Only path images can be shared by two splits' files; bytes have no name to compare.
            "image": [
                image["path"] if image["bytes"] is None else f"\x00{index}" for index, image in enumerate(images)
            ],
        }
        read[split] = (rows, None)
        checked[split] = dataset
    per_name = images_per_file_name(read)
    for split in names:
        rows = read[split][0]
        split_sources = sources.split_sources(split)
        before = list(rows["explanation"])
        join_explanations(rows, split_sources + sources.shared_sources(), per_name, report.splits[split].issues,
                          max_examples)  # fmt: skip
        report_unused_explanations(report, split_sources, max_examples)
        dataset = checked[split].remove_columns(list(_CHECK_COLUMNS))
        if rows["explanation"] != before:
            dataset = dataset.remove_columns("explanation").add_column(
                "explanation", rows["explanation"], feature=datasets.Value("string")
            )
        if explanations is not None:
            for sample_id, explanation in zip(rows["id"], rows["explanation"], strict=True):
                if explanation is None:
                    report.splits[split].issues["missing_explanation"].add(sample_id, "", max_examples)
        report.splits[split].rows_kept = len(dataset)
        checked[split] = dataset.cast_column("image", datasets.Image())
    report_unused_explanations(report, sources.shared_sources(), max_examples)
    report_shared_images(report, read, max_examples)
    (logger.warning if report.has_problems else logger.info)("%s", report.summary())
    if strict and report.has_strict_problems:
        raise DataError(report)
    result = datasets.DatasetDict(checked)
    return (result, report) if return_report else result


class _StreamRowCheck:
    """`IterableDataset.filter` function: a mapped row's problem is logged (the first few per worker) and the row
    left out. Images are only checked when the collator decodes them (reading each file twice costs too much)."""

    def __init__(self, where: str, root: Path | None, max_logged: int = 5):
        self.where, self.root, self.max_logged, self.bad = where, root, max_logged, 0

    def __call__(self, row: dict) -> bool:
        problem, detail = row_problem(row, self.root, "none")
        if problem is None:
            return True
        self.bad += 1
        if self.bad <= self.max_logged:
            logger.warning(
                "%s: row %s left out (%s%s)", self.where, row.get("id"), problem, f": {detail}" if detail else ""
            )
        return False


def _normalise_stream_row(row: dict, root: Path | None) -> dict:
    data, path = _image_value(row.get("image"), root)
    text, explanation, sample_id = row.get("text"), row.get("explanation"), row.get("id")
    return {
        "id": str(sample_id) if sample_id is not None else None,
        "image": {"bytes": data, "path": path},
        "text": " ".join(text.split()),
        "explanation": clean_explanation(explanation),
    }


def open_source_stream(
    source: str | os.PathLike | datasets.Dataset | datasets.IterableDataset,
    split: str = "train",
    columns: ColumnMapping | None = None,
    *,
    cache_dir: str | None = None,
    stream_shards: int = 256,
) -> datasets.IterableDataset:
    """One split of a source as an `IterableDataset` with our columns (images undecoded), bad rows left out on the
    fly. `source` may also be a map-style `Dataset` (a file layout's split): it streams from its Arrow files."""
    if isinstance(source, datasets.Dataset):
        stream, root, where = (
            source.to_iterable_dataset(num_shards=max(1, min(stream_shards, len(source)))),
            None,
            split,
        )
    elif isinstance(source, datasets.IterableDataset):
        stream, root, where = source, None, split
    else:
        streams, root = open_source(source, streaming=True, cache_dir=cache_dir, stream_shards=stream_shards)
        split = canonical_split(split)
        if split not in streams:
            raise FileNotFoundError(f"{source}: no split {split} (its splits: {', '.join(streams)})")
        stream, where = streams[split], f"{source} [{split}]"
    if stream.features is None and hasattr(stream, "_resolve_features"):  # columns known only once read
        stream = stream._resolve_features()
    stream = _prepare_columns(stream, columns or ColumnMapping(), where)
    stream = stream.filter(_StreamRowCheck(where, root))
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(decode=False),
            "text": datasets.Value("string"),
            "explanation": datasets.Value("string"),
        }  # fmt: skip
    )
    stream = stream.map(_normalise_stream_row, fn_kwargs={"root": root}, features=features)
    # Only our columns: the rest (webdataset's __url__, metadata) is not needed to train and need not be batched.
    return stream.select_columns(list(features))


__all__ = [
    "ColumnMapping",
    "is_saved_to_disk",
    "load_source_dataset",
    "looks_like_hub_id",
    "open_source",
    "open_source_stream",
    "split_data_files",
    "row_problem",
]
