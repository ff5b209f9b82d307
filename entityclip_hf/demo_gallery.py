"""What the demo page searches: a gallery of images and captions with their CLIP embeddings, and the queries on it.

The page (`entityclip_hf.demo_app`) only turns widgets into calls of `DemoSearch` and results into widgets; every
ranking comes from `retrieval.py` (`EmbeddingIndex.search`, `rerank_with_itm`, `rerank_texts_with_itm`), so the
page shows exactly what the library computes. A gallery comes from a dataset split (encoded here, in chunks that
report progress), from embedding files written by `entityclip-search encode` / `save_embeddings` (opened in a
fraction of a second, whatever the size), or both: the files' embeddings with the split's images and captions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .retrieval import EmbeddingIndex, encode_images, encode_texts, load_embeddings, rerank_texts_with_itm
from .retrieval import rerank_with_itm as _rerank_with_itm
from .retrieval.encode import DatasetRows

__all__ = ["DemoSearch", "Hit", "QueryResult", "load_gallery", "open_query_image"]

#: Images or texts encoded between two progress reports (a few batches: reports stay frequent and cheap).
PROGRESS_CHUNK = 256
#: The most results a query may ask for: the page stays light and GI-ITM reranking stays interactive.
MAX_K = 100
#: Largest query image accepted, in pixels (read from the file's header, before anything is decoded).
MAX_QUERY_PIXELS = 40_000_000

ProgressCallback = Callable[[float, str], None]


@dataclass
class Hit:
    """One result of a query: a gallery item with its CLIP cosine score (and GI-ITM probability when reranked)."""

    row: int
    id: str | int
    score: float
    clip_rank: int
    """1-based rank in the CLIP order."""
    match_probability: float | None = None
    is_ground_truth: bool = False


@dataclass
class QueryResult:
    """The CLIP top-k of a query, the same candidates reranked by GI-ITM (if asked), and notes for the user."""

    clip: list[Hit]
    reranked: list[Hit] | None = None
    notes: list[str] = field(default_factory=list)
    """What the page should say about the query (k reduced to the gallery size, ...)."""


class UserInputError(ValueError):
    """A query the page cannot run, with a message written for the person who typed it."""


class DemoSearch:
    """Text → images and image → texts search over one gallery, with optional GI-ITM reranking.

    Args:
        model, processor: An `EntityCLIPModel` (or a plain `CLIPModel`: no reranking) and its processor.
        image_index: The images' embeddings (`EmbeddingIndex` with ids).
        images: Per row of `image_index`, something the processor reads (PIL image, path), or None when only
            the embeddings are known (the page then lists ids and scores).
        texts / text_index: The captions and their embeddings (same ids as the images where a pair exists), or
            None when the gallery has no captions.
    """

    def __init__(
        self, model, processor, image_index: EmbeddingIndex, images=None, texts=None, text_index=None,
        explanation_weight: float = 0.0,
    ):  # fmt: skip
        self.model, self.processor = model, processor
        # 0 (the paper): a query's explanation is used by GI-ITM reranking only; > 0: also fused into the query.
        self.explanation_weight = explanation_weight
        self.image_index, self.images = image_index, images
        self.texts, self.text_index = texts, text_index
        self.can_rerank = hasattr(model, "match_probability")
        self.image_row_of_id = {item_id: row for row, item_id in enumerate(image_index.ids)}
        # The page hands ids back as strings (a text box, a table cell); integer ids are found from those too.
        self._id_of_text = {str(item_id): item_id for item_id in image_index.ids}
        self._text_row_of_id = {item_id: row for row, item_id in enumerate(text_index.ids)} if text_index else {}
        self.text_rows_of_caption: dict[str, list[int]] = {}
        if texts is not None:
            for row, text in enumerate(texts):
                self.text_rows_of_caption.setdefault(_normalised(text), []).append(row)

    @property
    def num_images(self) -> int:
        return len(self.image_index)

    @property
    def num_texts(self) -> int:
        return len(self.text_index) if self.text_index is not None else 0

    def image(self, row: int) -> Image.Image | None:
        """The gallery image of `row`, decoded (None when the gallery has only embeddings)."""
        if self.images is None:
            return None
        item = self.images[row]
        return _as_pil(item)

    def id_of(self, text: str):
        """The gallery id written as `text`, or a `UserInputError` naming it."""
        if text not in self._id_of_text:
            raise UserInputError(f"No gallery item has the id {text!r}.")
        return self._id_of_text[text]

    def text_index_row(self, item_id) -> int | None:
        """Row of the caption paired with gallery item `item_id`, if it has one."""
        return self._text_row_of_id.get(item_id)

    def ground_truth_ids(self, query: str) -> set:
        """Ids of the gallery items whose own caption is exactly the query (the pairs of a dataset split)."""
        if self.text_index is None:
            return set()
        return {self.text_index.ids[row] for row in self.text_rows_of_caption.get(_normalised(query), [])}

    def search_images(self, query: str, k, explanation: str | None = None, rerank: bool = False) -> QueryResult:
        """The `k` gallery images closest to a text query (CLIP), and the same `k` reordered by GI-ITM if `rerank`."""
        query = (query or "").strip()
        if not query:
            raise UserInputError("Type a query first: the text describing the image you are looking for.")
        explanation = (explanation or "").strip() or None
        k, notes = self._checked_k(k, self.num_images, "images")
        query_embedding = encode_query(self.model, self.processor, query, explanation, self.explanation_weight)
        hits = self.image_index.search(query_embedding, k=k)
        truth = self.ground_truth_ids(query)
        clip = _hits(hits, truth)
        if truth:
            ranks = ", ".join(f"{item_id} is #{self._clip_rank(query_embedding, item_id)}" for item_id in truth)
            notes.append(f"The query is a caption of the gallery: its own image is marked ✔ ground truth ({ranks}).")
        result = QueryResult(clip, notes=notes)
        if rerank:
            self._check_can_rerank()
            if self.images is None:
                raise UserInputError("Reranking needs the gallery's images; this gallery has only embeddings.")
            ranked = _rerank_with_itm(
                self.model, self.processor, query, [self.images[hit.row] for hit in clip], explanation=explanation
            )
            result.reranked = [_with_probability(clip[c.index], c.match_probability) for c in ranked]
        return result

    def search_texts(self, image, k, rerank: bool = False, query_id=None) -> QueryResult:
        """The `k` captions closest to a query image (CLIP), and the same `k` reordered by GI-ITM if `rerank`.

        `query_id` names a gallery item used as the query: its own caption is then marked as the ground truth.
        """
        self.check_has_captions()
        if image is None:
            raise UserInputError("Upload an image, or pick one of the gallery, first.")
        k, notes = self._checked_k(k, self.num_texts, "captions")
        hits = self.text_index.search(encode_images(self.model, self.processor, [image], progress=False), k=k)
        truth = {query_id} if query_id is not None and query_id in set(self.text_index.ids) else set()
        clip = _hits(hits, truth)
        result = QueryResult(clip, notes=notes)
        if rerank:
            self._check_can_rerank()
            ranked = rerank_texts_with_itm(self.model, self.processor, image, [self.texts[hit.row] for hit in clip])
            result.reranked = [_with_probability(clip[c.index], c.match_probability) for c in ranked]
        return result

    def _clip_rank(self, query_embedding: torch.Tensor, item_id) -> int:
        """1-based CLIP rank of one gallery item for a query (ties count against it, as the metrics do)."""
        normalised = torch.nn.functional.normalize(query_embedding.float(), dim=-1)[0]
        scores = self.image_index.embeddings.cpu() @ normalised
        return int((scores >= scores[self.image_row_of_id[item_id]]).sum())

    def check_has_captions(self) -> None:
        """A `UserInputError` when there is nothing to search with an image."""
        if self.text_index is None:
            raise UserInputError("This gallery has no captions to search: start the demo with a dataset split.")

    def _checked_k(self, k, size: int, what: str) -> tuple[int, list[str]]:
        try:
            value = float(k)
        except (TypeError, ValueError):
            raise UserInputError(f"k must be a whole number of results, got {k!r}.") from None
        if not math.isfinite(value) or value != int(value) or value < 1:
            raise UserInputError(f"k must be a whole number of results, at least 1; got {k!r}.")
        k, notes = int(value), []
        if k > MAX_K:
            notes.append(f"k={k} is more than this page shows at once: showing the top {MAX_K}.")
            k = MAX_K
        if k > size:
            notes.append(f"k={k} is more than the gallery holds ({size} {what}): showing all {size}, ranked.")
            k = size
        return k, notes

    def _check_can_rerank(self) -> None:
        if not self.can_rerank:
            raise UserInputError(
                f"{type(self.model).__name__} has no GI-ITM head: reranking needs an EntityCLIP model."
            )


def encode_query(
    model, processor, query: str, explanation: str | None, explanation_weight: float = 0.0
) -> torch.Tensor:
    """The CLIP embedding of a text query; with an explanation and `explanation_weight` > 0, the explanation-aware
    embedding `normalize((1 - w) text + w explanation)` (measured to help: README, "Does it help?")."""
    if explanation and explanation_weight > 0:
        return encode_texts(
            model, processor, [query], explanations=[explanation], explanation_weight=explanation_weight,
            progress=False,
        )  # fmt: skip
    return encode_texts(model, processor, [query], progress=False)


def open_query_image(path, max_pixels: int = MAX_QUERY_PIXELS) -> Image.Image:
    """An uploaded file as an RGB image, or a `UserInputError` saying why it cannot be a query."""
    name = Path(str(path)).name
    try:
        with Image.open(path) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise UserInputError(
                    f"{name} is {width} x {height} pixels, more than this page accepts ({max_pixels:,} pixels): "
                    "upload a smaller image."
                )
            image.load()
            return image.convert("RGB")
    except UserInputError:
        raise
    except Image.DecompressionBombError:
        raise UserInputError(f"{name} has too many pixels to open safely: upload a smaller image.") from None
    except (OSError, ValueError, SyntaxError) as error:  # PIL's ways of saying "this is not an image I can read"
        raise UserInputError(f"{name} is not an image this page can read ({type(error).__name__}).") from None


def _normalised(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def _as_pil(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    with Image.open(item) as image:
        image.load()
        return image.convert("RGB")


def _hits(results, truth: set) -> list[Hit]:
    rows, scores, ids = results.indices[0].tolist(), results.scores[0].tolist(), results.ids[0]
    return [
        Hit(row=row, id=item_id, score=score, clip_rank=rank, is_ground_truth=item_id in truth)
        for rank, (row, score, item_id) in enumerate(zip(rows, scores, ids, strict=True), start=1)
    ]


def _with_probability(hit: Hit, probability: float) -> Hit:
    return Hit(hit.row, hit.id, hit.score, hit.clip_rank, probability, hit.is_ground_truth)


# =============================================================================================== loading
class _Rows(DatasetRows):
    """Lazy view of a dataset column at some rows (decoded when the page shows it), and the undecoded source."""

    def source(self, index: int) -> dict:
        """The stored image of `index` undecoded: `{"path": ..., "bytes": ...}` (to copy it byte for byte)."""
        import datasets

        if not hasattr(self, "_undecoded"):
            self._undecoded = self.dataset.cast_column(self.column, datasets.Image(decode=False))
        return self._undecoded[self.rows[index]][self.column]


def load_gallery(
    model,
    processor,
    *,
    index: str | None = None,
    text_index: str | None = None,
    dataset: str | None = None,
    root: str | None = None,
    split: str = "test",
    max_samples: int | None = None,
    batch_size: int = 64,
    on_progress: ProgressCallback | None = None,
    explanation_weight: float = 0.0,
) -> DemoSearch:
    """Build the demo's gallery from a dataset split, embedding files, or both (files' embeddings, split's items).

    Embeddings missing from the files are encoded from the split, in chunks of `PROGRESS_CHUNK` that each call
    `on_progress(fraction, description)`. Items that cannot be encoded are left out (logged by `encode_*`).
    """
    report = on_progress or (lambda fraction, description: None)
    if index is None and dataset is None:
        raise ValueError("give the gallery: --index FILE (an image embedding file), --dataset NAME, or both.")
    split_data = None
    if dataset is not None:
        from .loaders import load_split

        report(0.0, f"reading the {dataset} {split} split")
        # With embedding files the images are read only when shown: no need to check every file up front.
        split_data, _ = load_split(dataset, root, split, max_samples, "none" if index else "header")
        if len(split_data) == 0:
            raise ValueError(f"the {split} split of {dataset} is empty: nothing to show.")
    image_index, images = _image_side(model, processor, index, split_data, batch_size, report)
    texts = text_index_obj = None
    if split_data is not None:
        text_index_obj, texts = _text_side(model, processor, text_index, split_data, batch_size, report)
    elif text_index is not None:
        raise ValueError("--text-index needs --dataset: the captions themselves come from the split.")
    _check_dimension(model, processor, image_index, index or "the encoded gallery")
    report(1.0, "ready")
    return DemoSearch(
        model, processor, image_index, images=images, texts=texts, text_index=text_index_obj,
        explanation_weight=explanation_weight,
    )  # fmt: skip


def _split_ids(data) -> list:
    return list(data["id"]) if "id" in data.column_names else list(range(len(data)))


def _image_side(model, processor, index, data, batch_size, report):
    if index is not None:
        started = time.perf_counter()
        stored = _stored(index, "image")
        image_index = EmbeddingIndex(stored.embeddings, stored.ids)
        report(0.5, f"opened {len(image_index)} image embeddings in {time.perf_counter() - started:.2f} s")
        if data is None:
            return image_index, None
        row_of_id = {item_id: row for row, item_id in enumerate(_split_ids(data))}
        missing = [item_id for item_id in image_index.ids if item_id not in row_of_id]
        if missing:
            raise ValueError(
                f"{index} and the split do not match: {len(missing)} of its ids are not in the split "
                f"(first: {missing[:3]}). Encode the same split, or leave out --index."
            )
        return image_index, _Rows(data, [row_of_id[item_id] for item_id in image_index.ids], "image")
    embeddings = _encode_in_chunks(encode_images, model, processor, data, "image", batch_size, report, (0.0, 0.8))
    keep = torch.isfinite(embeddings).all(dim=1)
    rows = keep.nonzero().flatten().tolist()
    ids = _split_ids(data)
    return EmbeddingIndex(embeddings[keep], [ids[row] for row in rows]), _Rows(data, rows, "image")


def _text_side(model, processor, text_index, data, batch_size, report):
    ids, captions = _split_ids(data), list(data["text"])
    if text_index is not None:
        stored = _stored(text_index, "text")
        caption_of_id = dict(zip(ids, captions, strict=True))
        missing = [item_id for item_id in stored.ids if item_id not in caption_of_id]
        if missing:
            raise ValueError(f"{text_index} and the split do not match: ids {missing[:3]} are not in the split.")
        return EmbeddingIndex(stored.embeddings, stored.ids), [caption_of_id[item_id] for item_id in stored.ids]
    embeddings = _encode_in_chunks(encode_texts, model, processor, captions, "text", batch_size, report, (0.8, 1.0))
    keep = torch.isfinite(embeddings).all(dim=1).nonzero().flatten().tolist()
    return EmbeddingIndex(embeddings[keep], [ids[row] for row in keep]), [captions[row] for row in keep]


def _stored(path: str, modality: str):
    stored = load_embeddings(path)
    found = stored.metadata.get("modality", "image")
    if found != modality:
        option = "--index" if modality == "image" else "--text-index"
        raise ValueError(f"{path} holds {found} embeddings; {option} needs {modality} embeddings.")
    if stored.ids is None:
        raise ValueError(f"{path} has no ids: save it with ids (save_embeddings(..., ids=...)) to show its items.")
    return stored


def _encode_in_chunks(encode, model, processor, items, what, batch_size, report, span) -> torch.Tensor:
    start_fraction, end_fraction = span
    total, parts = len(items), []
    started = time.perf_counter()
    for start in range(0, total, PROGRESS_CHUNK):
        stop = min(start + PROGRESS_CHUNK, total)
        chunk = items.select(range(start, stop)) if hasattr(items, "select") else items[start:stop]
        parts.append(encode(model, processor, chunk, batch_size=batch_size, progress=False, skip_errors=True))
        fraction = start_fraction + (end_fraction - start_fraction) * stop / total
        report(fraction, f"encoding the gallery's {what}s: {stop}/{total} ({time.perf_counter() - started:.0f} s)")
    embeddings = torch.cat(parts)
    if not bool(torch.isfinite(embeddings).all(dim=1).any()):
        raise ValueError(f"none of the {total} {what}s of the gallery could be encoded.")
    return embeddings


def _check_dimension(model, processor, image_index: EmbeddingIndex, source: str) -> None:
    dim = encode_texts(model, processor, ["a"], progress=False).shape[1]
    if dim != image_index.dim:
        raise ValueError(
            f"{source} holds embeddings of dimension {image_index.dim}, but the model's are {dim}: "
            "encode the gallery with this model."
        )


def describe(search: DemoSearch) -> str:
    """One line saying what the gallery holds."""
    parts = [f"{search.num_images} images"]
    if search.text_index is not None:
        parts.append(f"{search.num_texts} captions")
    if search.images is None:
        parts.append("embeddings only: results are listed by id")
    return ", ".join(parts)
