"""Image-text retrieval metrics with the paper's protocol, computed in chunks so that galleries of millions fit.

Protocol (the released EntityCLIP evaluation): the whole split is ONE gallery and query ``i``'s only positive is
item ``i`` of the other modality (image ``i`` <-> text ``i``). Both directions are scored: image->text (``i2t_``)
and text->image (``t2i_``), with R@1/5/10/50/100 (percent), the median and the mean rank (1-based), and ``rsum``
(R@1 + R@5 + R@10 of both directions).

Ties count AGAINST the query: the rank of a positive is ``1 + the number of OTHER gallery items scored >= it``.
With optimistic tie-breaking a collapsed model whose embeddings are all equal would score R@1 = 100 %, and with
arbitrary tie-breaking (an ``argsort``, as the released code) its score depends on how the sort orders equal values;
here it scores rank N for every query. A NaN score also counts against the query.

"Tied" allows for rounding: float32 matrix products (MKL on CPU, cuBLAS on GPU) round the SAME dot product
differently depending on the matrix shape and on the entry's position in it, so duplicate images or captions (news
galleries have them) and a collapsed model give scores that differ in their last bits. An item therefore ties with
the positive when ``score >= positive - tie_tolerance * max(1, |positive|)``; the default ``1e-6`` is 5x the
rounding differences measured on 512-d cosines (up to 2e-7) and far below the gaps between distinct scores.
``tie_tolerance=0`` compares exactly.

The similarity is the cosine (``normalize=True``, as the released code) or the raw dot product. The N x N
similarity matrix is never materialised: queries are processed in blocks of ``chunk_size`` against the gallery in
blocks of ``chunk_size``, and each block only COUNTS, per query, how many items score below its positive (O(N) per
query instead of the O(N log N) of sorting the row). One block of scores serves both directions (its rows are
image queries, its columns text queries), so the full protocol costs exactly one N x N x D matrix product.

``evaluate`` users load the same computation with ``evaluate.load(RETRIEVAL_METRIC_PATH)`` (offline).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_TIE_TOLERANCE",
    "RETRIEVAL_METRIC_PATH",
    "RetrievalRanks",
    "metrics_from_ranks",
    "naive_retrieval_ranks",
    "ranks_of_positives",
    "retrieval_metrics",
]

#: Folder of the ``evaluate`` module computing :func:`retrieval_metrics`: ``evaluate.load(RETRIEVAL_METRIC_PATH)``.
RETRIEVAL_METRIC_PATH = str(Path(__file__).resolve().parent / "entity_retrieval")

#: The paper's recall cut-offs.
DEFAULT_KS = (1, 5, 10, 50, 100)

#: Scores this close below the positive (relative above 1) tie with it; see the module docstring.
DEFAULT_TIE_TOLERANCE = 1e-6

# rsum is defined on these cut-offs whatever ``ks`` asks for.
_RSUM_KS = (1, 5, 10)

# Counting trick (see _count_true): 8 bools are read as one int64, and at most 127 such words are added together so
# that each byte (a count of at most 127) never carries into its neighbour and the int64 never overflows.
_BOOLS_PER_WORD = 8
_MAX_WORDS_PER_SUM = 127

# Rows per slice when checking inputs for NaN/inf (a 16384 x 512 boolean mask is 8 MB).
_FINITE_CHECK_ROWS = 16384


class RetrievalRanks(NamedTuple):
    """1-based rank of each query's positive, per direction (int64 CPU tensors of length N)."""

    i2t: torch.Tensor
    """``i2t[i]``: rank of text ``i`` among all texts for image query ``i``."""
    t2i: torch.Tensor
    """``t2i[j]``: rank of image ``j`` among all images for text query ``j``."""


