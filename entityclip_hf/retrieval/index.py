"""Search: `EmbeddingIndex` over an embedding matrix (exact, FAISS flat, or approximate FAISS indexes)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..ann_index import APPROXIMATE_INDEX_TYPES, INDEX_TYPES, AnnOptions, ApproximateIndex
from .embeddings import _EMBEDDINGS_KEY, _as_matrix, _check_ids, load_embeddings, save_embeddings
from .encode import _check_positive_int

logger = logging.getLogger(__name__)


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
            IVF-PQ re-ranks its shortlist with exact inner products on this index's `embeddings` (not a copy: it
            adds only its codes to memory, when `device` is the CPU).
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
        # On CPU this is the gallery tensor's own memory: IVF-PQ re-ranks against it instead of keeping a copy.
        vectors = self.embeddings.cpu().numpy()
        if saved is not None:
            loaded = ApproximateIndex.load(saved, vectors)
            search_knobs = {"nprobe", "ef_search", "refine_factor", "threads"}
            differing = {
                name: value for name, value in ann_options.items()
                if name not in search_knobs and value is not None and getattr(loaded.options, name) != value
            }  # fmt: skip
            if not differing:
                loaded.set_search_options(
                    ann_options.get("nprobe"), ann_options.get("ef_search"), ann_options.get("refine_factor")
                )
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
