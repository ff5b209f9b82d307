"""Approximate nearest-neighbour indexes (FAISS IVF-flat, IVF-PQ, HNSW) over an embedding file, with known recall.

Exact search costs N x D per query; past about a million items a FAISS approximate index answers many times faster
for a small loss of recall. Each index here is built on the L2-normalised gallery (inner product = cosine, as
`EmbeddingIndex` ranks), trained on a random sample of it, and saved beside the embedding file as
``<embeddings>.<type>.faiss`` plus a JSON sidecar (``.faiss.json``) with the options, the gallery's shape and a few
of its rows: loading checks that the index belongs to that embedding file.

The search-time knob (``nprobe`` for IVF, ``ef_search`` for HNSW) defaults to ``None``: the index is then *tuned*
at build time to reach ``target_recall`` (0.95) of recall@10 against exact search on sample queries drawn from the
gallery (each row's own hit left out; for HNSW, rows held out of the graph), with a margin of 0.01 for the
sample's noise: the knob doubles, then bisects, to the smallest value that does. The value found is saved with the
index and reported; give it explicitly to trade recall for speed. IVF-PQ re-ranks its candidates with the exact vectors
(``refine_factor`` x k of them): the compressed codes only shortlist. The exact vectors are the gallery array the index
was built or loaded with (``EmbeddingIndex``'s own, not a copy), so IVF-PQ adds only its codes to memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf-flat", "ivf-pq", "hnsw")
APPROXIMATE_INDEX_TYPES = INDEX_TYPES[1:]
ANN_FORMAT = "entityclip-ann/1"
DEFAULT_TARGET_RECALL = 0.95
# FAISS warns below 39 training points per centroid (k-means gets unstable); we refuse below it.
MIN_POINTS_PER_CENTROID = 39
PQ_CENTROIDS = 256  # 8-bit codes
TUNING_QUERIES = 256  # sample queries the search knob is tuned on
TUNING_MARGIN = 0.01  # tuned to target_recall + this on the sample
MAX_REFINE_FACTOR = 256  # IVF-PQ re-ranks at most 256 k candidates when tuning


@dataclass
class AnnOptions:
    """How an approximate index is built and searched. ``None`` means: chosen from the gallery size (or tuned)."""

    index_type: str = "ivf-flat"
    nlist: int | None = None  # IVF lists; default ~4 sqrt(N) (a power of two), at least 39 training points each
    nprobe: int | None = None  # IVF lists visited per query; None: tuned to target_recall
    pq_m: int | None = None  # IVF-PQ sub-quantisers; default D/4 (must divide D): 16x smaller than float32
    refine_factor: int = 4  # IVF-PQ: exact re-ranking of refine_factor * k candidates
    hnsw_m: int = 32  # HNSW neighbours per node
    ef_construction: int = 80  # HNSW build effort
    ef_search: int | None = None  # HNSW search effort; None: tuned to target_recall
    train_size: int | None = None  # IVF training sample; default min(N, 32 * nlist), at least 39 per centroid
    train_iterations: int = 10  # k-means iterations of the IVF training (FAISS's default is 25; 10 is near it)
    target_recall: float = DEFAULT_TARGET_RECALL
    seed: int = 0
    threads: int | None = None  # FAISS threads (None: FAISS's default, all cores)
    tuned: dict[str, Any] = field(default_factory=dict)  # what tuning found: knob, recall on the sample

    def check(self, num_rows: int, dim: int) -> AnnOptions:
        """Validated options with the defaults filled in for a gallery of ``num_rows`` x ``dim``."""
        if self.index_type not in APPROXIMATE_INDEX_TYPES:
            raise ValueError(f"unknown index type {self.index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        options = AnnOptions(**{**asdict(self), "tuned": dict(self.tuned)})
        foreign = {
            "hnsw": ("nlist", "nprobe", "pq_m", "train_size"),
            "ivf-flat": ("ef_search", "pq_m"),
            "ivf-pq": ("ef_search",),
        }[options.index_type]
        given = [name for name in foreign if getattr(options, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} do(es) not apply to a {options.index_type} index")
        if options.index_type == "hnsw":
            _positive("hnsw_m", options.hnsw_m)
            _positive("ef_construction", options.ef_construction)
            if options.ef_search is not None:
                _positive("ef_search", options.ef_search)
            return options
        if options.nlist is None:
            options.nlist = default_nlist(num_rows)
        _positive("nlist", options.nlist)
        if options.nprobe is not None:
            _positive("nprobe", options.nprobe)
            if options.nprobe > options.nlist:
                raise ValueError(
                    f"nprobe ({options.nprobe}) cannot exceed nlist ({options.nlist}): there are no more lists"
                )
        needed = MIN_POINTS_PER_CENTROID * options.nlist
        if options.index_type == "ivf-pq":
            if options.pq_m is None:
                options.pq_m = _default_pq_m(dim)
            _positive("pq_m", options.pq_m)
            if dim % options.pq_m:
                raise ValueError(f"pq_m ({options.pq_m}) must divide the dimension ({dim})")
            _positive("refine_factor", options.refine_factor)
            needed = max(needed, MIN_POINTS_PER_CENTROID * PQ_CENTROIDS)
        _positive("train_iterations", options.train_iterations)
        if options.train_size is None:
            options.train_size = min(num_rows, max(needed, 32 * options.nlist))
        _positive("train_size", options.train_size)
        if options.train_size > num_rows:
            raise ValueError(f"train_size ({options.train_size}) exceeds the gallery ({num_rows} rows)")
        if options.train_size < needed:
            what = f"nlist={options.nlist} lists" + (
                f" and {PQ_CENTROIDS} PQ centroids" if options.index_type == "ivf-pq" else ""
            )
            raise ValueError(
                f"training sample too small: {options.train_size} vectors for {what} needs at least {needed} "
                f"({MIN_POINTS_PER_CENTROID} per centroid); lower nlist, raise train_size, or use 'flat' / 'hnsw' "
                f"for a gallery of {num_rows}"
            )
        return options


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def default_nlist(num_rows: int) -> int:
    """~4 sqrt(N) lists, a power of two, and never fewer than 39 training points per list."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(num_rows))))
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > num_rows:
        nlist //= 2
    return nlist


