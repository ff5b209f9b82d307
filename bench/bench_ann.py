"""Approximate search vs exact: build time, queries/s, memory and recall@10 of FAISS IVF-flat, IVF-PQ and HNSW.

Two 512-d galleries, L2-normalised (cosine = inner product, as EntityCLIP retrieval ranks):
- ``random``: 1M points uniform on the sphere, queries drawn the same way. No structure at all: the hardest case
  for any approximate index (every point is nearly as far as the nearest), a floor, not what CLIP embeddings do.
- ``clustered``: 100k points from 1,000 Gaussian clusters (unit centres plus noise of norm ~1.5, so a point's cosine to
  its centre is ~0.55), queries from the same clusters: the kind of structure image/text embeddings have.

Each index is built with ``EmbeddingIndex(vectors, index_type=...)`` and the package's defaults (nlist ~4 sqrt(N),
search knob tuned at build time to recall@10 0.95 on 256 gallery-sample queries). The recall printed here is
measured on separate queries against exact search. Exact search is ``EmbeddingIndex`` with the default torch
backend (blocked matmul). Queries/s: all queries in one batch (throughput), and one query at a time (latency).

    python bench/bench_ann.py --quick        # 100k random + 20k clustered, ~2-3 minutes on 2 cores
    python bench/bench_ann.py                # 1M random + 100k clustered (the issue's sizes)
    python bench/bench_ann.py --types hnsw --datasets clustered
    python bench/bench_ann.py --datasets random --types hnsw \
        --hnsw-ef-sweep 8192 16384 32768 --queries 300 --single 20   # recall and speed at given efSearch, 1M random
"""

import argparse
import gc
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entityclip_hf.ann_index import exact_top, recall_at_k  # noqa: E402
from entityclip_hf.retrieval import EmbeddingIndex  # noqa: E402


def normalised(points: np.ndarray) -> np.ndarray:
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points


def random_sphere(count: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return normalised(rng.standard_normal((count, dim), dtype=np.float32))


def clustered(count: int, dim: int, seed: int, clusters: int = 1000, noise: float = 1.5) -> np.ndarray:
    """Points around ``clusters`` unit centres with isotropic noise of ``noise / sqrt(dim)`` per axis."""
    centres = random_sphere(clusters, dim, seed=12345)
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(0, clusters, count)]
    points += (noise / np.sqrt(dim)) * rng.standard_normal((count, dim), dtype=np.float32)
    return normalised(points)


