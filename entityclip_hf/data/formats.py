"""The on-disk formats of the entity-centric news datasets, read into uniform records.

Each format knows its folder layout (split files, image folder, released explanation files) and turns one split
file into `Record`s (a usable row) and `BadRecord`s (a row with a required field missing or of the wrong type).
Nothing here opens images or decides what to keep: that is `loading.py`'s job.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "validation", "test")
# Every spelling of the validation split seen in the wild (N24News: dev; VisualNews and GoodNews: val).
VALIDATION_NAMES = ("validation", "val", "dev", "valid")


@dataclass
class Record:
    """One image-text pair as read from a split file, before any check.

    `image_key` is the image's path relative to the dataset's image folder, as the dataset writes it: it is what
    released explanation files are keyed by.
    """

    id: str
    image_key: str
    image_path: str
    raw_text: str | None
    metadata: dict[str, str | None] = field(default_factory=dict)
    explanation: str | None = None


@dataclass
class BadRecord:
    """A row that cannot become a pair: `reason` names the field."""

    id: str
    reason: str


class _BadField(Exception):
    pass


def canonical_split(name: str) -> str:
    """`train` / `validation` / `test` for any spelling (`val`, `dev`, `valid` mean validation)."""
    lowered = name.lower()
    if lowered in VALIDATION_NAMES:
        return "validation"
    if lowered in ("train", "test"):
        return lowered
    raise ValueError(f"unknown split {name!r}; expected one of train, validation (or val, dev), test")


def normalise_key(key: str) -> str:
    """An image path with `/` separators, without empty or `.` parts (`./a//b.jpg` -> `a/b.jpg`)."""
    return "/".join(part for part in key.replace("\\", "/").split("/") if part not in ("", "."))


def metadata_value(value: Any) -> str | None:
    """Metadata columns are strings: strings stay, None stays None, anything else becomes its JSON text."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _string_field(record: dict, name: str, allow_null: bool = False) -> str | None:
    if name not in record:
        raise _BadField(f"no field {name!r}")
    value = record[name]
    if isinstance(value, str) or (value is None and allow_null):
        return value
    raise _BadField(f"field {name!r} is {type(value).__name__}, not a string")