def _default_pq_m(dim: int) -> int:
    # 4 dimensions per sub-quantiser (128 bytes per 512-d vector): with 8 per sub-quantiser the codes shortlist too
    # coarsely to reach recall 0.95 on unstructured data even after re-ranking 256 k candidates (bench_ann.py).
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("approximate search needs the faiss package: pip install 'entityclip-hf[faiss]'") from error
    return faiss


PROBE_ROWS = 32


def gallery_probe(vectors: np.ndarray) -> dict[str, Any]:
    """A few evenly spaced rows of the gallery, kept in the index's sidecar to recognise the gallery on load.

    Compared with a tolerance (not a hash): normalising an already normalised file again moves the last bits, a
    re-encoded or reordered gallery moves everything.
    """
    rows = np.unique(np.linspace(0, vectors.shape[0] - 1, num=min(vectors.shape[0], PROBE_ROWS)).astype(np.int64))
    values = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    return {"rows": rows.tolist(), "values": base64.b64encode(values.tobytes()).decode("ascii")}


def probe_matches(probe: dict[str, Any], vectors: np.ndarray, tolerance: float = 1e-4) -> bool:
    rows = np.asarray(probe["rows"], dtype=np.int64)
    if rows.size and rows.max() >= vectors.shape[0]:
        return False
    saved = np.frombuffer(base64.b64decode(probe["values"]), dtype=np.float32).reshape(len(rows), -1)
    return saved.shape[1] == vectors.shape[1] and bool(np.allclose(saved, vectors[rows], atol=tolerance, rtol=0))


