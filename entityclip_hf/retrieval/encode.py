"""Encoding galleries and queries: images, texts and explanations -> CLIP embeddings, in batches."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import distributed
from .embeddings import _as_matrix

logger = logging.getLogger(__name__)


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


class DatasetRows:
    """Lazy `column` of selected dataset rows: an image is decoded only when it is read (reranking, the demo page)."""

    def __init__(self, dataset, rows: list[int], column: str):
        self.dataset, self.rows, self.column = dataset.select_columns([column]), rows, column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.dataset[self.rows[index]][self.column]


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

    # Launched with several processes, each encodes its own contiguous rows; the shards are gathered below.
    rows = distributed.shard_range(len(source))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(_IndexedItems(source, column), rows),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_BatchPreparer(processor, modality),
    )
    device = _model_device(model)
    embed = _image_features if modality == "image" else _text_features
    output: torch.Tensor | None = None
    failed: list[tuple[int, str]] = []
    error: str | None = None
    was_training = model.training
    model.eval()
    try:
        bar = _progress_bar(len(loader), f"encoding {modality}s", progress and distributed.is_main_process())
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
                        output = torch.full((len(rows), features.shape[1]), float("nan"), dtype=torch.float32)
                    output[torch.as_tensor(indices) - rows.start] = features
                bar.update(1)
        bar.close()
    except ValueError as raised:
        if not distributed.is_distributed():
            raise
        error = str(raised)  # said by every process below, or the others would wait for this one's shard
    finally:
        model.train(was_training)
    return _gathered(output, failed, error, len(source), modality)


def _gathered(output, failed, error, num_rows: int, modality: str) -> torch.Tensor:
    # One process: its output as is. Several: the first error in row order stops all of them; the shards of those
    # that encoded something set the width of the rows of those that did not (all NaN), then they are gathered.
    error = distributed.first_error(error)
    if error is not None:
        raise ValueError(error)
    width = distributed.first_error(None if output is None else str(output.shape[1]))
    first_failure = distributed.first_error(failed[0][1] if failed else None)
    if width is None:
        raise ValueError(f"none of the {num_rows} {modality}s could be encoded (first failure: {first_failure}).")
    if output is None:
        output = torch.full((len(distributed.shard_range(num_rows)), int(width)), float("nan"), dtype=torch.float32)
    output = distributed.gather_shards(output, num_rows)
    num_failed = int(torch.isnan(output).any(dim=1).sum()) if distributed.is_distributed() else len(failed)
    if num_failed and distributed.is_main_process():
        logger.warning("%d of %d %ss could not be encoded: their rows are NaN.", num_failed, num_rows, modality)
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


