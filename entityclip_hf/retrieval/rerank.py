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
    score: float | None = None
    """What the candidates were ordered by: the match probability, or with `clip_weight` the fused score
    (`fused_rerank_scores`)."""


def fused_rerank_scores(match_probabilities, clip_logits, clip_weight: float | None) -> torch.Tensor:
    """The reranking score of candidates: GI-ITM's probability alone (`clip_weight` None, the paper's head used as a
    reranker), or its log-odds plus `clip_weight` x the first stage's CLIP logit (`exp(logit_scale)` x cosine).

    The fused score keeps what the first stage knows and lets GI-ITM move candidates whose match it is sure of;
    choose `clip_weight` on validation data (`entityclip_hf.itm_evaluation.rerank_recalls_by_clip_weight`), never on a test split.
    """
    probabilities = torch.as_tensor(match_probabilities).double()
    if clip_weight is None:
        return probabilities
    if isinstance(clip_weight, bool) or not isinstance(clip_weight, (int, float)) or not clip_weight >= 0:
        raise ValueError(f"clip_weight must be a number >= 0 (or None: GI-ITM alone), got {clip_weight!r}.")
    probabilities = probabilities.clamp(1e-12, 1 - 1e-12)  # float32 probabilities saturate at 1: keep logits finite
    return probabilities.log() - (-probabilities).log1p() + clip_weight * torch.as_tensor(clip_logits).double()


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
    first_stage_scores: Sequence[float] | None = None,
    clip_weight: float | None = None,
) -> list[RankedCandidate]:
    """Reorder a text query's candidate images (e.g. its top-k from [`EmbeddingIndex.search`]) by GI-ITM.

    Args:
        query_text: The query.
        candidate_images: PIL images, arrays or paths, in first-stage order.
        explanation: An LLM explanation of the query's entities, if available (as in training).
        candidate_ids: Ids to carry along (same length as `candidate_images`).
        first_stage_scores: The candidates' cosine similarities to the query (`EmbeddingIndex.search` scores);
            needed with `clip_weight`.
        clip_weight: None (the paper's head as reranker): order by the match probability. A number `w`: order by
            GI-ITM's log-odds + `w` x the CLIP logit (`exp(logit_scale)` x cosine), which keeps the first stage's
            knowledge; choose `w` on validation data (`entityclip-eval --rerank_top_k K --rerank_clip_weight ...`).

    Returns:
        All candidates, highest score first (ties keep the first-stage order).
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
    return _ranked(probabilities, candidate_ids, _fused(model, probabilities, first_stage_scores, clip_weight))


def rerank_texts_with_itm(
    model,
    processor,
    query_image,
    candidate_texts: Sequence[str],
    candidate_explanations: Sequence[str | None] | None = None,
    candidate_ids: Sequence | None = None,
    batch_size: int = 16,
    progress: bool = False,
    first_stage_scores: Sequence[float] | None = None,
    clip_weight: float | None = None,
) -> list[RankedCandidate]:
    """Reorder an image query's candidate texts by GI-ITM (each text with its own explanation, if given);
    `first_stage_scores` and `clip_weight` as in [`rerank_with_itm`]."""
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
    return _ranked(probabilities, candidate_ids, _fused(model, probabilities, first_stage_scores, clip_weight))


def _check_candidates(candidates: list, candidate_ids: Sequence | None) -> None:
    if not candidates:
        raise ValueError("no candidates to rerank.")
    if candidate_ids is not None and len(candidate_ids) != len(candidates):
        raise ValueError(f"{len(candidate_ids)} candidate_ids for {len(candidates)} candidates.")


def _fused(model, probabilities: torch.Tensor, first_stage_scores, clip_weight) -> torch.Tensor:
    """The reranking scores: the probabilities, or fused with the first stage's CLIP logits (`clip_weight`)."""
    if clip_weight is None:
        return probabilities
    if first_stage_scores is None:
        raise ValueError("clip_weight needs first_stage_scores: the candidates' cosine similarities to the query.")
    cosines = torch.as_tensor(list(first_stage_scores), dtype=torch.float64)
    if cosines.shape != probabilities.shape:
        raise ValueError(f"{cosines.numel()} first_stage_scores for {probabilities.numel()} candidates.")
    logit_scale = float(model.clip.logit_scale.detach().float().exp())
    return fused_rerank_scores(probabilities, logit_scale * cosines, clip_weight)


def _ranked(probabilities: torch.Tensor, candidate_ids: Sequence | None, scores: torch.Tensor) -> list[RankedCandidate]:
    values, order_by = probabilities.tolist(), scores.tolist()
    order = sorted(range(len(values)), key=lambda i: (-order_by[i], i))
    ids = candidate_ids if candidate_ids is not None else [None] * len(values)
    return [RankedCandidate(i, ids[i], values[i], order_by[i]) for i in order]
