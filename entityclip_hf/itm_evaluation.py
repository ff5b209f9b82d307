"""Does GI-ITM know a match? ITM AUC on a split, and retrieval R@K after GI-ITM reranks the CLIP top-k.

    scorer = PairScorer.from_dataset(model, processor, split)          # images, texts, explanations preprocessed once
    itm_auc(scorer)                                                    # true pairs vs mismatched pairs
    rerank_recalls(scorer, image_embeds, text_embeds, top_k=10)        # R@K of the CLIP order and after reranking
    rerank_recalls(..., clip_weight=2.0)                               # reranked by ITM log-odds + 2 x CLIP logit

`entityclip-eval --rerank_top_k K` and `examples/finetune.py`'s evaluation report these beside the CLIP metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .retrieval.rerank import fused_rerank_scores

__all__ = ["PairScorer", "fused_rerank_scores", "itm_auc", "rerank_recalls", "rerank_recalls_by_clip_weight", "roc_auc"]


def roc_auc(positive_scores, negative_scores) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counted half (Mann-Whitney U)."""
    positive = torch.as_tensor(positive_scores, dtype=torch.float64).flatten()
    negative = torch.as_tensor(negative_scores, dtype=torch.float64).flatten()
    if positive.numel() == 0 or negative.numel() == 0:
        raise ValueError("roc_auc needs at least one positive and one negative score.")
    above = (positive[:, None] > negative[None, :]).double().sum()
    tied = (positive[:, None] == negative[None, :]).double().sum()
    return float((above + 0.5 * tied) / (positive.numel() * negative.numel()))


class PairScorer:
    """GI-ITM match probabilities of (image i, text j with explanation j) for any index pairs of one split.

    Images, texts and explanations are preprocessed once (padded to the longest of the split), so scoring a query's
    top-k candidates is one forward of `model.match_probability` per batch of pairs.
    """

    def __init__(self, model, pixel_values, input_ids, attention_mask, explanation_input_ids=None,
                 explanation_attention_mask=None, batch_size: int = 128):  # fmt: skip
        if not hasattr(model, "match_probability"):
            raise TypeError(f"{type(model).__name__} has no GI-ITM head (match_probability): needs EntityCLIP.")
        self.model = model
        self.pixel_values = pixel_values
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.explanation_input_ids, self.explanation_attention_mask = explanation_input_ids, explanation_attention_mask
        self.batch_size = batch_size

    @classmethod
    def from_dataset(cls, model, processor, dataset, use_explanations: bool = True, batch_size: int = 128):
        """A scorer over a split with `image`, `text` and (optional) `explanation` columns."""
        from .retrieval.encode import _undecoded_image

        images = [_undecoded_image(item) for item in dataset["image"]]
        pixel_values = torch.cat(
            [
                processor(images=images[i : i + 256], return_tensors="pt")["pixel_values"]
                for i in range(0, len(images), 256)
            ]
        )
        texts = processor(text=list(dataset["text"]), padding="longest", truncation=True, return_tensors="pt")
        explanation_ids = explanation_mask = None
        if use_explanations and "explanation" in dataset.column_names:
            explanations = [e if isinstance(e, str) and e.strip() else "" for e in dataset["explanation"]]
            if any(explanations):
                tokens = processor(text=explanations, padding="longest", truncation=True, return_tensors="pt")
                explanation_ids, explanation_mask = tokens["input_ids"], tokens["attention_mask"].clone()
                for row, explanation in enumerate(explanations):
                    if not explanation:
                        explanation_mask[row] = 0  # the model's "no explanation"
        return cls(model, pixel_values, texts["input_ids"], texts["attention_mask"], explanation_ids, explanation_mask,
                   batch_size)  # fmt: skip

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    @torch.no_grad()
    def __call__(self, image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        """Match probability [P] of each pair (image image_rows[p], text text_rows[p])."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        scores = []
        try:
            for start in range(0, len(image_rows), self.batch_size):
                images = image_rows[start : start + self.batch_size]
                texts = text_rows[start : start + self.batch_size]
                inputs = {
                    "pixel_values": self.pixel_values[images],
                    "input_ids": self.input_ids[texts],
                    "attention_mask": self.attention_mask[texts],
                }
                if self.explanation_input_ids is not None:
                    inputs["explanation_input_ids"] = self.explanation_input_ids[texts]
                    inputs["explanation_attention_mask"] = self.explanation_attention_mask[texts]
                inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
                scores.append(self.model.match_probability(**inputs).float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(scores)


def itm_auc(scorer: PairScorer, seed: int = 0) -> float:
    """ITM AUC: each true pair (i, i) against a mismatched pair (i, text of another row), the other row drawn at
    random (seeded) but never i. 0.5 = the head cannot tell; 1.0 = it always scores the true pair higher."""
    count = len(scorer)
    if count < 2:
        raise ValueError("itm_auc needs at least 2 pairs.")
    rows = torch.arange(count)
    shift = torch.randint(1, count, (count,), generator=torch.Generator().manual_seed(seed))
    positive = scorer(rows, rows)
    negative = scorer(rows, (rows + shift) % count)
    return roc_auc(positive, negative)


def _top_k_scores(similarity: torch.Tensor, query_is_image: bool, scorer: PairScorer, top_k: int):
    """Each query's CLIP rank of its positive (query q's positive is gallery item q), its top k, and the GI-ITM
    probabilities of those candidates."""
    count = similarity.shape[0]
    positives = similarity.diagonal()
    # Ties count against the query, as in `entityclip_hf.metrics`.
    clip_rank = (similarity >= positives[:, None]).sum(1)
    top = similarity.topk(min(top_k, count), dim=1).indices  # [Q, k]
    queries = torch.arange(count)[:, None].expand_as(top)
    image_rows, text_rows = (queries, top) if query_is_image else (top, queries)
    probabilities = scorer(image_rows.flatten(), text_rows.flatten()).view_as(top)
    return clip_rank, top, probabilities


def _reranked_ranks(clip_rank: torch.Tensor, top: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The positive's rank after reordering each query's top k by `scores` [Q, k]; outside the top k it keeps its
    CLIP rank."""
    reranked = clip_rank.clone()
    for q in range(top.shape[0]):
        hit = (top[q] == q).nonzero()
        if hit.numel():
            position = int(hit[0])
            # Pessimistic ties again: candidates scoring >= the positive are ahead of it.
            reranked[q] = int((scores[q] >= scores[q, position]).sum())
    return reranked


