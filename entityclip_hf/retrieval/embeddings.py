"""Embedding files: a safetensors file of embeddings with their ids (large id lists in a sidecar), written atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)



#: Written into the safetensors metadata of embedding files, checked on load.
EMBEDDINGS_FORMAT = "entityclip-embeddings/1"
_EMBEDDINGS_KEY = "embeddings"
# safetensors caps its JSON header at 100 MB; ids beyond this size go to a sidecar file instead.
MAX_IDS_IN_HEADER_BYTES = 8 * 1024 * 1024
_RESERVED_METADATA = {"format", "ids", "ids_file", "ids_sha256", "num_rows", "dim"}



class StoredEmbeddings(NamedTuple):
    """The content of an embedding file."""

    embeddings: torch.Tensor
    """[N, D] float32."""
    ids: list | None
    """One id (str or int) per row, or None if the file has none."""
    metadata: dict[str, str]
    """The user metadata saved with the embeddings (e.g. the model and modality)."""


def save_embeddings(
    path: str | os.PathLike,
    embeddings,
    ids: Sequence[str | int] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write embeddings [N, D] and their ids to a safetensors file, atomically (a crash leaves the old file or none).

    Ids (unique strings or integers, one per row) are stored as JSON in the safetensors metadata, or in a sidecar
    file `<path>.ids.json` (checked by its SHA-256) when they are too many for a safetensors header. `metadata` is
    free-form string metadata kept with them (e.g. `{"model": ..., "modality": "image"}`). Returns the path.
    """
    path = Path(path)
    tensor = _as_matrix(embeddings, "embeddings").to(torch.float32).contiguous()
    if tensor.shape[0] == 0:
        raise ValueError("empty embeddings: nothing to save.")
    bad_rows = (~torch.isfinite(tensor).all(dim=1)).nonzero().flatten().tolist()
    if bad_rows:
        row = bad_rows[0]
        name = f" (id {ids[row]!r})" if ids is not None and row < len(ids) else ""
        raise ValueError(
            f"embeddings row {row}{name} is not finite ({len(bad_rows)} such rows): drop the items that could "
            "not be encoded before saving."
        )
    header = {"format": EMBEDDINGS_FORMAT, "num_rows": str(tensor.shape[0]), "dim": str(tensor.shape[1])}
    for key, value in (metadata or {}).items():
        if key in _RESERVED_METADATA:
            raise ValueError(f"metadata key {key!r} is reserved by the embeddings file format.")
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map strings to strings; {key!r} -> {type(value).__name__}.")
        header[key] = value
    sidecar = _sidecar_path(path)
    write_sidecar = None
    if ids is not None:
        ids_json = json.dumps(_check_ids(ids, tensor.shape[0]), ensure_ascii=False)
        if len(ids_json.encode("utf-8")) <= MAX_IDS_IN_HEADER_BYTES:
            header["ids"] = ids_json
        else:
            header["ids_file"] = sidecar.name
            header["ids_sha256"] = hashlib.sha256(ids_json.encode("utf-8")).hexdigest()
            write_sidecar = ids_json
    path.parent.mkdir(parents=True, exist_ok=True)
    # The sidecar goes first: once the main file is in place, everything it refers to exists.
    if write_sidecar is not None:
        _atomic_write(sidecar, lambda tmp: Path(tmp).write_text(write_sidecar, encoding="utf-8"))
    _atomic_write(path, lambda tmp: save_file({_EMBEDDINGS_KEY: tensor}, tmp, metadata=header))
    if write_sidecar is None and sidecar.exists():
        sidecar.unlink()  # left by an earlier, larger save to the same path
    return path


def load_embeddings(path: str | os.PathLike) -> StoredEmbeddings:
    """Read a file written by [`save_embeddings`]: `(embeddings [N, D] float32, ids or None, metadata)`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no embeddings file at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
            if _EMBEDDINGS_KEY not in handle.keys():
                raise ValueError(f"{path} holds no {_EMBEDDINGS_KEY!r} tensor (keys: {list(handle.keys())}).")
            embeddings = handle.get_tensor(_EMBEDDINGS_KEY)
    except (OSError, RuntimeError, SafetensorError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    file_format = header.get("format")
    if file_format is not None and file_format != EMBEDDINGS_FORMAT:
        raise ValueError(f"{path} has format {file_format!r}; this version reads {EMBEDDINGS_FORMAT!r}.")
    if embeddings.ndim != 2:
        raise ValueError(f"{path}: embeddings must be a matrix [N, D], got shape {tuple(embeddings.shape)}.")
    ids = None
    if "ids" in header:
        ids = json.loads(header["ids"])
    elif "ids_file" in header:
        sidecar = path.parent / header["ids_file"]
        if not sidecar.is_file():
            raise FileNotFoundError(f"{path} keeps its ids in {sidecar}, which is missing.")
        raw = sidecar.read_bytes()
        if hashlib.sha256(raw).hexdigest() != header.get("ids_sha256"):
            raise ValueError(
                f"{sidecar} does not belong to {path} (checksum mismatch): the two were not saved together."
            )
        ids = json.loads(raw.decode("utf-8"))
    if ids is not None and len(ids) != embeddings.shape[0]:
        raise ValueError(f"{path}: {len(ids)} ids for {embeddings.shape[0]} embeddings.")
    user_metadata = {key: value for key, value in header.items() if key not in _RESERVED_METADATA}
    return StoredEmbeddings(embeddings.float(), ids, user_metadata)


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".ids.json")


def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_ids(ids: Sequence[str | int], num_rows: int) -> list[str | int]:
    ids = list(ids)
    if len(ids) != num_rows:
        raise ValueError(f"{len(ids)} ids for {num_rows} embeddings: give exactly one id per row.")
    seen: dict[str | int, int] = {}
    for row, item_id in enumerate(ids):
        if isinstance(item_id, np.integer):
            item_id = ids[row] = int(item_id)
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
            raise ValueError(f"id of row {row} must be a string or an integer, got {type(item_id).__name__}.")
        if item_id in seen:
            raise ValueError(f"duplicate id {item_id!r} at rows {seen[item_id]} and {row}: ids must be unique.")
        seen[item_id] = row
    return ids


def _as_matrix(values, name: str, allow_vector: bool = False) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    elif not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{name} must be a matrix [N, D] (tensor or array): {error}") from error
    if allow_vector and values.ndim == 1:
        values = values.unsqueeze(0)
    if values.ndim != 2:
        raise ValueError(f"{name} must be a matrix [N, D], got shape {tuple(values.shape)}.")
    if not values.is_floating_point():
        values = values.float()
    return values.detach().cpu()