def retrieval_metrics(
    image_embeds: Any,
    text_embeds: Any,
    chunk_size: int = 4096,
    ks: Iterable[int] = DEFAULT_KS,
    normalize: bool = True,
    device: str | torch.device | None = None,
    progress: bool = False,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
    explanation_embeds: Any = None,
    explanation_weight: float = 0.5,
) -> dict[str, float]:
    """Compute the paper's retrieval metrics (R@K, median/mean rank, rsum) for paired image/text embeddings.

    Args:
        image_embeds: ``[N, D]`` image embeddings (torch tensor on any device, or numpy array), float32, float16,
            bfloat16 or float64. Row ``i`` pairs with row ``i`` of ``text_embeds``.
        text_embeds: ``[N, D]`` text embeddings, same conventions.
        chunk_size: rows per block on both sides; peak working memory is about ``5 * chunk_size**2`` bytes of
            scores and masks plus ``20 * N`` bytes of counters (~100 MB at the default), whatever N.
        ks: recall cut-offs. R@K with K >= N is 100 (every positive ranks within N).
        normalize: score by cosine similarity (L2-normalised embeddings, as the paper) instead of the dot product.
        device: where the matrix products run; defaults to the device of ``image_embeds``. Inputs are moved there
            once in their own dtype and blocks are computed in float32 (float64 for float64 inputs).
        progress: show a progress bar over query blocks (useful for galleries of millions).
        tie_tolerance: items scoring within ``tie_tolerance * max(1, |positive|)`` below the positive tie with it
            (and ties count against the query); 0 compares exactly. See the module docstring for why.
        explanation_embeds: optional ``[N, D]`` embeddings of each text's explanation (a NaN row: none). Given,
            the texts are scored as ``entityclip_hf.retrieval.fuse_explanation_embeddings(text, explanation,
            explanation_weight)`` in both directions (explanation-aware retrieval; the paper uses the text alone).
        explanation_weight: the weight of the explanation in that fusion, in [0, 1].

    Returns:
        ``{"i2t_R@1": ..., ..., "i2t_median_rank": ..., "i2t_mean_rank": ..., "t2i_R@1": ..., ..., "rsum": ...}``:
        recalls in percent (0-100), ranks 1-based; ``median_rank`` is the floor of the median, as the released code.
    """
    ks = _validate_ks(ks)
    if explanation_embeds is not None:
        from ..retrieval import fuse_explanation_embeddings

        text_embeds = fuse_explanation_embeddings(_as_tensor(text_embeds, "text_embeds"),
                                                  _as_tensor(explanation_embeds, "explanation_embeds"),
                                                  explanation_weight)  # fmt: skip
    ranks = ranks_of_positives(
        image_embeds,
        text_embeds,
        chunk_size=chunk_size,
        normalize=normalize,
        device=device,
        progress=progress,
        tie_tolerance=tie_tolerance,
    )
    return metrics_from_ranks(ranks, ks=ks)


def ranks_of_positives(
    image_embeds: Any,
    text_embeds: Any,
    chunk_size: int = 4096,
    normalize: bool = True,
    device: str | torch.device | None = None,
    progress: bool = False,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
) -> RetrievalRanks:
    """Rank every query's positive in the whole gallery, both directions, in bounded memory.

    Same arguments as :func:`retrieval_metrics`. Returns :class:`RetrievalRanks` (1-based, ties pessimistic), e.g.
    to find the failures (``ranks.i2t > 10``) or to compute other statistics.
    """
    counter = _PositiveRankCounter(
        image_embeds,
        text_embeds,
        chunk_size=chunk_size,
        normalize=normalize,
        device=device,
        tie_tolerance=tie_tolerance,
    )
    counter.count_diagonal_blocks()
    strips = counter.block_starts
    if progress:
        from tqdm.auto import tqdm

        strips = tqdm(strips, desc="retrieval ranks", unit="block")
    for start in strips:
        counter.count_off_diagonal_strip(start)
    return counter.ranks()


