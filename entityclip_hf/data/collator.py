"""Batching for training and evaluation: rows -> processor inputs, images decoded late, bad rows never fatal.

Two equivalent paths, neither of which preprocesses the dataset up front:

- a DataLoader `collate_fn`: `DataLoader(lazy_images(ds["train"]), batch_size=..., collate_fn=EntityCLIPCollator(processor))`;
- `with_transform`: `lazy_images(ds["train"]).with_transform(make_transform(processor))`, then a plain
  `DataLoader(..., batch_size=...)` (datasets hands each batch of indices to the transform in one call, so padding
  is still per batch).

Both decode images where the batch is built, i.e. in the DataLoader workers. `lazy_images` switches the `image`
column to undecoded paths: with a decoding `datasets.Image` column, `datasets` itself opens each image when a row
is read, and a damaged file would raise there, out of the collator's reach.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

logger = logging.getLogger(__name__)

BAD_ROW_POLICIES = ("replace", "drop", "raise")


def lazy_images(dataset, image_column: str = "image"):
    """`dataset` (a `Dataset` or `DatasetDict`) with `image_column` left undecoded until the collator needs it."""
    return dataset.cast_column(image_column, datasets.Image(decode=False))


class EntityCLIPCollator:
    """Turn a list of dataset rows into EntityCLIP model inputs with an `EntityCLIPProcessor`.

    Returns the processor's `BatchFeature`: `pixel_values`, `input_ids`, `attention_mask`, `explanation_input_ids`,
    `explanation_attention_mask` (a row without explanation, or a dataset without an explanation column, gets an
    all-zero mask row: the model's "no explanation"). With `return_ids=True` it also holds `ids` (a list of
    strings): pop it before `model(**batch)`.

    A row whose image cannot be decoded, or whose text is not a non-blank string, never stops the job. It is
    logged with its id and, by `on_bad_row`:
    - "replace" (default): swapped for a good row of an earlier batch (or, in the first batch, of this one), so the
      batch keeps its size: distributed training gathers equal-sized batches from every process;
    - "drop": left out (the batch shrinks);
    - "raise": a `ValueError` naming the row.
    A batch whose rows are all bad raises `ValueError` whatever the policy.

    Args:
        processor: an `EntityCLIPProcessor`.
        text_column, explanation_column, image_column, id_column: the row keys to read.
        max_length, explanation_max_length: passed to the processor (None: its defaults).
    """

    def __init__(
        self,
        processor,
        text_column: str = "text",
        explanation_column: str = "explanation",
        image_column: str = "image",
        id_column: str = "id",
        return_ids: bool = False,
        on_bad_row: str = "replace",
        max_length: int | None = None,
        explanation_max_length: int | None = None,
    ):
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_row must be one of {', '.join(BAD_ROW_POLICIES)}, got {on_bad_row!r}")
        self.processor = processor
        self.text_column = text_column
        self.explanation_column = explanation_column
        self.image_column = image_column
        self.id_column = id_column
        self.return_ids = return_ids
        self.on_bad_row = on_bad_row
        self.max_length = max_length
        self.explanation_max_length = explanation_max_length
        # Good rows of the last batch (undecoded, as they came), the stand-ins of bad rows under "replace". Each
        # DataLoader worker has its own copy of the collator, hence its own reserve.
        self._reserve: list[Mapping[str, Any]] = []

    def _row_id(self, row: Mapping[str, Any], index: int) -> str:
        value = row.get(self.id_column)
        return str(value) if value is not None else f"row {index}"

    def _prepare(self, row: Mapping[str, Any], index: int):
        """(RGB image, text, explanation) of a row; raises ValueError naming the field when the row is unusable."""
        if self.text_column not in row:
            raise ValueError(f"no {self.text_column!r} column (row keys: {sorted(row)})")
        text = row[self.text_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{self.text_column!r} must be a non-blank string, got {text!r}")
        explanation = row.get(self.explanation_column)
        if explanation is not None and not isinstance(explanation, str):
            raise ValueError(f"{self.explanation_column!r} must be a string or None, got {type(explanation).__name__}")
        if self.image_column not in row:
            raise ValueError(f"no {self.image_column!r} column (row keys: {sorted(row)})")
        image = row[self.image_column]
        try:
            if isinstance(image, Mapping):
                # An undecoded datasets.Image value ({"path", "bytes"}): decoded the way datasets decodes (EXIF
                # orientation applied).
                image = datasets.Image().decode_example(dict(image))
            image = self.processor.load_rgb_image(image, index)
        # Decoders raise many exception types on damaged files; the row is reported, the job goes on.
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"{self.image_column!r}: cannot decode ({type(error).__name__}: {error})") from error
        return image, text, explanation

    def __call__(self, rows: Sequence[Mapping[str, Any]]):
        if not rows:
            raise ValueError("EntityCLIPCollator got an empty batch")
        prepared: list[tuple[str, tuple]] = []
        good_rows: list[Mapping[str, Any]] = []
        bad: list[str] = []
        for index, row in enumerate(rows):
            try:
                prepared.append((self._row_id(row, index), self._prepare(row, index)))
                good_rows.append(row)
            except ValueError as error:
                bad.append(f"{self._row_id(row, index)}: {error}")
        if bad:
            described = "; ".join(bad)
            if self.on_bad_row == "raise":
                raise ValueError(f"bad rows in batch: {described}")
            if not prepared:
                raise ValueError(f"every row of the batch is bad: {described}")
            if self.on_bad_row == "replace":
                prepared.extend(self._stand_ins(len(bad), prepared))
            logger.warning(
                "%d bad row(s) %s: %s",
                len(bad),
                "replaced by good rows" if self.on_bad_row == "replace" else "dropped",
                described,
            )
        self._reserve = good_rows
        ids = [row_id for row_id, _ in prepared]
        images, texts, explanations = (list(values) for values in zip(*(item for _, item in prepared), strict=True))
        batch = self.processor(
            images=images,
            text=texts,
            explanations=explanations,
            # No padding argument: the processor pads to the longest sample unless the saved tokenizer says otherwise.
            max_length=self.max_length,
            explanation_max_length=self.explanation_max_length,
            return_tensors="pt",
        )
        if self.return_ids:
            batch["ids"] = ids
        return batch

    def _stand_ins(self, count: int, prepared: list[tuple[str, tuple]]) -> list[tuple[str, tuple]]:
        """`count` good rows to take the place of bad ones: from the reserve first (rows not in this batch)."""
        ids_in_batch = {row_id for row_id, _ in prepared}
        stand_ins = []
        for row in self._reserve:
            if len(stand_ins) == count:
                break
            row_id = self._row_id(row, -1)
            if row_id in ids_in_batch:
                continue
            try:
                stand_ins.append((row_id, self._prepare(row, len(stand_ins))))
            except ValueError:
                continue  # a reserve row that went bad since (its file changed): skip it
        # The first batch has no reserve: repeat this batch's good rows (a repeated pair is a weaker negative for
        # one step; a smaller batch would break the equal-size gather of distributed training).
        stand_ins.extend(prepared[index % len(prepared)] for index in range(count - len(stand_ins)))
        return stand_ins


class EntityCLIPTransform:
    """A `Dataset.with_transform` function: a batch of columns -> EntityCLIP model inputs (see `make_transform`)."""

    def __init__(self, collator: EntityCLIPCollator):
        self.collator = collator

    def __call__(self, batch: Mapping[str, list]) -> dict[str, Any]:
        names = list(batch)
        rows = [dict(zip(names, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        return dict(self.collator(rows))


def make_transform(processor, **collator_kwargs) -> EntityCLIPTransform:
    """On-the-fly preprocessing: `lazy_images(dataset).with_transform(make_transform(processor))`.

    Indexing the dataset then returns model inputs (`ds[0:8]` -> a batch padded to its longest text), and
    `DataLoader(dataset, batch_size=B)` gives stacked batches, processed in the workers. `collator_kwargs` are
    those of `EntityCLIPCollator`.
    """
    return EntityCLIPTransform(EntityCLIPCollator(processor, **collator_kwargs))


__all__ = ["EntityCLIPCollator", "EntityCLIPTransform", "lazy_images", "make_transform"]