def _id_value(record: dict, name: str, default: str | None) -> str:
    """The id in field `name` (a string or an integer), else `default`; no id at all is a bad field."""
    value = record.get(name)
    if value is None:
        if default is None:
            raise _BadField(f"no field {name!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _BadField(f"field {name!r} is {type(value).__name__}, not a string or an integer")
    return str(value)


def utf8_error(path: str | os.PathLike, data: bytes, error: UnicodeDecodeError, offset: int | None = None) -> str:
    """Where and why `data` (read from `path`) is not UTF-8, in words. `offset`: the file offset of `data`'s first
    byte, when `data` is a part of the file (a line); None when it is the whole file (the line is named too)."""
    if offset is None:
        line = data.count(b"\n", 0, error.start) + 1
        where = f"byte offset {error.start} (line {line})"
    else:
        where = f"byte offset {offset + error.start}"
    bad = data[error.start : error.end]
    return f"{path}: not UTF-8 text at {where}: bytes {bad!r} ({error.reason}); re-save the file as UTF-8"


def read_utf8_file(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); bad bytes raise a ValueError naming the file
    and the byte offset, not a bare UnicodeDecodeError."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(utf8_error(path, data, error)) from None
    return text.removeprefix("\ufeff")


def first_utf8_error(path: str | os.PathLike, block_size: int = 1 << 20) -> str | None:
    """Where the file at `path` stops being UTF-8 (see `utf8_error`), or None; read in blocks, for large files."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the next block in the file
    with open(path, "rb") as handle:
        while True:
            block = handle.read(block_size)
            pending = len(decoder.getstate()[0])  # the start of a character cut by the end of the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:  # error.object: the pending bytes + this block
                return utf8_error(path, error.object, error, offset=offset - pending)
            if not block:
                return None
            offset += len(block)


def read_json_records(path: Path) -> Iterator[tuple[str, str | None, Any]]:
    """(where, key, record) for a JSON file holding a list of records (key None) or an object of records."""
    try:
        data = json.loads(read_utf8_file(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if isinstance(data, list):
        return ((f"record {index}", None, record) for index, record in enumerate(data))
    if isinstance(data, dict):
        return ((str(key), str(key), record) for key, record in data.items())
    raise ValueError(f"{path}: expected a list of records or an object of records, got {type(data).__name__}")


def hashed_split(sample_id: str, test_percent: float, validation_percent: float) -> str:
    """The split of a sample of a release without split files: a fixed function of its id alone, so the same on
    every machine, for any order or subset of the file, and unchanged when rows are added (blake2b of the id, in
    buckets of 0.01%: the first `test_percent` % of buckets are test, the next `validation_percent` % validation)."""
    digest = hashlib.blake2b(sample_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 10000
    if bucket < round(test_percent * 100):
        return "test"
    if bucket < round((test_percent + validation_percent) * 100):
        return "validation"
    return "train"


class EntityFormat(ABC):
    """A dataset's folder layout and the reader of its split files."""

    name: str
    aliases: tuple[str, ...] = ()
    # The folder layout users bring, shown in errors (and in docs/datasets.md).
    layout: str
    # File-name spellings of the validation split, the dataset's own first.
    validation_names: tuple[str, ...] = VALIDATION_NAMES
    # Folders (relative to the root) and file-name prefixes of the released explanation files.
    explanation_dirs: tuple[str, ...] = ("",)
    explanation_prefixes: tuple[str, ...] = ("CapDsc_mistral_",)
    metadata_columns: tuple[str, ...] = ()
    # The field holding a record's id (JSON formats), to name bad records.
    id_field: str = "id"
    # A release as one file of every record, without split files (relative to the root, the usual name first), and
    # the test and validation shares (percent) of the `hashed_split` rule that splits it.
    full_file_names: tuple[str, ...] = ()
    full_file_split: tuple[float, float] = (5.0, 5.0)

    def find_full_file(self, root: Path) -> Path | None:
        """The one-file release in `root`, if the format has one and it is there."""
        return next((root / name for name in self.full_file_names if (root / name).is_file()), None)

    def split_rule(self) -> str:
        test, validation = self.full_file_split
        return (
            f"no split files: each record's split is hashed from its id (blake2b; {100 - test - validation:g}% "
            f"train, {validation:g}% validation, {test:g}% test), the same on every machine"
        )

    def split_names(self, split: str) -> tuple[str, ...]:
        return self.validation_names if split == "validation" else (split,)

    @abstractmethod
    def split_file_candidates(self, root: Path, split: str) -> list[Path]:
        """The paths the split file may have, the dataset's own spelling first."""

    @abstractmethod
    def read_split(self, root: Path, path: Path, split: str) -> Iterator[Record | BadRecord]:
        """Every row of the split file `path`, in file order."""

    def prepare_root(self, root: str | os.PathLike | None) -> Path:
        """Check that the dataset folder is there (the demo builds it instead)."""
        if root is None:
            raise ValueError(f"{self.name}: pass the dataset folder as root. Expected layout:\n{self.layout}")
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"{self.name}: no folder {root}. Expected layout:\n{self.layout}")
        return root

    def broken_images(self, root: Path) -> set[str]:
        """Image keys the dataset itself marks as unusable."""
        return set()

    def find_split_file(self, root: Path, split: str) -> Path | None:
        return next((path for path in self.split_file_candidates(root, split) if path.is_file()), None)

    def released_explanation_file(self, directory: Path, split: str, subdirs: tuple[str, ...] = ("",)) -> Path | None:
        """The first released explanation file of `split` under `directory`'s `subdirs`, if any."""
        for subdir in subdirs:
            for prefix in self.explanation_prefixes:
                for name in self.split_names(split):
                    path = directory / subdir / f"{prefix}{name}.json"
                    if path.is_file():
                        return path
        return None

    def _records(self, path: Path, read_one) -> Iterator[Record | BadRecord]:
        for where, key, record in read_json_records(path):
            if not isinstance(record, dict):
                yield BadRecord(where, f"record is {type(record).__name__}, not an object")
                continue
            try:
                yield read_one(key, record)
            except _BadField as error:
                # Named by its own id when it has one, by its position otherwise; the reason says both.
                sample_id = record.get(self.id_field)
                usable = isinstance(sample_id, (str, int)) and not isinstance(sample_id, bool)
                yield BadRecord(str(sample_id) if usable else where, f"{where}: {error}")