class ApproximateIndex:
    """A FAISS IVF-flat, IVF-PQ or HNSW index over normalised vectors, searched by inner product.

    Build with ``ApproximateIndex.build(vectors, AnnOptions(...))``; ``search(queries, k)`` returns
    ``(scores, rows)`` as numpy arrays; ``save(path)`` / ``load(path, vectors)`` keep it beside an embedding file.
    """

    def __init__(
        self,
        index,
        options: AnnOptions,
        num_rows: int,
        dim: int,
        probe: dict[str, Any],
        build_seconds: float,
        vectors: np.ndarray | None = None,
    ):
        self.index = index
        self.options = options
        self.num_rows = num_rows
        self.dim = dim
        self.probe = probe
        self.build_seconds = build_seconds
        # IVF-PQ's exact re-ranking reads the caller's gallery array (a reference, never a copy: faiss's
        # IndexRefineFlat would store the vectors a second time, as large as the gallery itself).
        self.vectors = vectors if options.index_type == "ivf-pq" else None
        if self.vectors is not None and self.vectors.shape != (num_rows, dim):
            raise ValueError(f"re-ranking vectors have shape {self.vectors.shape}, the index {(num_rows, dim)}")

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, vectors: np.ndarray, options: AnnOptions) -> ApproximateIndex:
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        num_rows, dim = vectors.shape
        options = options.check(num_rows, dim)
        if options.threads is not None:
            faiss.omp_set_num_threads(options.threads)
        started = time.perf_counter()
        metric = faiss.METRIC_INNER_PRODUCT
        held_out = np.zeros(0, dtype=np.int64)
        if options.index_type == "hnsw":
            graph = faiss.IndexHNSWFlat(dim, options.hnsw_m, metric)
            graph.hnsw.efConstruction = options.ef_construction
            index = faiss.IndexIDMap(graph)  # rows go in out of order (below): the map keeps their numbers
            if options.ef_search is None and num_rows > 4 * TUNING_QUERIES:
                # A gallery row searched for in a graph that holds it is found through its own links, which
                # flatters recall (0.99 measured vs 0.93 on fresh queries): tune on rows not in the graph yet.
                rng = np.random.default_rng(options.seed + 1)
                held_out = np.sort(rng.choice(num_rows, size=TUNING_QUERIES, replace=False))
            kept = np.setdiff1d(np.arange(num_rows, dtype=np.int64), held_out)
            index.add_with_ids(vectors[kept] if held_out.size else vectors, kept)
        else:
            quantizer = faiss.IndexFlatIP(dim)
            if options.index_type == "ivf-flat":
                index = faiss.IndexIVFFlat(quantizer, dim, options.nlist, metric)
            else:
                index = faiss.IndexIVFPQ(quantizer, dim, options.nlist, options.pq_m, 8, metric)
            index.cp.seed = options.seed
            index.cp.niter = options.train_iterations
            sample = np.random.default_rng(options.seed).choice(num_rows, size=options.train_size, replace=False)
            index.train(vectors[np.sort(sample)])
            index.add(vectors)
        built = cls(index, options, num_rows, dim, gallery_probe(vectors), time.perf_counter() - started, vectors)
        built._set_search_knob()
        if getattr(options, built.knob_name) is None:
            built.tune(vectors, held_out=held_out if held_out.size else None)
        if held_out.size:
            index.add_with_ids(vectors[held_out], held_out)
        return built

    @property
    def knob_name(self) -> str:
        return "ef_search" if self.options.index_type == "hnsw" else "nprobe"

    def _ivf(self):
        return _faiss().extract_index_ivf(self.index)

    def _hnsw(self):
        faiss = _faiss()
        graph = self.index
        if isinstance(graph, faiss.IndexIDMap):
            graph = faiss.downcast_index(graph.index)
        return graph.hnsw

    def _set_search_knob(self, value: int | None = None) -> None:
        if self.options.index_type == "hnsw":
            self._hnsw().efSearch = value or self.options.ef_search or 16
        else:
            self._ivf().nprobe = value or self.options.nprobe or 1

    def tune(
        self, vectors: np.ndarray, sample_queries: int = TUNING_QUERIES, k: int = 10, held_out: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Find the smallest knob (nprobe / ef_search) whose recall@k on sample queries reaches the target.

        The queries are gallery rows (a seeded sample); each one's own row is left out of both result lists, so the
        measure is the recall of its k true neighbours. With ``held_out`` (rows not added to the index yet, as
        HNSW's build does) those rows are the queries, and none of them counts as a neighbour. The knob doubles
        until the target is reached, then a bisection finds the smallest value that still reaches it. For IVF-PQ, nprobe is found with the widest
        re-ranking (256 k candidates), then ``refine_factor`` doubles from its value until the target holds again.
        """
        if held_out is None:
            rng = np.random.default_rng(self.options.seed + 1)
            rows = rng.choice(self.num_rows, size=min(sample_queries, self.num_rows), replace=False)
            excluded = [{own} for own in rows.tolist()]
        else:
            rows = np.asarray(held_out, dtype=np.int64)
            excluded = [set(rows.tolist())] * len(rows)
        queries = vectors[rows]
        depth = min(k + (1 if held_out is None else len(rows)), self.num_rows)
        started = time.perf_counter()
        exact = _exact_top(vectors, queries, depth)
        exact_seconds = time.perf_counter() - started
        truth = [set([r for r in row.tolist() if r not in skip][:k]) for row, skip in zip(exact, excluded, strict=True)]
        search_depth = min(k + 1, self.num_rows)

        def recall_of(found: np.ndarray) -> float:
            shares = [
                len(t & set([r for r in f.tolist() if r not in skip][:k])) / max(1, len(t))
                for t, f, skip in zip(truth, found, excluded, strict=True)
            ]
            return float(np.mean(shares))

        seconds_at = {}  # knob value -> seconds the sample's search took there (the final setting's is reported)

        def timed_search(refine: int | None) -> tuple[np.ndarray, float]:
            started = time.perf_counter()
            found = self._search(queries, search_depth, refine)[1]
            return found, time.perf_counter() - started

        def recall_with(value: int) -> float:
            self._set_search_knob(value)
            found, seconds_at[value] = timed_search(refine_factor)
            return recall_of(found)

        hnsw = self.options.index_type == "hnsw"
        # HNSW's limit is the gallery: a candidate list that long searches every row the graph reaches. Unstructured
        # galleries need a lot of it (efSearch ~2,400 at 100k, ~5,000 at 200k, ~25,000 at 1M random 512-d points
        # for recall@10 0.95, bench_ann.py), where exact search is faster; the warning below says so.
        start, limit = (16, max(16, self.num_rows)) if hnsw else (1, self.options.nlist)
        # The sample's recall is an estimate (256 queries x 10 neighbours: ~0.005 of noise), and the queries a user
        # sends are not the sample: aim a margin above the target so that fresh queries reach it (bench_ann.py).
        target = min(1.0, self.options.target_recall + TUNING_MARGIN)
        pq = self.options.index_type == "ivf-pq"
        # IVF-PQ phase 1: the lists to visit, with the widest re-ranking (so the codes do not limit recall)
        refine_factor = MAX_REFINE_FACTOR if pq else None
        value, recall = start, recall_with(start)
        low = start
        while recall < target and value < limit:
            low, value = value, min(limit, value * 2)
            recall = recall_with(value)
        if recall >= target and value > start:  # bisect between the last miss and the first hit
            while value - low > max(1, low // 16):
                middle = (low + value) // 2
                middle_recall = recall_with(middle)
                if middle_recall >= target:
                    value, recall = middle, middle_recall
                else:
                    low = middle
        if pq:  # phase 2: the narrowest re-ranking (from refine_factor up) that keeps the target at that nprobe
            self._set_search_knob(value)
            factor = self.options.refine_factor
            while factor < MAX_REFINE_FACTOR:
                found, seconds = timed_search(factor)
                factor_recall = recall_of(found)
                if factor_recall >= min(target, recall):
                    recall, seconds_at[value] = factor_recall, seconds
                    break
                factor *= 2
            self.options.refine_factor = min(factor, MAX_REFINE_FACTOR)
        self._set_search_knob(value)
        setattr(self.options, self.knob_name, value)
        search_seconds = seconds_at[value]
        self.options.tuned = {
            self.knob_name: value,
            f"sample_recall_at_{k}": round(recall, 4),
            "sample_queries": len(rows),
            # Both timed on the sample in one batch: the approximate search at the tuned knob, and the exact top-k
            # (numpy, blocked) the recall was measured against.
            "seconds_per_query": round(search_seconds / len(rows), 6),
            "exact_seconds_per_query": round(exact_seconds / len(rows), 6),
        }
        if self.options.index_type == "ivf-pq":
            self.options.tuned["refine_factor"] = self.options.refine_factor
        if recall < self.options.target_recall:
            logger.warning(
                "%s: recall@%d %.3f < target %.2f even at %s=%d (the most there is); consider another index type",
                self.options.index_type, k, recall, self.options.target_recall, self.knob_name, value,
            )  # fmt: skip
        else:
            logger.info(
                "%s tuned: %s=%d gives recall@%d %.3f on %d sample queries",
                self.options.index_type, self.knob_name, value, k, recall, len(rows),
            )  # fmt: skip
        if search_seconds > exact_seconds:
            # Unstructured embeddings (or a gallery this small) leave an approximate index nothing to skip.
            logger.warning(
                "%s at %s=%d answered the sample %.1fx slower than exact search (%.2g vs %.2g s per query in a batch): "
                "the flat index is the better choice for this gallery",
                self.options.index_type, self.knob_name, value, search_seconds / max(exact_seconds, 1e-12),
                search_seconds / len(rows), exact_seconds / len(rows),
            )  # fmt: skip
        return self.options.tuned

    def set_search_options(
        self, nprobe: int | None = None, ef_search: int | None = None, refine_factor: int | None = None
    ) -> None:
        """Change the search-time knobs of a built or loaded index (IVF-PQ's re-ranking depth is one of them)."""
        if refine_factor is not None:
            if self.options.index_type != "ivf-pq":
                raise ValueError(f"refine_factor applies to IVF-PQ indexes, not {self.options.index_type}")
            _positive("refine_factor", refine_factor)
            self.options.refine_factor = refine_factor
        if self.options.index_type == "hnsw":
            if nprobe is not None:
                raise ValueError("nprobe applies to IVF indexes; an HNSW index takes ef_search")
            if ef_search is not None:
                _positive("ef_search", ef_search)
                self.options.ef_search = ef_search
        else:
            if ef_search is not None:
                raise ValueError(f"ef_search applies to HNSW indexes; an {self.options.index_type} index takes nprobe")
            if nprobe is not None:
                _positive("nprobe", nprobe)
                if nprobe > self.options.nlist:
                    raise ValueError(f"nprobe ({nprobe}) cannot exceed nlist ({self.options.nlist})")
                self.options.nprobe = nprobe
        self._set_search_knob()

    # ---------------------------------------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [Q, k], rows [Q, k])`` by inner product, best first; rows are -1 where fewer than k were found."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {queries.shape}")
        return self._search(queries, k)

    def _search(self, queries: np.ndarray, k: int, refine_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self.vectors is None:
            return self.index.search(queries, k)
        # IVF-PQ: the codes shortlist refine_factor * k candidates, exact inner products on the gallery rank them.
        depth = min(self.num_rows, k * (refine_factor or self.options.refine_factor))
        candidates = np.ascontiguousarray(self.index.search(queries, depth)[1], dtype=np.int64)
        return rerank_exactly(self.vectors, queries, candidates, k)

    def memory_bytes(self) -> int:
        """Size of the FAISS index as it serialises (what it holds in memory, give or take its graph slack).

        IVF-PQ's re-ranking vectors are not counted: they are the gallery's, held by the caller already.
        """
        return int(_faiss().serialize_index(self.index).nbytes)

    # ---------------------------------------------------------------------------------------------- files
    @staticmethod
    def path_for(embeddings_path: str | os.PathLike, index_type: str) -> Path:
        """Where the index of ``index_type`` for an embedding file lives: ``<file>.<type>.faiss``."""
        embeddings_path = Path(embeddings_path)
        return embeddings_path.with_name(f"{embeddings_path.name}.{index_type}.faiss")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index and its sidecar (``<path>.json``) atomically; the sidecar last, so it names a whole index."""
        faiss = _faiss()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = faiss.serialize_index(self.index)
        _atomic_write_bytes(path, data.tobytes())
        meta = {
            "format": ANN_FORMAT,
            "index_type": self.options.index_type,
            "options": asdict(self.options),
            "num_rows": self.num_rows,
            "dim": self.dim,
            "probe": self.probe,
            "index_sha256": hashlib.sha256(data.tobytes()).hexdigest(),
            "build_seconds": round(self.build_seconds, 3),
            "faiss_version": getattr(faiss, "__version__", "unknown"),
        }
        _atomic_write_bytes(_meta_path(path), json.dumps(meta, indent=1).encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, vectors: np.ndarray) -> ApproximateIndex:
        """Read an index saved by ``save`` for the gallery ``vectors`` (normalised as it was built); checks it fits."""
        faiss = _faiss()
        path = Path(path)
        meta_path = _meta_path(path)
        if not path.is_file() or not meta_path.is_file():
            raise FileNotFoundError(f"no saved index at {path} (with its sidecar {meta_path.name})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"{meta_path}: not valid JSON ({error})") from None
        if meta.get("format") != ANN_FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, this version reads {ANN_FORMAT!r}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["index_sha256"]:
            raise ValueError(f"{path} does not match its sidecar {meta_path.name} (checksum): rebuild the index")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if (meta["num_rows"], meta["dim"]) != vectors.shape or not probe_matches(meta["probe"], vectors):
            what = "other rows" if (meta["num_rows"], meta["dim"]) == vectors.shape else "another shape"
            raise ValueError(
                f"{path} was built for another gallery ({meta['num_rows']} x {meta['dim']}) than this one "
                f"({vectors.shape[0]} x {vectors.shape[1]}, {what}): the embeddings changed since; rebuild the index"
            )
        options = AnnOptions(**meta["options"])
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        loaded = cls(index, options, vectors.shape[0], vectors.shape[1], meta["probe"], meta["build_seconds"], vectors)
        loaded._set_search_knob()
        return loaded


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _exact_top(vectors: np.ndarray, queries: np.ndarray, k: int, block: int = 65536) -> np.ndarray:
    """Exact top-k rows by inner product, the gallery scanned in blocks (memory Q x block)."""
    best_scores = np.full((queries.shape[0], 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((queries.shape[0], 0), dtype=np.int64)
    for start in range(0, vectors.shape[0], block):
        scores = queries @ vectors[start : start + block].T
        take = min(k, scores.shape[1])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        best_rows = np.concatenate([best_rows, top + start], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, keep, axis=1)
        best_rows = np.take_along_axis(best_rows, keep, axis=1)
    return best_rows


def rerank_exactly(
    vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's ``candidates`` (rows of ``vectors``; -1 pads the end) by exact inner product.

    ``(scores [Q, k], rows [Q, k])``, best first, rows -1 where a query had fewer than k candidates. FAISS's
    ``knn_inner_products_by_idx`` reads the candidate rows in place, so nothing of the gallery is copied.
    """
    faiss = _faiss()
    num_queries, subset = candidates.shape
    scores = np.empty((num_queries, k), dtype=np.float32)
    rows = np.empty((num_queries, k), dtype=np.int64)
    faiss.knn_inner_products_by_idx(
        faiss.swig_ptr(queries), faiss.swig_ptr(vectors), faiss.swig_ptr(candidates),
        vectors.shape[1], num_queries, vectors.shape[0], subset, k,
        faiss.swig_ptr(scores), faiss.swig_ptr(rows), subset,  # the stride: FAISS's default (-1) is wrong here
    )  # fmt: skip
    return scores, rows


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The exact top-k rows of each query (inner product): the ground truth recall is measured against."""
    return _exact_top(
        np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(queries, dtype=np.float32), k
    )


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k (``truth`` [Q, k]) among its found top-k (``found`` [Q, k])."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth, strict=True)]))