def rerank_recalls_by_clip_weight(
    scorer: PairScorer, image_embeds, text_embeds, clip_weights, top_k: int = 10, ks=(1, 5, 10), logit_scale=None
) -> dict:
    """`rerank_recalls` for each of `clip_weights` (None: GI-ITM alone), scoring the candidates with GI-ITM once.

    `logit_scale` (the CLIP logits' temperature, `exp` already applied) defaults to the scorer's model's. Returns
    {clip_weight: recalls}.
    """
    image = F.normalize(torch.as_tensor(image_embeds).float(), dim=-1)
    text = F.normalize(torch.as_tensor(text_embeds).float(), dim=-1)
    if logit_scale is None and any(weight is not None for weight in clip_weights):
        logit_scale = float(scorer.model.clip.logit_scale.detach().exp())
    similarity = image @ text.T
    results = {weight: {"rerank_top_k": top_k, "clip_weight": weight} for weight in clip_weights}
    for direction, matrix, query_is_image in (("i2t", similarity, True), ("t2i", similarity.T, False)):
        clip_rank, top, probabilities = _top_k_scores(matrix, query_is_image, scorer, top_k)
        clip_logits = matrix.gather(1, top) * (logit_scale or 0.0)
        for weight in clip_weights:
            reranked = _reranked_ranks(clip_rank, top, fused_rerank_scores(probabilities, clip_logits, weight))
            for k in ks:
                results[weight][f"clip_{direction}_R@{k}"] = 100.0 * float((clip_rank <= k).double().mean())
                results[weight][f"rerank_{direction}_R@{k}"] = 100.0 * float((reranked <= k).double().mean())
    return results


def rerank_recalls(
    scorer: PairScorer,
    image_embeds,
    text_embeds,
    top_k: int = 10,
    ks=(1, 5, 10),
    clip_weight: float | None = None,
    logit_scale: float | None = None,
) -> dict:
    """R@K (percent) of the CLIP order and after GI-ITM reranks each query's CLIP top-`top_k`, both directions.

    Keys: `clip_{i2t,t2i}_R@K`, `rerank_{i2t,t2i}_R@K`, `rerank_top_k` and `clip_weight`. A positive outside the
    top-k keeps its CLIP rank. `text_embeds` may be explanation-fused (the first stage then uses the explanations too).
    `clip_weight`: see `fused_rerank_scores` (None: reorder by GI-ITM's probability alone).
    """
    return rerank_recalls_by_clip_weight(scorer, image_embeds, text_embeds, [clip_weight], top_k, ks, logit_scale)[
        clip_weight
    ]