class N24NewsFormat(EntityFormat):
    name = "n24news"
    aliases = ("n4news",)  # the released code's spelling
    layout = """N24News/
  news/nytimes_train.json, news/nytimes_dev.json, news/nytimes_test.json
  imgs/<image_id>.jpg
  news/CapDsc_mistral_{train,dev,test}.json   (optional: released explanations)
or, as N24News' own build script writes it (split by a hash of image_id, 80/10/10):
  nytimes_dataset_full.json                   (every record; or news/nytimes_dataset_full.json)
  images/<image_id>.jpg"""
    validation_names = ("dev", "val", "validation", "valid")
    explanation_dirs = ("news", "")
    metadata_columns = ("section", "headline")
    id_field = "image_id"

    # What N24News' own build script writes: every record in one file, images in images/.
    full_file_names = ("nytimes_dataset_full.json", "news/nytimes_dataset_full.json", "news/nytimes.json")
    full_file_split = (10.0, 10.0)  # the proportions of the script's own (unseeded) 80/10/10 shuffle

    def split_file_candidates(self, root, split):
        return [root / "news" / f"nytimes_{name}.json" for name in self.split_names(split)]

    def image_dir(self, root: Path) -> Path:
        for name in ("imgs", "images"):
            if (root / name).is_dir():
                return root / name
        raise FileNotFoundError(f"n24news: no image folder imgs/ or images/ in {root}. Expected layout:\n{self.layout}")

    def prepare_root(self, root):
        root = super().prepare_root(root)
        self.image_dir(root)
        return root

    def read_split(self, root, path, split):
        image_dir = str(self.image_dir(root))

        def read_one(record_key, record):
            # An object of records may key them by image id instead of repeating it.
            image_id = _id_value(record, "image_id", default=record_key)
            key = f"{image_id}.jpg"
            return Record(
                id=image_id,
                image_key=key,
                image_path=os.path.join(image_dir, key),
                raw_text=_string_field(record, "caption", allow_null=True),
                metadata={name: metadata_value(record.get(name)) for name in self.metadata_columns},
            )

        return self._records(path, read_one)


class VisualNewsFormat(EntityFormat):
    name = "visualnews"
    layout = """VisualNews/
  train.json, val.json, test.json            (records with id, caption, topic, source, image_path)
  images/<source>/images/<folder>/<n>.jpg    (image_path is relative to images/, like ./washington_post/images/0376/501.jpg)
  CapDsc_mistral_{train,val,test}.json       (optional: released explanations)
or the official release (split by a hash of id, 90/5/5):
  origin/data.json                           (every record; image_path relative to origin/)
  origin/<source>/images/<folder>/<n>.jpg"""
    validation_names = ("val", "dev", "validation", "valid")
    metadata_columns = ("topic", "source")

    # The official release: origin/data.json holds every record; image_path is relative to origin/.
    full_file_names = ("origin/data.json",)
    full_file_split = (5.0, 5.0)

    def split_file_candidates(self, root, split):
        return [root / f"{name}.json" for name in self.split_names(split)]

    def prepare_root(self, root):
        root = super().prepare_root(root)
        if not (root / "images").is_dir() and self.find_full_file(root) is None:
            raise FileNotFoundError(
                f"visualnews: no image folder {root / 'images'} and no {root / 'origin' / 'data.json'}. "
                f"Expected layout:\n{self.layout}"
            )
        return root

    def read_split(self, root, path, split):
        # The official release's image paths are relative to origin/, beside data.json.
        image_dir = str(path.parent if path == self.find_full_file(root) else root / "images")

        def read_one(record_key, record):
            key = normalise_key(_string_field(record, "image_path"))
            return Record(
                id=_id_value(record, "id", default=key),
                image_key=key,
                image_path=os.path.join(image_dir, key),
                raw_text=_string_field(record, "caption", allow_null=True),
                metadata={name: metadata_value(record.get(name)) for name in self.metadata_columns},
            )

        return self._records(path, read_one)


class GoodNewsFormat(EntityFormat):
    name = "goodnews"
    layout = """GoodNews/
  new_goodnews_capim_train.json, new_goodnews_capim_val.json, new_goodnews_capim_test.json
  images/<article id>_<index>.jpg    (or resized/<article id>_<index>.jpg, as resized releases ship them)
  broken_images.txt                  (optional: image names to skip, one a line)
  train_cap_individual/New_Corr_CapDsc_mistral_{train,val,test}.json   (optional: released explanations)"""
    validation_names = ("val", "dev", "validation", "valid")
    explanation_dirs = ("train_cap_individual", "")
    explanation_prefixes = ("New_Corr_CapDsc_mistral_", "CapDsc_mistral_")
    metadata_columns = ("title",)
    id_field = "image_id"

    def split_file_candidates(self, root, split):
        return [root / f"new_goodnews_capim_{name}.json" for name in self.split_names(split)]

    def image_dir(self, root: Path) -> Path:
        for name in ("images", "resized"):
            if (root / name).is_dir():
                return root / name
        raise FileNotFoundError(
            f"goodnews: no image folder images/ or resized/ in {root}. Expected layout:\n{self.layout}"
        )

    def prepare_root(self, root):
        root = super().prepare_root(root)
        self.image_dir(root)
        return root

    def broken_images(self, root):
        path = root / "broken_images.txt"
        if not path.is_file():
            return set()
        # Entries may carry a folder; the image names are what records refer to.
        lines = read_utf8_file(path).splitlines()
        return {os.path.basename(normalise_key(line.strip())) for line in lines if line.strip()}

    def read_split(self, root, path, split):
        image_dir = str(self.image_dir(root))

        def read_one(record_key, record):
            key = normalise_key(_string_field(record, "image_id"))
            return Record(
                id=key,
                image_key=key,
                image_path=os.path.join(image_dir, key),
                raw_text=_string_field(record, "captioning", allow_null=True),
                metadata={name: metadata_value(record.get(name)) for name in self.metadata_columns},
            )

        return self._records(path, read_one)


