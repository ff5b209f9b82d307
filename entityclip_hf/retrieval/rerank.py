"""Reranking a first-stage top k with the GI-ITM head (`EntityCLIPModel.match_probability`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .encode import _autocast, _check_positive_int, _model_device, _progress_bar

logger = logging.getLogger(__name__)


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


