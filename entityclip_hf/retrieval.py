"""Retrieval with EntityCLIP: encode galleries to embedding files, search them, rerank the top hits with GI-ITM.

EntityCLIP retrieves with its fine-tuned CLIP embeddings (the experts only shape training), so a gallery is encoded
once, stored as a safetensors file with its ids, and searched with a matrix product per query block. The GI-ITM head
(`EntityCLIPModel.match_probability`) can then rerank a query's top-k candidates.

    from entityclip_hf.retrieval import EmbeddingIndex, encode_images, encode_texts, rerank_with_itm, save_embeddings

    gallery = encode_images(model, processor, dataset["image"] or a list of images/paths, batch_size=64)
    save_embeddings("gallery.safetensors", gallery, ids=dataset["id"])
    index = EmbeddingIndex.from_file("gallery.safetensors")
    hits = index.search(encode_texts(model, processor, ["Angela Merkel in Aachen"]), k=20)

Works with plain `CLIPModel` checkpoints too (for baselines); reranking needs EntityCLIP's ITM head. From the
command line: `entityclip-search {encode,search} --help` (or `python -m entityclip_hf.retrieval`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .ann_index import APPROXIMATE_INDEX_TYPES, INDEX_TYPES, AnnOptions, ApproximateIndex

__all__ = [
    "EMBEDDINGS_FORMAT",
    "EmbeddingIndex",
    "RankedCandidate",
    "SearchResults",
    "StoredEmbeddings",
    "add_embeddings_column",
    "encode_explanations",
    "encode_images",
    "encode_texts",
    "faiss_available",
    "fuse_explanation_embeddings",
    "load_embeddings",
    "match_probabilities",
    "rerank_texts_with_itm",
    "rerank_with_itm",
    "save_embeddings",
]

logger = logging.getLogger(__name__)

#: Written into the safetensors metadata of embedding files, checked on load.
EMBEDDINGS_FORMAT = "entityclip-embeddings/1"
_EMBEDDINGS_KEY = "embeddings"
# safetensors caps its JSON header at 100 MB; ids beyond this size go to a sidecar file instead.
MAX_IDS_IN_HEADER_BYTES = 8 * 1024 * 1024
_RESERVED_METADATA = {"format", "ids", "ids_file", "ids_sha256", "num_rows", "dim"}


# =============================================================================================== encoding
def encode_images(
    model,
    processor,
    images,
    batch_size: int = 64,
    *,
    image_column: str = "image",
    id_column: str | None = "id",
    num_workers: int = 0,
    progress: bool = True,
    skip_errors: bool = False,
    mixed_precision: bool | None = None,
) -> torch.Tensor:
    """Encode images into L2-normalised float32 CLIP embeddings [N, D] (on CPU), batch by batch, without gradients.

    Args:
        model: An `EntityCLIPModel` (or a `CLIPModel`), on the device to encode on.
        processor: Its processor (`EntityCLIPProcessor` reads PIL images, numpy arrays and file paths).
        images: A list of images, or a `datasets.Dataset` with an `image_column` (images decode lazily, in
            `num_workers` DataLoader workers when > 0).
        batch_size: Images per forward pass.
        id_column: Column of a Dataset that names items in error messages.
        num_workers: DataLoader worker processes that decode and preprocess images.
        progress: Show a progress bar.
        skip_errors: Leave a row of NaN for an image that cannot be read or processed (logged with its index and
            id) instead of raising; a long job then keeps going. Find them with `~torch.isfinite(out).all(1)`.
        mixed_precision: bf16 autocast; `None` = on CUDA devices that support it, never on CPU.

    Raises:
        ValueError: for an empty gallery or, without `skip_errors`, an unreadable image (named by index and id).
    """
    return _encode(
        model, processor, images, "image", image_column, id_column, batch_size, num_workers, progress, skip_errors,
        mixed_precision,
    )  # fmt: skip


def encode_texts(
    model,
    processor,
    texts,
    batch_size: int = 256,
    *,
    text_column: str = "text",
    id_column: str | None = "id",
    num_workers: int = 0,
    progress: bool = True,
    skip_errors: bool = False,
    mixed_precision: bool | None = None,
    explanations: Sequence[str | None] | str | None = None,
    explanation_weight: float = 0.5,
) -> torch.Tensor:
    """Encode texts into L2-normalised float32 CLIP embeddings [N, D] (on CPU); see [`encode_images`].

    `texts` is a list of strings or a `datasets.Dataset` with a `text_column`. Texts longer than the processor's
    maximum length (77 tokens for CLIP) are truncated, as in training.

    Explanation-aware retrieval (opt-in; the paper retrieves with the text alone): with `explanations` (one string or
    None per text, or the name of a Dataset column holding them), each text's embedding is fused with its
    explanation's embedding (the same CLIP text encoder), see [`fuse_explanation_embeddings`]; a text without an
    explanation keeps its plain embedding. Use the result as queries (text -> image) or as the text gallery
    (image -> text): both directions then use the explanations.
    """
    embeddings = _encode(
        model, processor, texts, "text", text_column, id_column, batch_size, num_workers, progress, skip_errors,
        mixed_precision,
    )  # fmt: skip
    if explanations is None:
        return embeddings
    if isinstance(explanations, str):
        if not _is_hf_dataset(texts) or explanations not in texts.column_names:
            raise ValueError(f"explanations={explanations!r} names no column of the texts' dataset.")
        explanations = texts[explanations]
    explanations = list(explanations)
    if len(explanations) != embeddings.shape[0]:
        raise ValueError(f"{len(explanations)} explanations for {embeddings.shape[0]} texts: give one (or None) each.")
    explanation_embeddings = encode_explanations(
        model, processor, explanations, batch_size=batch_size, progress=progress, mixed_precision=mixed_precision
    )
    return fuse_explanation_embeddings(embeddings, explanation_embeddings, explanation_weight)


def encode_explanations(
    model, processor, explanations: Sequence[str | None], batch_size: int = 256, progress: bool = False,
    mixed_precision: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """CLIP text embeddings [N, D] of explanations (EntityCLIP's encoder of explanations); NaN rows where None/blank."""
    explanations = list(explanations)
    present = [i for i, e in enumerate(explanations) if isinstance(e, str) and e.strip()]
    if not present:
        raise ValueError("no explanation to encode: every entry is None or blank.")
    encoded = _encode(
        model, processor, [explanations[i] for i in present], "text", "text", None, batch_size, 0, progress, False,
        mixed_precision,
    )  # fmt: skip
    output = torch.full((len(explanations), encoded.shape[1]), float("nan"), dtype=torch.float32)
    output[torch.as_tensor(present)] = encoded
    return output


def fuse_explanation_embeddings(text_embeds, explanation_embeds, weight: float) -> torch.Tensor:
    """Explanation-aware text embeddings: `normalize((1 - weight) * t + weight * e)` with `t`, `e` L2-normalised.

    `weight` 0 is the plain text (the paper's retrieval), 1 the explanation alone. A row of `explanation_embeds`
    that is not finite (NaN: the text has no explanation) keeps the normalised text embedding. Returns float32 [N, D].
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise ValueError(f"explanation weight must be a number in [0, 1], got {weight!r}.")
    text = F.normalize(_as_matrix(text_embeds, "text_embeds").float(), dim=-1)
    explanation = _as_matrix(explanation_embeds, "explanation_embeds").float()
    if explanation.shape != text.shape:
        raise ValueError(f"explanation_embeds {tuple(explanation.shape)} must match text_embeds {tuple(text.shape)}.")
    has_explanation = torch.isfinite(explanation).all(dim=1, keepdim=True)
    explanation = F.normalize(torch.where(has_explanation, explanation, text), dim=-1)
    fused = F.normalize((1 - weight) * text + weight * explanation, dim=-1)
    return torch.where(has_explanation, fused, text)


class _IndexedItems(torch.utils.data.Dataset):
    """Items of a gallery with their index; reading an item never raises (the error is returned instead)."""

    def __init__(self, items, column: str):
        self.items = items
        self.column = column
        self.is_dataset = _is_hf_dataset(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            item = self.items[index][self.column] if self.is_dataset else self.items[index]
            item = _undecoded_image(item)
        except Exception as error:  # noqa: BLE001 - a bad file must not end a long job; it is reported by index
            return index, None, f"{type(error).__name__}: {error}"
        return index, item, None


def _undecoded_image(item):
    """A `datasets.Image(decode=False)` value ({"path", "bytes"}) as something the processor reads; others as is."""
    if not (isinstance(item, dict) and ("path" in item or "bytes" in item)):
        return item
    if item.get("bytes"):
        from PIL import Image

        with Image.open(io.BytesIO(item["bytes"])) as image:
            image.load()
            return image.copy()
    if item.get("path"):
        return item["path"]
    raise ValueError("image entry has neither bytes nor a path")


class _BatchPreparer:
    """DataLoader collate function: turns a list of items into model inputs, isolating the items that fail."""

    def __init__(self, processor, modality: str):
        self.processor = processor
        self.modality = modality

    def process(self, items: list) -> dict[str, torch.Tensor]:
        if self.modality == "image":
            inputs = self.processor(images=items, return_tensors="pt")
            return {"pixel_values": inputs["pixel_values"]}
        inputs = self.processor(text=items, padding="longest", truncation=True, return_tensors="pt")
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}

    def __call__(self, samples):
        failures = [(index, error) for index, _, error in samples if error is not None]
        good = [(index, item) for index, item, error in samples if error is None]
        if self.modality == "text":
            for index, item in good:
                if not isinstance(item, str):
                    failures.append((index, f"expected a string, got {type(item).__name__}"))
            good = [(index, item) for index, item in good if isinstance(item, str)]
        inputs = None
        if good:
            try:
                inputs = self.process([item for _, item in good])
            except Exception:  # noqa: BLE001 - find the culprit(s) one by one, then process the rest together
                survivors = []
                for index, item in good:
                    try:
                        self.process([item])
                    except Exception as error:  # noqa: BLE001
                        failures.append((index, _strip_batch_position(str(error)) or type(error).__name__))
                    else:
                        survivors.append((index, item))
                good = survivors
                inputs = self.process([item for _, item in good]) if good else None
        return [index for index, _ in good], inputs, sorted(failures)


def _strip_batch_position(message: str) -> str:
    # The processor names items by their position in ITS batch ("image 0: ..."); the caller names the gallery index.
    return re.sub(r"^(image|text|explanations?) \d+: ", "", message)


def _encode(
    model, processor, items, modality, column, id_column, batch_size, num_workers, progress, skip_errors,
    mixed_precision,
) -> torch.Tensor:  # fmt: skip
    _check_positive_int("batch_size", batch_size)
    if items is None or isinstance(items, (str, bytes)):
        raise ValueError(f"expected a list of {modality}s or a datasets.Dataset, got {type(items).__name__}.")
    source = items
    if _is_hf_dataset(items):
        if column not in items.column_names:
            raise ValueError(f"the dataset has no {column!r} column (columns: {items.column_names}).")
        # Only the needed column: encoding texts must not decode every image of the dataset.
        source = items.select_columns([column])
        if modality == "text":
            source = source[column]  # one columnar read instead of a row lookup per text
    elif not isinstance(items, Sequence):
        items = source = list(items)
    if len(source) == 0:
        raise ValueError(f"empty gallery: no {modality}s to encode.")

    loader = torch.utils.data.DataLoader(
        _IndexedItems(source, column),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_BatchPreparer(processor, modality),
    )
    device = _model_device(model)
    embed = _image_features if modality == "image" else _text_features
    output: torch.Tensor | None = None
    failed: list[tuple[int, str]] = []
    was_training = model.training
    model.eval()
    try:
        bar = _progress_bar(len(loader), f"encoding {modality}s", progress)
        with torch.inference_mode(), _autocast(device, mixed_precision):
            for indices, inputs, failures in loader:
                for index, message in failures:
                    label = _item_label(items, index, id_column)
                    if not skip_errors:
                        raise ValueError(f"{modality} {label}: {message}")
                    logger.warning("skipping %s %s: %s", modality, label, message)
                    failed.append((index, message))
                if indices:
                    inputs = {name: tensor.to(device, non_blocking=True) for name, tensor in inputs.items()}
                    features = F.normalize(embed(model, inputs).float(), dim=-1).cpu()
                    if output is None:
                        output = torch.full((len(source), features.shape[1]), float("nan"), dtype=torch.float32)
                    output[torch.as_tensor(indices)] = features
                bar.update(1)
        bar.close()
    finally:
        model.train(was_training)
    if output is None:
        raise ValueError(f"none of the {len(source)} {modality}s could be encoded (first failure: {failed[0][1]}).")
    if failed:
        logger.warning("%d of %d %ss could not be encoded: their rows are NaN.", len(failed), len(source), modality)
    return output


def _image_features(model, inputs) -> torch.Tensor:
    return _pooled(model.get_image_features(pixel_values=inputs["pixel_values"]))


def _text_features(model, inputs) -> torch.Tensor:
    return _pooled(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))


def _pooled(features) -> torch.Tensor:
    # transformers v5 (CLIPModel and EntityCLIPModel) returns an output whose pooler_output is the embedding; a plain
    # tensor is accepted for models written against the v4 contract.
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _autocast(device: torch.device, mixed_precision: bool | None):
    if mixed_precision is None:
        mixed_precision = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if not mixed_precision:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="batch", disable=not enabled)


def _is_hf_dataset(items) -> bool:
    return hasattr(items, "column_names") and hasattr(items, "select_columns")


def _item_label(items, index: int, id_column: str | None) -> str:
    if id_column and _is_hf_dataset(items) and id_column in items.column_names:
        return f"{index} (id {items.select_columns([id_column])[index][id_column]!r})"
    if isinstance(items, (str, os.PathLike)) or not isinstance(items, Sequence):
        return str(index)
    item = items[index]
    if isinstance(item, (str, os.PathLike)):
        return f"{index} ({os.fspath(item)!r})"
    return str(index)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


# =============================================================================================== embedding files
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


# =============================================================================================== search
def faiss_available() -> bool:
    """Whether `faiss` can be imported (the optional `faiss-cpu` / `faiss-gpu` package)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class SearchResults:
    """The `k` best gallery items of each query, best first."""

    scores: torch.Tensor
    """[Q, k] cosine similarity (dot product without normalisation)."""
    indices: torch.Tensor
    """[Q, k] row of each hit in the gallery."""
    ids: list[list] | None
    """`ids[q][j]`: the id of hit j of query q, if the index has ids."""


class EmbeddingIndex:
    """Nearest-neighbour search over a gallery of embeddings: exact chunked matmul, or FAISS when installed.

    Args:
        embeddings: [N, D] gallery embeddings (tensor or array), e.g. from [`encode_images`].
        ids: One unique id per row (str or int), returned with the hits.
        normalize: Rank by cosine similarity (L2-normalise gallery and queries), as CLIP retrieval does.
        backend: `"exact"` (torch), `"faiss"` (an exact inner-product FAISS index through
            `datasets.Dataset.add_faiss_index_from_external_arrays`), or `"auto"` (FAISS if importable).
        device: Where the exact search runs (default CPU); the gallery is moved there once.
        chunk_size: Gallery rows scored per block: memory is `query_block * chunk_size * 4` bytes, whatever N.
        index_type: `"flat"` (exact, as `backend` says) or an approximate FAISS index: `"ivf-flat"`, `"ivf-pq"`,
            `"hnsw"` (see `entityclip_hf.ann_index`; needs faiss).
        **ann_options: Options of the approximate index, [`~ann_index.AnnOptions`]: `nlist`, `nprobe`, `pq_m`,
            `refine_factor`, `hnsw_m`, `ef_construction`, `ef_search`, `train_size`, `target_recall`, `seed`. The
            search knob (`nprobe` / `ef_search`) left out is tuned at build time to reach `target_recall` (0.95).
    """

    def __init__(
        self,
        embeddings,
        ids: Sequence[str | int] | None = None,
        *,
        normalize: bool = True,
        backend: str = "auto",
        device: str | torch.device | None = None,
        chunk_size: int = 16384,
        index_type: str = "flat",
        _saved_ann: str | os.PathLike | None = None,
        **ann_options,
    ):
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index_type {index_type!r}: choose one of {', '.join(INDEX_TYPES)}.")
        if index_type == "flat" and ann_options:
            raise ValueError(f"{sorted(ann_options)} apply to approximate indexes; index_type is 'flat' (exact).")
        if index_type != "flat" and backend == "exact":
            raise ValueError(f"index_type={index_type!r} is a FAISS index; backend='exact' excludes it.")
        if backend not in ("auto", "exact", "faiss"):
            raise ValueError(f"backend must be 'auto', 'exact' or 'faiss', got {backend!r}.")
        _check_positive_int("chunk_size", chunk_size)
        gallery = _as_matrix(embeddings, "embeddings").float()
        if gallery.shape[0] == 0:
            raise ValueError("empty gallery: an index needs at least one embedding.")
        ids = _check_ids(ids, gallery.shape[0]) if ids is not None else None
        bad_rows = (~torch.isfinite(gallery).all(dim=1)).nonzero().flatten().tolist()
        if bad_rows:
            name = f" (id {ids[bad_rows[0]]!r})" if ids is not None else ""
            raise ValueError(
                f"gallery row {bad_rows[0]}{name} is not finite ({len(bad_rows)} such rows; encode_* leaves NaN rows "
                "for items it could not read): drop them first."
            )
        if normalize:
            gallery = F.normalize(gallery, dim=-1)
        if backend == "auto":
            backend = "faiss" if faiss_available() else "exact"
        elif backend == "faiss" and not faiss_available():
            raise ImportError("backend='faiss' needs the faiss package: pip install 'entityclip-hf[faiss]'.")
        self.backend = backend
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.ids = ids
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.embeddings = gallery.to(self.device)
        self.index_type = index_type
        self.ann: ApproximateIndex | None = None
        if index_type in APPROXIMATE_INDEX_TYPES:
            self.backend = "faiss"
            self.ann = self._approximate_index(index_type, ann_options, _saved_ann)
        self._faiss_dataset = self._build_faiss() if self.backend == "faiss" and self.ann is None else None

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> EmbeddingIndex:
        """An index over an embedding file written by [`save_embeddings`] (its ids included).

        With an approximate `index_type`, the index saved beside the file (`<file>.<type>.faiss`, by [`save`])
        is loaded when its build options agree with the ones given (the search knob may differ); otherwise one is
        built (and kept in memory: `save` writes it).
        """
        stored = load_embeddings(path)
        if kwargs.get("index_type", "flat") in APPROXIMATE_INDEX_TYPES:
            saved = ApproximateIndex.path_for(path, kwargs["index_type"])
            kwargs["_saved_ann"] = saved if saved.is_file() else None
        index = cls(stored.embeddings, stored.ids, **kwargs)
        index.metadata = stored.metadata
        return index

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
        """Write the gallery (as indexed: normalised if `normalize`) and its ids with [`save_embeddings`].

        An approximate index is saved beside it (`<file>.<type>.faiss` and its `.json` sidecar).
        """
        written = save_embeddings(path, self.embeddings.cpu(), self.ids, metadata)
        if self.ann is not None:
            self.ann.save(ApproximateIndex.path_for(written, self.index_type))
        return written

    def _approximate_index(self, index_type: str, ann_options: dict, saved: str | os.PathLike | None):
        known = set(AnnOptions.__dataclass_fields__) - {"index_type", "tuned"}
        unknown = sorted(set(ann_options) - known)
        if unknown:
            raise ValueError(f"unknown approximate-index option(s) {unknown}; known: {', '.join(sorted(known))}.")
        vectors = self.embeddings.cpu().numpy()
        if saved is not None:
            loaded = ApproximateIndex.load(saved, vectors)
            search_knobs = {"nprobe", "ef_search", "threads"}
            differing = {
                name: value for name, value in ann_options.items()
                if name not in search_knobs and value is not None and getattr(loaded.options, name) != value
            }  # fmt: skip
            if not differing:
                loaded.set_search_options(ann_options.get("nprobe"), ann_options.get("ef_search"))
                return loaded
            logger.info("%s was built with other options (%s differ): building a new index", saved, sorted(differing))
        return ApproximateIndex.build(vectors, AnnOptions(index_type=index_type, **ann_options))

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def search(self, queries, k: int = 10) -> SearchResults:
        """Return the `k` gallery items most similar to each query ([D] or [Q, D] embeddings), best first."""
        query_matrix = _as_matrix(queries, "queries", allow_vector=True).float()
        if query_matrix.shape[0] == 0:
            raise ValueError("no queries: queries must have at least one row.")
        if query_matrix.shape[1] != self.dim:
            raise ValueError(
                f"queries have dimension {query_matrix.shape[1]} but the gallery's embeddings have {self.dim}: "
                "encode queries and gallery with the same model."
            )
        bad = (~torch.isfinite(query_matrix).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"query {bad[0]} is not finite.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        if k > len(self):
            raise ValueError(f"k={k} exceeds the gallery size ({len(self)} items).")
        if self.normalize:
            query_matrix = F.normalize(query_matrix, dim=-1)
        if self.ann is not None:
            found_scores, found_rows = self.ann.search(query_matrix.cpu().numpy(), k)
            scores, indices = torch.from_numpy(found_scores.copy()), torch.from_numpy(found_rows.astype(np.int64))
            if (indices < 0).any():  # an approximate index can find fewer than k (too few lists probed)
                raise ValueError(
                    f"the {self.index_type} index found fewer than k={k} items for some queries: raise nprobe / "
                    "ef_search, or lower k."
                )
        elif self._faiss_dataset is not None:
            scores, indices = self._search_faiss(query_matrix, k)
        else:
            scores, indices = self._search_exact(query_matrix, k)
        ids = [[self.ids[i] for i in row] for row in indices.tolist()] if self.ids is not None else None
        return SearchResults(scores=scores, indices=indices, ids=ids)

    def _search_exact(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Blocks of queries x blocks of the gallery, keeping a running top-k: the Q x N matrix is never built.
        query_block = max(1, (1 << 24) // self.chunk_size)
        all_scores, all_indices = [], []
        for q_start in range(0, queries.shape[0], query_block):
            block = queries[q_start : q_start + query_block].to(self.device)
            best_scores = torch.full((block.shape[0], 0), -math.inf, device=self.device)
            best_indices = torch.zeros((block.shape[0], 0), dtype=torch.long, device=self.device)
            for g_start in range(0, len(self), self.chunk_size):
                chunk = self.embeddings[g_start : g_start + self.chunk_size]
                scores = block @ chunk.T
                top = scores.topk(min(k, chunk.shape[0]), dim=1)
                merged_scores = torch.cat([best_scores, top.values], dim=1)
                merged_indices = torch.cat([best_indices, top.indices + g_start], dim=1)
                keep = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
                best_scores = keep.values
                best_indices = merged_indices.gather(1, keep.indices)
            all_scores.append(best_scores.cpu())
            all_indices.append(best_indices.cpu())
        return torch.cat(all_scores), torch.cat(all_indices)

    def _build_faiss(self):
        import faiss
        from datasets import Dataset

        dataset = Dataset.from_dict({"row": list(range(len(self)))})
        dataset.add_faiss_index_from_external_arrays(
            external_arrays=self.embeddings.cpu().numpy().astype(np.float32),
            index_name=_EMBEDDINGS_KEY,
            metric_type=faiss.METRIC_INNER_PRODUCT,
        )
        return dataset

    def _search_faiss(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        result = self._faiss_dataset.search_batch(_EMBEDDINGS_KEY, queries.cpu().numpy().astype(np.float32), k=k)
        scores = torch.from_numpy(np.stack(result.total_scores).astype(np.float32))
        indices = torch.from_numpy(np.stack(result.total_indices).astype(np.int64))
        return scores, indices


def add_embeddings_column(dataset, embeddings, column: str = "embeddings", faiss_index: bool | None = None):
    """The `datasets` way to keep a gallery: `dataset` with its L2-normalised embeddings as a column, indexed with FAISS.

    With the FAISS index (`faiss_index=None`: when faiss is installed), `dataset.get_nearest_examples(column, query,
    k)` returns the rows of the best cosine scores and `dataset.save_faiss_index(column, path)` stores the index
    beside the dataset (`dataset.save_to_disk`). The index is exact (inner product over normalised vectors), so it
    ranks like `EmbeddingIndex`.

    Args:
        dataset: A `datasets.Dataset` with one row per embedding (e.g. the split that `encode_images` encoded).
        embeddings: [N, D] embeddings in row order (from `encode_images` / `encode_texts` or `load_embeddings`).
        column: Name of the new column, and of its FAISS index.
        faiss_index: Build the FAISS index (True needs faiss; None: when importable; False: the column only).
    """
    matrix = F.normalize(_as_matrix(embeddings, "embeddings").float(), dim=-1)
    if matrix.shape[0] != len(dataset):
        raise ValueError(f"embeddings has {matrix.shape[0]} rows but the dataset has {len(dataset)}.")
    if column in dataset.column_names:
        raise ValueError(f"the dataset already has a column {column!r}; choose another `column`.")
    if faiss_index is None:
        faiss_index = faiss_available()
    elif faiss_index and not faiss_available():
        raise ImportError("faiss_index=True needs the faiss package: pip install 'entityclip-hf[faiss]'.")
    dataset = dataset.add_column(column, list(matrix.numpy()))
    if faiss_index:
        import faiss

        dataset.add_faiss_index(column=column, metric_type=faiss.METRIC_INNER_PRODUCT)
    return dataset


# =============================================================================================== reranking
class RankedCandidate(NamedTuple):
    """One reranked candidate."""

    index: int
    """Position of the candidate in the list given to the reranker."""
    id: Any
    """Its id, if `candidate_ids` were given."""
    match_probability: float
    """GI-ITM probability that the query and the candidate match."""


def match_probabilities(
    model,
    processor,
    images: Sequence,
    texts: Sequence[str],
    explanations: Sequence[str | None] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    mixed_precision: bool | None = None,
) -> torch.Tensor:
    """GI-ITM match probability [N] (float32, CPU) of each pair (images[i], texts[i], explanations[i]), in batches.

    Needs an `EntityCLIPModel` (its `match_probability`). An explanation of `None` means "none for this pair".
    """
    if not hasattr(model, "match_probability"):
        raise TypeError(f"{type(model).__name__} has no GI-ITM head (match_probability): rerank with EntityCLIP.")
    _check_positive_int("batch_size", batch_size)
    images, texts = list(images), list(texts)
    if not images:
        raise ValueError("no candidate pairs to score.")
    if len(images) != len(texts) or (explanations is not None and len(explanations) != len(images)):
        counts = f"{len(images)} images, {len(texts)} texts" + (
            f", {len(explanations)} explanations" if explanations is not None else ""
        )
        raise ValueError(f"one image, one text (and one explanation) per pair: got {counts}.")
    use_explanations = explanations is not None and any(e is not None and e.strip() for e in explanations)
    device = _model_device(model)
    probabilities = []
    was_training = model.training
    model.eval()
    try:
        bar = _progress_bar(math.ceil(len(images) / batch_size), "GI-ITM scoring", progress)
        with torch.inference_mode(), _autocast(device, mixed_precision):
            for start in range(0, len(images), batch_size):
                stop = start + batch_size
                try:
                    inputs = processor(
                        images=images[start:stop],
                        text=texts[start:stop],
                        explanations=list(explanations[start:stop]) if use_explanations else None,
                        return_tensors="pt",
                    )
                except ValueError as error:
                    raise ValueError(f"pairs {start}..{min(stop, len(images)) - 1}: {error}") from error
                inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
                probabilities.append(model.match_probability(**inputs).float().cpu())
                bar.update(1)
        bar.close()
    finally:
        model.train(was_training)
    return torch.cat(probabilities)


def rerank_with_itm(
    model,
    processor,
    query_text: str,
    candidate_images: Sequence,
    explanation: str | None = None,
    candidate_ids: Sequence | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[RankedCandidate]:
    """Reorder a text query's candidate images (e.g. its top-k from [`EmbeddingIndex.search`]) by GI-ITM.

    Args:
        query_text: The query.
        candidate_images: PIL images, arrays or paths, in first-stage order.
        explanation: An LLM explanation of the query's entities, if available (as in training).
        candidate_ids: Ids to carry along (same length as `candidate_images`).

    Returns:
        All candidates, highest match probability first (ties keep the first-stage order).
    """
    if not isinstance(query_text, str) or not query_text.strip():
        raise ValueError(f"query_text must be a non-empty string, got {query_text!r}.")
    candidates = list(candidate_images)
    _check_candidates(candidates, candidate_ids)
    probabilities = match_probabilities(
        model,
        processor,
        candidates,
        [query_text] * len(candidates),
        [explanation] * len(candidates) if explanation is not None else None,
        batch_size=batch_size,
        progress=progress,
    )
    return _ranked(probabilities, candidate_ids)


def rerank_texts_with_itm(
    model,
    processor,
    query_image,
    candidate_texts: Sequence[str],
    candidate_explanations: Sequence[str | None] | None = None,
    candidate_ids: Sequence | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[RankedCandidate]:
    """Reorder an image query's candidate texts by GI-ITM (each text with its own explanation, if given)."""
    candidates = list(candidate_texts)
    _check_candidates(candidates, candidate_ids)
    probabilities = match_probabilities(
        model,
        processor,
        [query_image] * len(candidates),
        candidates,
        candidate_explanations,
        batch_size=batch_size,
        progress=progress,
    )
    return _ranked(probabilities, candidate_ids)


def _check_candidates(candidates: list, candidate_ids: Sequence | None) -> None:
    if not candidates:
        raise ValueError("no candidates to rerank.")
    if candidate_ids is not None and len(candidate_ids) != len(candidates):
        raise ValueError(f"{len(candidate_ids)} candidate_ids for {len(candidates)} candidates.")


def _ranked(probabilities: torch.Tensor, candidate_ids: Sequence | None) -> list[RankedCandidate]:
    values = probabilities.tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return [RankedCandidate(i, candidate_ids[i] if candidate_ids is not None else None, values[i]) for i in order]


# =============================================================================================== command line
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_DATASET_SOURCES = ("n24news", "visualnews", "goodnews", "jsonl", "demo")


@dataclass
class _Gallery:
    """What a command searches: embeddings with ids, plus the items themselves when known (for printing/reranking)."""

    embeddings: torch.Tensor
    ids: list
    modality: str
    images: list | None = None  # per row: something the processor reads (for reranking)
    texts: list | None = None  # per row: the item's text (a dataset's caption), for printing
    explanations: list | None = None  # per row of a text gallery: its explanation (or None), for reranking


def _gallery_items(source: str, root: str | None, split: str, max_samples: int | None, explanations=None):
    """(ids, images, texts) of a dataset split or of the image files under a folder."""
    if source in _DATASET_SOURCES:
        from .evaluation import load_split

        data, _ = load_split(source, root, split, max_samples, explanations=explanations)
        ids = data["id"] if "id" in data.column_names else list(range(len(data)))
        return ids, data, data["text"]
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(f"--images-from {source!r} is neither a dataset ({', '.join(_DATASET_SOURCES)}) nor a folder.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if max_samples is not None:
        files = files[:max_samples]
    if not files:
        raise ValueError(f"no image files ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {folder}.")
    return [str(p.relative_to(folder)) for p in files], [str(p) for p in files], None


def _encode_gallery(model, processor, args, modality: str) -> _Gallery:
    fuse = modality == "text" and args.explanation_weight > 0
    ids, data, texts = _gallery_items(
        args.images_from, args.root, args.split, args.max_samples, explanations="auto" if fuse else None
    )
    options = {"batch_size": args.batch_size, "num_workers": args.num_workers, "skip_errors": True}
    options["progress"] = not args.no_progress
    if modality == "image":
        embeddings = encode_images(model, processor, data, **options)
    else:
        if texts is None:
            raise ValueError("a text gallery needs a dataset with texts, not a folder of images.")
        if fuse:  # explanation-aware text gallery: each text fused with its own explanation
            options.update(explanations="explanation", explanation_weight=args.explanation_weight)
        embeddings = encode_texts(model, processor, data, **options)
    keep = torch.isfinite(embeddings).all(dim=1)
    if not bool(keep.all()):
        dropped = [ids[i] for i in (~keep).nonzero().flatten().tolist()]
        print(f"left out {len(dropped)} {modality}(s) that could not be encoded: {dropped[:10]}", file=sys.stderr)
    rows = keep.nonzero().flatten().tolist()
    is_dataset = _is_hf_dataset(data)
    images = None
    if modality == "image":
        images = _RowView(data, rows, "image") if is_dataset else [data[i] for i in rows]
    return _Gallery(
        embeddings[keep],
        [ids[i] for i in rows],
        modality,
        images=images,
        texts=[texts[i] for i in rows] if texts is not None else None,
        explanations=[data["explanation"][i] for i in rows] if fuse else None,
    )


class _RowView:
    """Lazy `column` of selected dataset rows: an image is decoded only when reranking asks for it."""

    def __init__(self, dataset, rows: list[int], column: str):
        self.dataset, self.rows, self.column = dataset.select_columns([column]), rows, column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.dataset[self.rows[index]][self.column]


def _load_gallery_file(path: str) -> _Gallery:
    stored = load_embeddings(path)
    modality = stored.metadata.get("modality", "image")
    ids = stored.ids if stored.ids is not None else list(range(stored.embeddings.shape[0]))
    return _Gallery(stored.embeddings, ids, modality)


def _command_encode(args) -> dict:
    from .evaluation import load_model_and_processor

    model, processor = load_model_and_processor(args.model, _cli_device(args.device), args.trust_remote_code)
    gallery = _encode_gallery(model, processor, args, args.modality)
    metadata = {"model": str(args.model), "modality": args.modality, "source": str(args.images_from)}
    if args.images_from in _DATASET_SOURCES:
        metadata["split"] = args.split
    path = save_embeddings(args.output, gallery.embeddings, gallery.ids, metadata)
    print(f"wrote {len(gallery.ids)} {args.modality} embeddings of dimension {gallery.embeddings.shape[1]} to {path}")
    written = {"path": str(path), "num_rows": len(gallery.ids)}
    if args.index_type != "flat":
        index = EmbeddingIndex.from_file(path, index_type=args.index_type, **_ann_options(args))
        ann_path = index.ann.save(ApproximateIndex.path_for(path, args.index_type))
        print(f"wrote the {args.index_type} index to {ann_path} ({_describe_ann(index.ann)})")
        written["index"] = str(ann_path)
    return written


def _ann_options(args) -> dict:
    names = ("nlist", "nprobe", "pq_m", "hnsw_m", "ef_search", "train_size")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _describe_ann(ann: ApproximateIndex) -> str:
    options = ann.options
    knob = (
        f"ef_search={options.ef_search}"
        if options.index_type == "hnsw"
        else f"nlist={options.nlist}, nprobe={options.nprobe}"
    )
    recall = {key: value for key, value in options.tuned.items() if key.startswith("sample_recall")}
    tuned = (
        f", tuned: recall@10 {next(iter(recall.values()))} on {options.tuned['sample_queries']} sample queries"
        if recall
        else ""
    )
    return f"{knob}{tuned}, built in {ann.build_seconds:.1f} s"


def _command_search(args) -> list[dict]:
    from .evaluation import load_model_and_processor

    if not args.query and not args.query_image:
        raise ValueError("give at least one --query TEXT or --query-image PATH.")
    if args.query and args.query_image:
        raise ValueError("give either text queries (--query) or image queries (--query-image), not both.")
    query_modality = "text" if args.query else "image"
    gallery_modality = "image" if query_modality == "text" else "text"
    model, processor = load_model_and_processor(args.model, _cli_device(args.device), args.trust_remote_code)
    if args.index:
        gallery = _load_gallery_file(args.index)
        if gallery.modality != gallery_modality:
            raise ValueError(
                f"{args.index} holds {gallery.modality} embeddings; {query_modality} queries search images."
            )
    elif args.images_from:
        gallery = _encode_gallery(model, processor, args, gallery_modality)
    else:
        raise ValueError("give the gallery: --images-from (a dataset or a folder of images) or --index FILE.")
    ann = _ann_options(args)
    if args.index_type != "flat" and args.index:
        saved = ApproximateIndex.path_for(args.index, args.index_type)
        ann["_saved_ann"] = saved if saved.is_file() else None
    elif args.index_type == "flat" and ann:
        raise ValueError(
            f"{', '.join('--' + name.replace('_', '-') for name in ann)} need --index-type ivf-flat, ivf-pq or hnsw."
        )
    index = EmbeddingIndex(gallery.embeddings, gallery.ids, backend="auto", index_type=args.index_type, **ann)
    queries = args.query or args.query_image
    explanations = _query_explanations(args)
    if query_modality == "text":
        query_embeddings = encode_texts(
            model, processor, queries, progress=False, explanations=explanations,
            explanation_weight=args.explanation_weight,
        )  # fmt: skip
    else:
        query_embeddings = encode_images(model, processor, queries, progress=False)
    depth = min(max(args.k, args.rerank or 0), len(index))
    hits = index.search(query_embeddings, k=depth)
    if args.rerank and gallery.images is None and gallery_modality == "image":
        raise ValueError("--rerank needs the images: give --images-from (an --index file holds only embeddings).")
    results = []
    for q, query in enumerate(queries):
        rows = hits.indices[q].tolist()
        scores = hits.scores[q].tolist()
        entries = [
            {"row": row, "id": gallery.ids[row], "score": score} for row, score in zip(rows, scores, strict=True)
        ]
        if args.rerank:
            top = entries[: args.rerank]
            if gallery_modality == "image":
                explanation = explanations[q] if explanations is not None else None
                images = [gallery.images[e["row"]] for e in top]
                ranked = rerank_with_itm(model, processor, query, images, explanation=explanation)
            else:
                texts = [gallery.texts[e["row"]] for e in top]
                candidate_explanations = (
                    [gallery.explanations[e["row"]] for e in top] if gallery.explanations is not None else None
                )
                ranked = rerank_texts_with_itm(model, processor, query, texts, candidate_explanations)
            top = [{**top[c.index], "match_probability": c.match_probability} for c in ranked]
            entries = top + entries[args.rerank :]
        entries = entries[: args.k]
        for entry in entries:
            if gallery.texts is not None:
                entry["text"] = gallery.texts[entry["row"]]
        results.append({"query": str(query), "hits": entries})
        _print_hits(str(query), entries)
    return results


def _query_explanations(args) -> list | None:
    """The --explanation of each --query (in order), or None when none is given."""
    if not args.explanation:
        return None
    if not args.query or len(args.explanation) != len(args.query):
        raise ValueError("give one --explanation per --query (in the same order), or none.")
    if args.explanation_weight <= 0:
        raise ValueError("--explanation needs --explanation-weight W > 0 (how much the explanation counts).")
    return [text if text.strip() else None for text in args.explanation]


def _print_hits(query: str, entries: list[dict]) -> None:
    print(f'\nquery: "{query}"')
    for rank, entry in enumerate(entries, start=1):
        itm = f"  itm {entry['match_probability']:.3f}" if "match_probability" in entry else ""
        text = f"  {entry['text']}" if entry.get("text") is not None else ""
        print(f"  {rank:>3}. {entry['score']:.4f}{itm}  {entry['id']}{text}")


def _cli_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="entityclip-search",
        description="Encode a gallery to an embedding file, or search one with text (or image) queries.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub, gallery_required: bool):
        sub.add_argument("--model", required=True, help="a save_pretrained folder or a Hub repository id")
        sub.add_argument(
            "--images-from",
            required=gallery_required,
            help=f"a dataset ({', '.join(_DATASET_SOURCES)}, with --root and --split) or a folder of image files",
        )
        sub.add_argument("--root", help="the dataset's folder (for demo: where it is, or will be, generated)")
        sub.add_argument("--split", default="test")
        sub.add_argument("--max-samples", type=int, help="only the first N items of the gallery")
        sub.add_argument("--batch-size", type=int, default=64)
        sub.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
        sub.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
        sub.add_argument("--trust-remote-code", action="store_true", help="allow other architectures' Hub code")
        sub.add_argument("--no-progress", action="store_true")
        # Approximate search (FAISS): built with `encode`, saved beside the file; `search --index` loads it.
        sub.add_argument("--index-type", choices=INDEX_TYPES, default="flat", help="flat = exact search")
        sub.add_argument("--nlist", type=int, help="IVF lists (default ~4 sqrt(N))")
        sub.add_argument("--nprobe", type=int, help="IVF lists searched per query (default: tuned to recall@10 0.95)")
        sub.add_argument("--pq-m", type=int, help="IVF-PQ sub-quantisers (default D/4)")
        sub.add_argument("--hnsw-m", type=int, help="HNSW neighbours per node (default 32)")
        sub.add_argument("--ef-search", type=int, help="HNSW search effort (default: tuned to recall@10 0.95)")
        sub.add_argument("--train-size", type=int, help="IVF training sample (default min(N, 32 nlist))")
        sub.add_argument(
            "--explanation-weight", type=float, default=0.0,
            help="explanation-aware retrieval (opt-in): a text becomes normalize((1-w) text + w explanation); applies "
            "to --explanation of text queries and to a text gallery's explanations. 0 (default): the paper's texts alone",
        )  # fmt: skip

    encode = commands.add_parser("encode", help="encode a gallery into a safetensors embedding file")
    common(encode, gallery_required=True)
    encode.add_argument("--modality", choices=("image", "text"), default="image", help="encode images or texts")
    encode.add_argument("--output", required=True, help="the .safetensors file to write")

    search = commands.add_parser("search", help="print the top results of text (or image) queries")
    common(search, gallery_required=False)
    search.add_argument("--index", help="an embedding file from `encode` (instead of encoding --images-from)")
    search.add_argument("--query", action="append", help="a text query (repeatable): searches images")
    search.add_argument("--query-image", action="append", help="an image file as query (repeatable): searches texts")
    search.add_argument("--k", type=int, default=5, help="results per query")
    search.add_argument(
        "--explanation", action="append",
        help="the explanation of each --query (repeatable, same order; '' for none); needs --explanation-weight",
    )  # fmt: skip
    search.add_argument(
        "--rerank", type=int, default=0,
        help="rerank the first N hits with GI-ITM (EntityCLIP). Measured to LOWER R@1 against the CLIP order with "
        "the paper's GI-ITM and with every variant tried, itm_cross_attention included (bench/README.md, efficacy): "
        "check it on your validation data first (entityclip-eval --rerank_top_k N)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The `entityclip-search {encode,search} ...` command; exit status 0 (2 on bad input)."""
    run(argv)
    return 0


def run(argv: Sequence[str] | None = None):
    """The retrieval command as a function: returns what it printed, as data (hits per query, or the file written)."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "k"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "rerank", 0) < 0:
        parser.error("--rerank must be >= 0")
    if not 0 <= args.explanation_weight <= 1:
        parser.error("--explanation-weight must be in [0, 1]")
    try:
        _cli_device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _command_encode(args) if args.command == "encode" else _command_search(args)
    except (ValueError, OSError, ImportError) as error:  # a user error (a folder, a file, an argument): one line
        from .data.report import one_line

        print(f"{parser.prog} {args.command}: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    sys.exit(main())