def resident_mib() -> float:
    """The process's resident memory now (VmRSS), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # Linux: KiB


def time_queries(index: EmbeddingIndex, queries: np.ndarray, single: int) -> tuple[float, float, np.ndarray]:
    started = time.perf_counter()
    hits = index.search(queries, k=10)
    batch_qps = len(queries) / (time.perf_counter() - started)
    started = time.perf_counter()
    for row in range(single):
        index.search(queries[row : row + 1], k=10)
    single_qps = single / (time.perf_counter() - started)
    return batch_qps, single_qps, hits.indices.numpy()


def bench_dataset(
    name: str, gallery: np.ndarray, queries: np.ndarray, types: list[str], single: int, ef_sweep: list[int]
) -> list[dict]:
    rows = []
    truth = exact_top(gallery, queries, 10)
    started = time.perf_counter()
    exact = EmbeddingIndex(gallery, backend="exact", normalize=False)
    build = time.perf_counter() - started
    batch_qps, single_qps, found = time_queries(exact, queries, single)
    rows.append(dict(dataset=name, n=len(gallery), index="flat (exact, torch)", options="-", build_s=build,
                     batch_qps=batch_qps, single_qps=single_qps, memory_mib=0.0, file_mib=0.0,
                     recall=recall_at_k(found, truth), tuned="-"))  # fmt: skip
    print(_row(rows[-1]), flush=True)
    del exact
    for index_type in types:
        gc.collect()
        before = resident_mib()
        started = time.perf_counter()
        # With --hnsw-ef-sweep the graph is built at the sweep's first efSearch (no tuning) and searched at each.
        knob = {"ef_search": ef_sweep[0]} if index_type == "hnsw" and ef_sweep else {}
        index = EmbeddingIndex(gallery, backend="faiss", normalize=False, index_type=index_type, **knob)
        build = time.perf_counter() - started
        batch_qps, single_qps, found = time_queries(index, queries, single)
        options = index.ann.options
        if index_type == "hnsw":
            described = f"M={options.hnsw_m}, efC={options.ef_construction}, efSearch={options.ef_search}"
        else:
            described = f"nlist={options.nlist}, nprobe={options.nprobe}"
            if index_type == "ivf-pq":
                described += f", m={options.pq_m}x8 bit, refine x{options.refine_factor}"
        # What building the index added to the process (the gallery itself is shared, not copied, by
        # EmbeddingIndex; IVF-PQ's exact re-ranking reads that same gallery, so it adds only its codes).
        memory = resident_mib() - before
        file_mib = index.ann.memory_bytes() / (1 << 20)
        tuned = options.tuned.get("sample_recall_at_10", "-")
        rows.append(dict(dataset=name, n=len(gallery), index=index_type, options=described, build_s=build,
                         batch_qps=batch_qps, single_qps=single_qps, memory_mib=memory, file_mib=file_mib,
                         recall=recall_at_k(found, truth), tuned=tuned))  # fmt: skip
        print(_row(rows[-1]), flush=True)
        for ef_search in ef_sweep[1:] if index_type == "hnsw" else []:
            index.ann.set_search_options(ef_search=ef_search)
            batch_qps, single_qps, found = time_queries(index, queries, single)
            rows.append({**rows[-1], "options": f"{described.rsplit('=', 1)[0]}={ef_search}", "build_s": 0.0,
                         "batch_qps": batch_qps, "single_qps": single_qps, "recall": recall_at_k(found, truth)})  # fmt: skip
            print(_row(rows[-1]), flush=True)
        del index
    return rows


HEADER = (
    "| gallery | N | index | options (defaults; knob tuned) | build + tune s | queries/s (batch) | queries/s (one "
    "at a time) | memory added MiB | index file MiB | recall@10 | recall@10 at tuning |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _row(row: dict) -> str:
    return (
        f"| {row['dataset']} | {row['n']:,} | {row['index']} | {row['options']} | {row['build_s']:.1f} | "
        f"{row['batch_qps']:,.0f} | {row['single_qps']:,.0f} | {row['memory_mib']:,.0f} | {row['file_mib']:,.0f} | "
        f"{row['recall']:.3f} | "
        f"{row['tuned']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k random and 20k clustered (a smoke run)")
    parser.add_argument("--random-size", type=int, default=1_000_000)
    parser.add_argument("--clustered-size", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000, help="queries per gallery (recall and batch speed)")
    parser.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--datasets", nargs="+", choices=("random", "clustered"), default=["random", "clustered"])
    parser.add_argument(
        "--types", nargs="+", choices=("ivf-flat", "ivf-pq", "hnsw"), default=["ivf-flat", "ivf-pq", "hnsw"]
    )
    parser.add_argument("--threads", type=int, help="FAISS and torch threads (default: all cores)")
    parser.add_argument(
        "--hnsw-on-random-above",
        type=int,
        default=None,
        help="skip HNSW on random galleries larger than this (e.g. 200000: at 1M its build and tuning take ~15 "
        "minutes on 2 cores, efSearch ~25k for recall@10 0.95, 40x slower than exact search; see bench/README.md)",
    )
    parser.add_argument(
        "--hnsw-ef-sweep",
        type=int,
        nargs="+",
        default=[],
        metavar="EF",
        help="build HNSW at the first efSearch given (no tuning) and measure every one (e.g. 8192 16384 32768)",
    )
    args = parser.parse_args()
    if args.quick:
        args.random_size, args.clustered_size, args.queries = 100_000, 20_000, 500
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("entityclip_hf.ann_index").setLevel(logging.INFO)
    import faiss

    print(f"# bench_ann: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss "
          f"{faiss.__version__}, torch {torch.__version__}, dim {args.dim}, {args.queries} queries\n", flush=True)  # fmt: skip
    print(HEADER, flush=True)
    started = time.perf_counter()
    rows = []
    for name in args.datasets:
        if name == "random":
            gallery = random_sphere(args.random_size, args.dim, seed=0)
            queries = random_sphere(args.queries, args.dim, seed=1)
        else:
            gallery = clustered(args.clustered_size, args.dim, seed=0)
            queries = clustered(args.queries, args.dim, seed=1)
        types = list(args.types)
        skip_above = args.hnsw_on_random_above
        if name == "random" and "hnsw" in types and skip_above is not None and len(gallery) > skip_above:
            types.remove("hnsw")
            print(f"| random | {len(gallery):,} | hnsw | skipped: N > --hnsw-on-random-above {skip_above:,} "
                  "(see the 100k row of --quick) | | | | | | | |", flush=True)  # fmt: skip
        rows += bench_dataset(name, gallery, queries, types, args.single, args.hnsw_ef_sweep)
        del gallery
    print(f"\ntotal {time.perf_counter() - started:.0f} s, peak resident memory {peak_rss_gib():.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
