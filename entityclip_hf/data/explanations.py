"""Explanation files joined onto dataset rows: the released per-image JSON files and our own generation cache.

- Released format (`CapDsc_mistral_{split}.json`, GoodNews `New_Corr_CapDsc_mistral_{split}.json`): one JSON object
  mapping an image to its explanation. N24News and GoodNews key by file name (`abc.jpg`); VisualNews by the
  authors' absolute paths (`/star/.../images//washington_post/images/0376/501.jpg`). A row matches the key that
  ends with the row's image path relative to the image folder, else a key that is the row's bare file name: no
  absolute path of anyone's machine is needed, and no row gets the explanation of another folder's same-named image.
- Cache format (JSON lines written by `entityclip_hf.explain`): keyed by text; a row matches by its text as
  written in the dataset file, else by its whitespace-normalised text.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..explain import read_explanation_cache
from .formats import EntityFormat, normalise_key, read_utf8_file

logger = logging.getLogger(__name__)

CACHE_SUFFIXES = (".jsonl", ".ndjson")
# Where "auto" also looks: the conventional home of `entityclip-explain --cache` files and of extra released files.
EXPLANATIONS_SUBDIR = "explanations"


def clean_explanation(value: str | None) -> str | None:
    """A blank explanation says nothing: it counts as missing (as in the processor)."""
    if value is None or not value.strip():
        return None
    return value


# An index entry for a path tail that keys with different explanations end with: it joins no row.
_AMBIGUOUS = ()


class ReleasedExplanations:
    """A released explanation file: image key -> explanation, matched by path tail.

    `lookup` returns `(explanation, problem)`: problem says why an entry that could have matched was not joined (an
    ambiguous key); `unused()` lists the entries no lookup took.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            data = json.loads(read_utf8_file(self.path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{self.path}: a released explanation file maps image names to explanations (a JSON object), "
                f"got {type(data).__name__}"
            )
        self._entries: dict[str, str] = {}
        not_text = []
        for key, value in data.items():
            if value is not None and not isinstance(value, str):
                not_text.append(key)
                continue
            explanation = clean_explanation(value)
            if explanation is not None:
                self._entries[normalise_key(key)] = explanation
        if not_text:
            logger.warning(
                "%s: %d entries are not text and are ignored (e.g. %s)", self.path, len(not_text), not_text[:3]
            )
        self._by_depth: dict[int, dict[str, tuple[str, ...]]] = {}
        self._used: set[str] = set()

    def __str__(self) -> str:
        return str(self.path)

    def _index(self, depth: int) -> dict[str, tuple[str, ...]]:
        # Built on first use, one per path depth the rows need (N24News: 1; VisualNews: 4), to keep memory flat:
        # tail -> the keys ending with it. A tail shared by keys with different explanations maps to _AMBIGUOUS:
        # VisualNews reuses file names (501.jpg) in every folder, and matching such a name would hand a row another
        # image's explanation.
        if depth not in self._by_depth:
            index: dict[str, tuple[str, ...]] = {}
            for key, explanation in self._entries.items():
                parts = key.split("/")
                if len(parts) >= depth:
                    tail = "/".join(parts[-depth:])
                    keys = index.get(tail)
                    if keys is None:
                        index[tail] = (key,)
                    elif keys is not _AMBIGUOUS:
                        same = self._entries[keys[0]] == explanation
                        index[tail] = (*keys, key) if same else _AMBIGUOUS
            self._by_depth[depth] = index
        return self._by_depth[depth]

    def lookup(
        self, image_key: str, raw_text: str, text: str, name_shared_by: int = 1
    ) -> tuple[str | None, str | None]:
        """The explanation of the key ending with the row's image path (relative to the image folder), and why an
        entry that could match was not taken.

        A row in a subfolder (VisualNews: `bbc/images/0001/501.jpg`) also matches a key that is a bare file name
        (`501.jpg`, as JSON-lines users may write), unless `name_shared_by` (the number of the dataset's images
        with that file name) is above 1: the bare name then names none of them, and joins none. A tail shared by keys
        with different explanations matches none either.
        """
        parts = normalise_key(image_key).split("/")
        tail = "/".join(parts)
        keys = self._index(len(parts)).get(tail)
        if keys is _AMBIGUOUS:
            return None, f"{self.path}: keys with different explanations end with {tail!r}"
        if keys:
            self._used.update(keys)
            return self._entries[keys[0]], None
        name = parts[-1]
        if len(parts) > 1 and name in self._entries:  # a bare-name key: no "/" in it
            if name_shared_by > 1:
                return None, f"{self.path}: key {name!r} names no folder, and {name_shared_by} images are called so"
            self._used.add(name)
            return self._entries[name], None
        return None, None

    def unused(self) -> list[str]:
        """The keys (normalised) of the entries no row took, in file order."""
        return [key for key in self._entries if key not in self._used]


class CachedExplanations:
    """An `entityclip-explain` cache file: text -> explanation (ok entries only; later lines win)."""

    def __init__(self, path: str | os.PathLike, model: str | None = None, prompt_version: str | None = None):
        self.path = Path(path)
        self._entries = {
            text: explanation
            for text, explanation in read_explanation_cache(
                self.path, model=model, prompt_version=prompt_version
            ).items()
            if clean_explanation(explanation) is not None
        }
        self._used: set[str] = set()

    def __str__(self) -> str:
        return str(self.path)

    def lookup(
        self, image_key: str, raw_text: str, text: str, name_shared_by: int = 1
    ) -> tuple[str | None, str | None]:
        for candidate in (raw_text, text):
            explanation = self._entries.get(candidate)
            if explanation is not None:
                self._used.add(candidate)
                return explanation, None
        return None, None

    def unused(self) -> list[str]:
        """The texts of the entries no row took, in file order."""
        return [text for text in self._entries if text not in self._used]


ExplanationSource = ReleasedExplanations | CachedExplanations


def _is_cache_file(path: Path) -> bool:
    if path.suffix.lower() in CACHE_SUFFIXES:
        return True
    # A cache under another name: its first line is one cache record. Only the start is read (released files are
    # hundreds of MB, often on one line).
    with path.open("rb") as handle:
        first_line = handle.readline(1 << 16)
    try:
        record = json.loads(first_line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):  # not a cache; a released file with bad bytes says so itself
        return False
    return isinstance(record, dict) and {"text", "ok"} <= record.keys()


class ExplanationSources:
    """The explanation files of each split, opened one split at a time (released files can be large)."""

    def __init__(self, per_split: dict[str, list[Path]], shared: list[Path], model, prompt_version):
        self.per_split = per_split
        self.shared = shared
        self.model = model
        self.prompt_version = prompt_version
        self._shared_sources: list[ExplanationSource] | None = None

    def share_all(self) -> None:
        """Apply every split's files to every split (a release split by another rule than the files')."""
        per_split_files = [path for paths in self.per_split.values() for path in paths]
        self.shared = list(dict.fromkeys(per_split_files + self.shared))
        self.per_split = {split: [] for split in self.per_split}
        self._shared_sources = None

    def describe(self) -> list[str]:
        files = [str(path) for paths in self.per_split.values() for path in paths] + [str(path) for path in self.shared]
        return list(dict.fromkeys(files))

    def _open(self, path: Path) -> ExplanationSource:
        if _is_cache_file(path):
            return CachedExplanations(path, self.model, self.prompt_version)
        return ReleasedExplanations(path)

    def split_sources(self, split: str) -> list[ExplanationSource]:
        """The files of `split` only (its released files), opened anew: done with once the split is joined."""
        return [self._open(path) for path in self.per_split.get(split, [])]

    def shared_sources(self) -> list[ExplanationSource]:
        """The files that apply to every split, opened once."""
        if self._shared_sources is None:
            self._shared_sources = [self._open(path) for path in self.shared]
        return self._shared_sources

    def for_split(self, split: str) -> list[ExplanationSource]:
        """Sources tried in order for the rows of `split`: its own released files first, then the shared files."""
        return self.split_sources(split) + self.shared_sources()


def resolve_explanations(
    fmt: EntityFormat,
    root: Path,
    splits: Sequence[str],
    explanations,
    model: str | None = None,
    prompt_version: str | None = None,
) -> ExplanationSources:
    """Turn the `explanations` argument of `load_entity_dataset` into files.

    - None: no files.
    - "auto": per split, the dataset's released file (e.g. `news/CapDsc_mistral_dev.json` for N24News validation)
      in its usual place or in `root/explanations/`; plus every cache file `root/explanations/*.jsonl`.
    - a path or a list of paths: a folder is searched like "auto" searches `root/explanations/`; a file is a
      released file (a JSON object) or a cache file (JSON lines) and applies to every split.
    """
    per_split: dict[str, list[Path]] = {split: [] for split in splits}
    shared: list[Path] = []

    def search_folder(folder: Path, subdirs: tuple[str, ...], caches: bool = True) -> None:
        for split in splits:
            found = fmt.released_explanation_file(folder, split, subdirs)
            if found is not None:
                per_split[split].append(found)
        if caches:
            shared.extend(sorted(path for path in folder.iterdir() if path.suffix.lower() in CACHE_SUFFIXES))

    if explanations is None:  # no explanation files are searched or joined
        return ExplanationSources(per_split, shared, model, prompt_version)
    if isinstance(explanations, str) and explanations == "auto":
        # Not the caches in root itself: the plain format's split files are .jsonl too.
        search_folder(root, fmt.explanation_dirs, caches=False)
        if (root / EXPLANATIONS_SUBDIR).is_dir():
            search_folder(root / EXPLANATIONS_SUBDIR, ("",))
    else:
        paths = [explanations] if isinstance(explanations, (str, os.PathLike)) else list(explanations)
        for path in map(Path, paths):
            path = path.expanduser()
            if path.is_dir():
                search_folder(path, ("",))
            elif path.is_file():
                shared.append(path)
            else:
                raise FileNotFoundError(f"explanation file or folder not found: {path}")
    return ExplanationSources(per_split, shared, model, prompt_version)


__all__ = [
    "CachedExplanations",
    "ExplanationSources",
    "ReleasedExplanations",
    "clean_explanation",
    "resolve_explanations",
]