def metrics_from_ranks(ranks: RetrievalRanks, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Turn 1-based per-query ranks (both directions) into the metric dict of :func:`retrieval_metrics`."""
    ks = _validate_ks(ks)
    metrics: dict[str, float] = {}
    rsum = 0.0
    for direction in ("i2t", "t2i"):
        direction_ranks = getattr(ranks, direction)
        if not isinstance(direction_ranks, torch.Tensor) or direction_ranks.ndim != 1 or direction_ranks.numel() == 0:
            raise ValueError(f"ranks.{direction} must be a non-empty 1-D tensor of 1-based ranks")
        direction_ranks = direction_ranks.detach().to("cpu", torch.int64)
        for k in ks:
            metrics[f"{direction}_R@{k}"] = _recall_at(direction_ranks, k)
        metrics[f"{direction}_median_rank"] = _floor_median(direction_ranks)
        metrics[f"{direction}_mean_rank"] = direction_ranks.double().mean().item()
        rsum += sum(_recall_at(direction_ranks, k) for k in _RSUM_KS)
    metrics["rsum"] = rsum
    return metrics


def naive_retrieval_ranks(
    image_embeds: Any, text_embeds: Any, normalize: bool = True, tie_tolerance: float = DEFAULT_TIE_TOLERANCE
) -> RetrievalRanks:
    """Reference ranks from the full N x N similarity matrix and a sort of every row (tests and benchmarks only).

    Same definition as :func:`ranks_of_positives`, computed the way most code does it (whole matrix, sorted rows).
    Needs ~20 * N**2 bytes (scores, a transposed copy, sorted scores, int64 sort indices): 2 GB at N = 10k, 200 GB
    at N = 100k.
    """
    tie_tolerance = _validate_tie_tolerance(tie_tolerance)
    image, text = _validated_pair(image_embeds, text_embeds)
    compute_dtype = _compute_dtype(image, text)
    image = _prepare_block(image, compute_dtype, normalize)
    text = _prepare_block(text, compute_dtype, normalize)
    scores = image @ text.T
    thresholds = _tie_thresholds(scores.diagonal(), tie_tolerance)

    def pessimistic_ranks(rows: torch.Tensor) -> torch.Tensor:
        # Items at or above the threshold (the positive, its ties, better items) form the tail of the ascending
        # sorted row; its length is the rank. Sorting puts NaN scores last, so they count against the query too.
        ordered = torch.sort(rows, dim=1).values
        first_not_below = torch.searchsorted(ordered, thresholds[:, None], side="left").squeeze(1)
        ranks = rows.shape[1] - first_not_below
        return torch.where(thresholds.isnan(), rows.shape[1], ranks)

    return RetrievalRanks(i2t=pessimistic_ranks(scores).cpu(), t2i=pessimistic_ranks(scores.T.contiguous()).cpu())


class _PositiveRankCounter:
    """Blockwise state of :func:`ranks_of_positives`: the positives' scores and, per query, how many score below.

    ``scores[i, j] = similarity(image i, text j)`` and ``threshold[i] = scores[i, i] - tolerance`` (see
    :func:`_tie_thresholds`). For image query ``i`` the rank of its positive is
    ``N - #{j != i : scores[i, j] < threshold[i]}``; for text query ``j`` it is
    ``N - #{i != j : scores[i, j] < threshold[j]}``. Counting "below" instead of "at or above" makes ties and NaNs
    count against the query. The positives' scores are taken from the diagonal of the block products themselves, so
    the positive is never counted below its own threshold.

    Split in two public steps so that the benchmark can time one strip and extrapolate: first
    :meth:`count_diagonal_blocks` (all positives, and the counts within the diagonal blocks), then
    :meth:`count_off_diagonal_strip` for each block of image queries (its rows against every other text block).
    """

    def __init__(
        self,
        image_embeds: Any,
        text_embeds: Any,
        chunk_size: int = 4096,
        normalize: bool = True,
        device: str | torch.device | None = None,
        tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
    ) -> None:
        self.tie_tolerance = _validate_tie_tolerance(tie_tolerance)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        chunk_size = int(chunk_size)
        image, text = _validated_pair(image_embeds, text_embeds)
        device = torch.device(device) if device is not None else image.device
        # Move once in the storage dtype (a float16 gallery stays half the size); blocks are upcast one at a time.
        self.image = image.to(device)
        self.text = text.to(device)
        self.device = device
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.num_items = image.shape[0]
        self.compute_dtype = _compute_dtype(image, text)
        self.block_starts = list(range(0, self.num_items, chunk_size))
        self.thresholds = torch.empty(self.num_items, dtype=self.compute_dtype, device=device)
        self.i2t_below = torch.zeros(self.num_items, dtype=torch.int64, device=device)
        self.t2i_below = torch.zeros(self.num_items, dtype=torch.int64, device=device)
        self._diagonal_done = False
        # Reused buffers: allocating (and page-faulting) 80 MB per block costs a noticeable share of a block's time.
        block_elements = min(chunk_size, self.num_items) ** 2
        self._score_buffer = torch.empty(block_elements, dtype=self.compute_dtype, device=device)
        self._mask_buffer = torch.empty(block_elements, dtype=torch.bool, device=device)

    def _block(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        return _prepare_block(embeds[start : start + self.chunk_size], self.compute_dtype, self.normalize)

    def _scores(self, image_block: torch.Tensor, text_block: torch.Tensor) -> torch.Tensor:
        shape = (image_block.shape[0], text_block.shape[0])
        out = self._score_buffer[: shape[0] * shape[1]].view(shape)
        return torch.matmul(image_block, text_block.T, out=out)

    def _count(self, scores: torch.Tensor, row_start: int, col_start: int) -> None:
        rows, cols = scores.shape
        below = self._mask_buffer[: rows * cols].view(rows, cols)
        row_thresholds = self.thresholds[row_start : row_start + rows]
        col_thresholds = self.thresholds[col_start : col_start + cols]
        torch.lt(scores, row_thresholds[:, None], out=below)
        self.i2t_below[row_start : row_start + rows] += _count_true(below, dim=1)
        torch.lt(scores, col_thresholds[None, :], out=below)
        self.t2i_below[col_start : col_start + cols] += _count_true(below, dim=0)

    def count_diagonal_blocks(self) -> None:
        """Record every positive's tie threshold and count the items below it within its own diagonal block."""
        for start in self.block_starts:
            scores = self._scores(self._block(self.image, start), self._block(self.text, start))
            # Thresholds come from this very block's diagonal: the positive is never below its own threshold.
            self.thresholds[start : start + scores.shape[0]] = _tie_thresholds(scores.diagonal(), self.tie_tolerance)
            self._count(scores, start, start)
        self._diagonal_done = True

    def count_off_diagonal_strip(self, row_start: int) -> None:
        """Count, for the image block at ``row_start``, every other text block (both directions at once)."""
        if not self._diagonal_done:
            raise RuntimeError("count_diagonal_blocks() must run first: every block needs all positives' scores")
        image_block = self._block(self.image, row_start)
        for col_start in self.block_starts:
            if col_start != row_start:
                self._count(self._scores(image_block, self._block(self.text, col_start)), row_start, col_start)

    def ranks(self) -> RetrievalRanks:
        """Final 1-based ranks once the diagonal blocks and every strip have been counted."""
        return RetrievalRanks(i2t=(self.num_items - self.i2t_below).cpu(), t2i=(self.num_items - self.t2i_below).cpu())


def _tie_thresholds(positives: torch.Tensor, tie_tolerance: float) -> torch.Tensor:
    """Scores below these are strictly worse than the positive; at or above, they tie with it or beat it."""
    margin = tie_tolerance * positives.abs().clamp(min=1.0)
    # An infinite positive keeps its own value (inf - inf would be NaN and rank it last); a NaN stays NaN, and
    # nothing is below NaN, so that query ranks last: pessimistic.
    return torch.where(positives.isfinite(), positives - margin, positives)


def _validate_tie_tolerance(tie_tolerance: float) -> float:
    number = (int, float, np.integer, np.floating)
    if isinstance(tie_tolerance, bool) or not isinstance(tie_tolerance, number) or not 0 <= tie_tolerance < 1:
        raise ValueError(f"tie_tolerance must be a number in [0, 1), got {tie_tolerance!r}")
    return float(tie_tolerance)


def _count_true(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Count the True entries of a 2-D bool mask along ``dim`` (int64), ~4x faster than ``mask.sum`` on CPU.

    Why: summing bools converts every byte to an integer, which costs a quarter of the block's matrix product per
    direction on a 2-core CPU. Read as int64, each word holds 8 bools (bytes of value 0/1); adding up to 127 words adds 8 counts
    at once, one per byte, and no byte can reach 128 so none carries into its neighbour. The byte-wise partial
    counts are then summed as uint8 views. Little-endian layout makes byte ``b`` of word ``w`` column ``8w + b``.
    """
    rows, cols = mask.shape
    if mask.device.type != "cpu" or sys.byteorder != "little" or cols % _BOOLS_PER_WORD or not mask.is_contiguous():
        return mask.sum(dim=dim, dtype=torch.int64)
    words = mask.view(torch.int64)  # [rows, cols // 8]
    byte_counts = _sum_in_groups(words, dim=dim, group=_MAX_WORDS_PER_SUM)
    if dim == 1:
        return byte_counts.view(torch.uint8).sum(dim=1, dtype=torch.int64)  # [rows, groups * 8] -> [rows]
    return byte_counts.view(torch.uint8).sum(dim=0, dtype=torch.int64)  # [groups, cols] -> [cols]


def _sum_in_groups(values: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """Sum consecutive runs of at most ``group`` entries along ``dim``, keeping one entry per run."""
    size = values.shape[dim]
    whole = (size // group) * group
    parts = []
    if whole:
        parts.append(values.narrow(dim, 0, whole).unflatten(dim, (whole // group, group)).sum(dim=dim + 1))
    if size > whole:
        parts.append(values.narrow(dim, whole, size - whole).sum(dim=dim, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _recall_at(ranks: torch.Tensor, k: int) -> float:
    return 100.0 * (ranks <= k).double().mean().item()


def _floor_median(ranks: torch.Tensor) -> float:
    # The released code reports floor(median) (numpy's median averages the two middle ranks when N is even).
    ordered = torch.sort(ranks).values
    n = ordered.numel()
    middle = ordered[n // 2].item() if n % 2 else (ordered[n // 2 - 1].item() + ordered[n // 2].item()) // 2
    return float(middle)


def _validate_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one recall cut-off, e.g. (1, 5, 10)")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ks must be positive integers, got {k!r} in {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def _as_tensor(embeds: Any, name: str) -> torch.Tensor:
    if isinstance(embeds, torch.Tensor):
        tensor = embeds.detach()
    else:
        if isinstance(embeds, (list, tuple)):
            _check_row_lengths(embeds, name)
        try:
            # Nested Python lists (what evaluate hands over) are read as float32, the embeddings' own dtype.
            array = np.asarray(embeds, dtype=np.float32) if isinstance(embeds, (list, tuple)) else np.asarray(embeds)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be a torch tensor or a numpy array of shape [N, D]: {error}") from None
        if array.dtype.kind != "f":
            raise ValueError(f"{name} must hold floating point embeddings, got numpy dtype {array.dtype}")
        tensor = torch.from_numpy(array)  # shares memory: no copy of a large gallery
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must hold floating point embeddings, got dtype {tensor.dtype}")
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(tensor.shape)}")
    if tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise ValueError(
            f"{name} must hold at least one embedding of at least one dimension, got {tuple(tensor.shape)}"
        )
    return tensor


def _check_row_lengths(rows: Sequence[Any], name: str) -> None:
    # Name the first ragged row: numpy's own error ("inhomogeneous shape") does not say which one.
    if not rows or not hasattr(rows[0], "__len__"):
        return
    width = len(rows[0])
    for index, row in enumerate(rows):
        if not hasattr(row, "__len__") or len(row) != width:
            length = len(row) if hasattr(row, "__len__") else "no"
            raise ValueError(f"{name} row {index} has {length} values but row 0 has {width}")


def _validated_pair(image_embeds: Any, text_embeds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    image = _as_tensor(image_embeds, "image_embeds")
    text = _as_tensor(text_embeds, "text_embeds")
    if image.shape[0] != text.shape[0]:
        raise ValueError(
            f"image_embeds has {image.shape[0]} rows but text_embeds has {text.shape[0]}: "
            "the protocol pairs image i with text i, so both need the same N"
        )
    if image.shape[1] != text.shape[1]:
        raise ValueError(
            f"image_embeds has dimension {image.shape[1]} but text_embeds has {text.shape[1]}: "
            "both must live in the same embedding space"
        )
    for name, embeds in (("image_embeds", image), ("text_embeds", text)):
        _check_finite(embeds, name)
    return image, text


def _check_finite(embeds: torch.Tensor, name: str) -> None:
    # In slices, so that checking a 1M-row gallery does not allocate a 1M x D boolean mask.
    for start in range(0, embeds.shape[0], _FINITE_CHECK_ROWS):
        finite_rows = torch.isfinite(embeds[start : start + _FINITE_CHECK_ROWS]).all(dim=1)
        if not bool(finite_rows.all()):
            row = start + int(torch.nonzero(~finite_rows)[0, 0])
            raise ValueError(f"{name} row {row} has a non-finite value (NaN or inf)")


def _compute_dtype(*embeds: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(e.dtype == torch.float64 for e in embeds) else torch.float32


def _prepare_block(block: torch.Tensor, dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    block = block.to(dtype)
    # An all-zero embedding stays zero (similarity 0 to everything) instead of turning into NaNs.
    return F.normalize(block, dim=1) if normalize else block