class JsonLinesFormat(EntityFormat):
    name = "jsonl"
    aliases = ("json", "jsonlines")
    layout = """<root>/
  train.jsonl, validation.jsonl (or val.jsonl / dev.jsonl), test.jsonl
      one object a line: {"image": "<path, relative to <root> or absolute>", "text": "...",
                          "id": "... (optional)", "explanation": "... (optional)", <any other field: metadata>}
  CapDsc_mistral_{train,val,test}.json   (optional: explanations keyed by image file name)"""
    core_fields = ("id", "image", "text", "explanation")

    def split_file_candidates(self, root, split):
        return [root / f"{name}.jsonl" for name in self.split_names(split)]

    def read_split(self, root, path, split):
        # Bytes, split on b"\n" only: a line with bad bytes or bad JSON is one bad record, never the end of the load.
        with path.open("rb") as handle:
            offset = 0
            for line_number, raw in enumerate(handle, start=1):
                line_offset, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                where = f"{split}-{line_number}"
                try:
                    record = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
                except UnicodeDecodeError as error:
                    problem = utf8_error(path, raw, error, offset=line_offset)
                    yield BadRecord(where, f"line {line_number}: {problem}")
                    continue
                except json.JSONDecodeError as error:
                    yield BadRecord(where, f"{path} line {line_number} is not valid JSON ({error.msg})")
                    continue
                if not isinstance(record, dict):
                    yield BadRecord(where, f"line {line_number} is {type(record).__name__}, not an object")
                    continue
                sample_id = where
                try:
                    sample_id = _id_value(record, "id", default=where)
                    image = _string_field(record, "image")
                    yield Record(
                        id=sample_id,
                        image_key=normalise_key(image),
                        # Absolute paths stay; relative ones are relative to the folder of the split file.
                        image_path=str(path.parent / image),
                        raw_text=_string_field(record, "text", allow_null=True),
                        metadata={
                            name: metadata_value(value)
                            for name, value in record.items()
                            if name not in self.core_fields
                        },
                        explanation=_string_field(record, "explanation", allow_null=True)
                        if "explanation" in record
                        else None,
                    )
                except _BadField as error:
                    yield BadRecord(sample_id, str(error))


class DemoFormat(JsonLinesFormat):
    name = "demo"
    aliases = ()
    layout = "a folder made by entityclip_hf.data.make_demo_dataset (built on first use)"

    def prepare_root(self, root):
        from .demo import default_demo_root, is_demo_folder, make_demo_dataset

        root = Path(root).expanduser().resolve() if root is not None else default_demo_root()
        # A demo already there is used whatever its parameters; otherwise the default demo is built.
        return root if is_demo_folder(root) else make_demo_dataset(root)


FORMATS: dict[str, EntityFormat] = {
    fmt.name: fmt for fmt in (N24NewsFormat(), VisualNewsFormat(), GoodNewsFormat(), JsonLinesFormat(), DemoFormat())
}


def _lookup_name(name: str) -> str:
    return "".join(character for character in name.lower() if character.isalnum())


def get_format(name: str) -> EntityFormat:
    """The format called `name`: case, spaces, dashes and underscores do not matter ("N24News" == "n24news")."""
    wanted = _lookup_name(str(name))
    for fmt in FORMATS.values():
        if wanted == fmt.name or wanted in fmt.aliases:
            return fmt
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(FORMATS))}")


__all__ = [
    "FORMATS",
    "SPLITS",
    "BadRecord",
    "EntityFormat",
    "Record",
    "canonical_split",
    "first_utf8_error",
    "get_format",
    "hashed_split",
    "normalise_key",
    "read_utf8_file",
]
