"""Benchmark: the retrieval metric at scale (galleries of 10k, 100k, 1M random 512-d embeddings): time, peak memory.

The protocol ranks every query against the whole gallery, with as many queries as gallery items, in both directions:
N x N similarity entries (one block of scores serves both directions). At 1M that is 1e12 entries (5e14 multiply-adds),
hours on 2 cores, so each size is timed on ONE strip of the real computation, `chunk_size` image queries against the
whole text gallery (counting both directions), after the diagonal blocks (which every strip needs: they hold the
positives); the full protocol time is extrapolated from the strip's cost per entry. Full runs at the smaller sizes
check that extrapolation and that the cost per entry stays flat (time linear in N x queries), and the naive approach
(whole N x N matrix, sorted rows) runs where its matrix fits in memory.

Every gallery size lives in its own worker process (bench/common.py `Worker`): its peak resident memory is read from
/proc (VmHWM, reset before each run) and reported BEYOND the embeddings themselves (which the caller holds anyway:
4 GB for 1M image + 1M text float32 embeddings, 2 GB in float16).

    python bench/bench_retrieval_metrics.py                # 10k, 100k, 1M strips; full 10k and 30k; naive 10k (~3 min)
    python bench/bench_retrieval_metrics.py --quick        # 10k and 100k only (~30 s)
    python bench/bench_retrieval_metrics.py --wait-idle 120  # on a shared machine: wait for idle cores before each run
    python bench/bench_retrieval_metrics.py --gallery-sizes 1000000 --full-sizes --naive-sizes --dtype float16
"""

import argparse
import sys
import time

import torch
from common import (
    Worker,
    format_table,
    gib,
    machine_summary,
    peak_resident_memory_bytes,
    reset_peak_resident_memory,
    resident_memory_bytes,
    wait_for_idle_cpu,
)

from entityclip_hf.metrics import _PositiveRankCounter, metrics_from_ranks, naive_retrieval_ranks, ranks_of_positives

MAX_PEAK_EXTRA_GIB = 2.0  # the target at 1M, beyond the embeddings
MAX_COST_SPREAD = 1.5  # largest / smallest cost per similarity entry across gallery sizes (linear time)
GENERATION_ROWS = 65536  # embeddings are generated in slices straight into their final tensor: no temporary copy


class RetrievalCase:
    """Lives in a worker process: N random paired embeddings and the runs timed on them."""

    def __init__(self, num_items: int, dim: int, dtype: str, noise: float, seed: int, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        dtype = getattr(torch, dtype)
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.empty(num_items, dim, dtype=dtype)
        self.texts = torch.empty(num_items, dim, dtype=dtype)
        # Texts = images + noise: a ranking with every rank present (noise 6 in 512-d: cosine ~0.16 to the positive).
        for start in range(0, num_items, GENERATION_ROWS):
            images = torch.randn(min(GENERATION_ROWS, num_items - start), dim, generator=generator)
            self.images[start : start + len(images)] = images
            self.texts[start : start + len(images)] = images + noise * torch.randn(images.shape, generator=generator)
        self.num_items = num_items
        self.embedding_bytes = 2 * self.images.numel() * self.images.element_size()
        # Warm-up (BLAS kernels, OpenMP threads) so that the first timed run does not pay for it.
        warm_up = min(num_items, 1024)
        ranks_of_positives(self.images[:warm_up], self.texts[:warm_up], chunk_size=512)

    def _measured(self, run) -> dict:
        if not reset_peak_resident_memory():
            raise RuntimeError("cannot reset the peak resident memory (/proc/self/clear_refs): peaks would be wrong")
        baseline = resident_memory_bytes()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = run()
        result["seconds"] = time.perf_counter() - start
        result["cpu_seconds"] = time.process_time() - cpu_start
        result["peak_extra_bytes"] = peak_resident_memory_bytes() - baseline
        result["embedding_bytes"] = self.embedding_bytes
        return result

    def full(self, chunk_size: int) -> dict:
        """The public function on the whole protocol (N x N entries)."""

        def run():
            ranks = ranks_of_positives(self.images, self.texts, chunk_size=chunk_size)
            return {"entries": self.num_items**2, "metrics": metrics_from_ranks(ranks)}

        return self._measured(run)

    def strip(self, chunk_size: int) -> dict:
        """The diagonal blocks, then one strip (the first `chunk_size` image queries against every other block)."""

        def run():
            counter = _PositiveRankCounter(self.images, self.texts, chunk_size=chunk_size)
            start = time.perf_counter()
            counter.count_diagonal_blocks()
            diagonal_seconds = time.perf_counter() - start
            start, cpu_start = time.perf_counter(), time.process_time()
            counter.count_off_diagonal_strip(0)
            strip_seconds, strip_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            rows = min(chunk_size, self.num_items)
            diagonal_entries = sum(min(chunk_size, self.num_items - s) ** 2 for s in counter.block_starts)
            return {
                "queries": rows,
                "entries": rows * (self.num_items - rows),
                "strip_seconds": strip_seconds,
                "strip_cpu_seconds": strip_cpu_seconds,
                "diagonal_seconds": diagonal_seconds,
                "diagonal_entries": diagonal_entries,
            }

        result = self._measured(run)
        strip_cost = result["strip_seconds"] / result["entries"] if result["entries"] else float("nan")
        off_diagonal_entries = self.num_items**2 - result["diagonal_entries"]
        result["estimated_full_seconds"] = result["diagonal_seconds"] + strip_cost * off_diagonal_entries
        return result

    def naive(self) -> dict:
        """The whole N x N similarity matrix and a sort of every row."""

        def run():
            ranks = naive_retrieval_ranks(self.images, self.texts)
            return {"entries": self.num_items**2, "metrics": metrics_from_ranks(ranks)}

        return self._measured(run)


def block_matmul_throughput(chunk_size: int, dim: int, repeats: int = 5) -> float:
    """FLOP/s of the metric's matrix product alone (best of `repeats`): the ceiling the counting overhead is seen against."""
    generator = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(2, chunk_size, dim, generator=generator)
    out = torch.empty(chunk_size, chunk_size)
    torch.matmul(queries, gallery.T, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(queries, gallery.T, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * chunk_size * chunk_size * dim / best


def naive_bytes(num_items: int) -> int:
    # Scores, their transposed copy, sorted values and int64 sort indices of one direction: 4 + 4 + 4 + 8 bytes/entry.
    return 20 * num_items**2


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery-sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--full-sizes", type=int, nargs="*", default=[10_000, 30_000])
    parser.add_argument("--naive-sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--quick", action="store_true", help="galleries of 10k and 100k, full and naive at 10k")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--noise", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    parser.add_argument(
        "--wait-idle", type=float, default=0.0, help="before each timed run, wait up to this many s for idle cores"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.gallery_sizes, args.full_sizes, args.naive_sizes = [10_000, 100_000], [10_000], [10_000, 100_000]
    return args


FULL, STRIP, NAIVE = "chunked, full protocol", "chunked, diagonal + 1 strip", "naive N x N matrix + sort"
HEADERS = [
    "run",
    "gallery N",
    "queries timed",
    "entries",
    "time (s)",
    "CPU (s)",
    "ns / entry",
    "GFLOP/s",
    "full protocol",
    "peak beyond embeddings (GiB)",
    "embeddings (GiB)",
]


def run_gallery(num_items: int, args, run_naive: bool) -> dict[str, dict]:
    """All runs of one gallery size, in one fresh worker process."""
    results = {}
    with Worker(
        f"gallery-{num_items}", RetrievalCase, num_items, args.dim, args.dtype, args.noise, args.seed, args.threads
    ) as w:
        w.wait_ready()
        runs = []
        if num_items in args.full_sizes:
            runs.append((FULL, "full", {"chunk_size": args.chunk_size}))
        if num_items in args.gallery_sizes:
            runs.append((STRIP, "strip", {"chunk_size": args.chunk_size}))
        if run_naive:
            runs.append((NAIVE, "naive", {}))
        for name, method, kwargs in runs:
            if args.wait_idle > 0:
                wait_for_idle_cpu(timeout=args.wait_idle)
            results[name] = w.call(method, **kwargs)
    return results


def table_row(name: str, num_items: int, result: dict, dim: int) -> list:
    is_strip = name == STRIP
    seconds = result["strip_seconds"] if is_strip else result["seconds"]
    cpu_seconds = result["strip_cpu_seconds"] if is_strip else result["cpu_seconds"]
    cost = seconds / result["entries"]
    full_seconds = result["estimated_full_seconds"] if is_strip else result["seconds"]
    return [
        name,
        num_items,
        result.get("queries", num_items),
        f"{result['entries']:.2g}",
        f"{seconds:.2f}" + (f" (+{result['diagonal_seconds']:.1f} diag.)" if is_strip else ""),
        f"{cpu_seconds:.1f}",
        f"{cost * 1e9:.2f}",
        f"{2 * dim / cost / 1e9:.0f}",
        _duration(full_seconds) + (" (est.)" if is_strip else ""),
        f"{gib(result['peak_extra_bytes']):.3f}",
        f"{gib(result['embedding_bytes']):.2f}",
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    print(machine_summary())
    if args.wait_idle > 0:
        wait_for_idle_cpu(timeout=args.wait_idle)
    block_flops = block_matmul_throughput(args.chunk_size, args.dim)
    print(
        f"one {args.chunk_size} x {args.dim} x {args.chunk_size} float32 block product alone: {block_flops / 1e9:.0f} GFLOP/s"
    )
    print(f"embeddings: {args.dim}-d {args.dtype}, chunk_size {args.chunk_size}\n")

    rows, notes, failures, strip_cpu_costs = [], [], [], {}
    for num_items in sorted(set(args.gallery_sizes) | set(args.full_sizes) | set(args.naive_sizes)):
        naive_fits = naive_bytes(num_items) < available_memory_bytes() - 2 * num_items * args.dim * 4
        if num_items in args.naive_sizes and not naive_fits:
            needs = f"does not fit: needs {naive_bytes(num_items) / 1e9:.0f} GB"
            rows.append([NAIVE, num_items, num_items, f"{num_items**2:.2g}", *["-"] * 5, needs, "-"])
        run_naive = num_items in args.naive_sizes and naive_fits
        if num_items not in args.gallery_sizes and num_items not in args.full_sizes and not run_naive:
            continue
        results = run_gallery(num_items, args, run_naive)
        for name, result in results.items():
            rows.append(table_row(name, num_items, result, args.dim))
            if name != NAIVE and result["peak_extra_bytes"] > MAX_PEAK_EXTRA_GIB * 2**30:
                failures.append(f"{name} at N={num_items}: peak {gib(result['peak_extra_bytes']):.2f} GiB > target")
        if STRIP in results:
            strip_cpu_costs[num_items] = results[STRIP]["strip_cpu_seconds"] / results[STRIP]["entries"]
        if FULL in results and STRIP in results:
            notes.append(
                f"N={num_items}: full protocol measured {results[FULL]['seconds']:.1f} s, "
                f"extrapolated from the strip {results[STRIP]['estimated_full_seconds']:.1f} s"
            )
        if FULL in results and NAIVE in results:
            same = results[FULL]["metrics"] == results[NAIVE]["metrics"]
            metrics = results[FULL]["metrics"]
            notes.append(
                f"N={num_items}: chunked and naive metrics {'identical' if same else 'DIFFER'} "
                f"(i2t R@1 {metrics['i2t_R@1']:.2f}, t2i R@10 {metrics['t2i_R@10']:.2f}, rsum {metrics['rsum']:.1f})"
            )
            if not same:
                failures.append(f"N={num_items}: chunked metrics differ from the naive reference")

    print(format_table(HEADERS, rows))
    print(
        "\nentries: query x gallery similarity scores computed (each serves both directions); time: wall clock; "
        "CPU: process CPU time (both threads); GFLOP/s: 2 x dim FLOPs per entry over wall time"
    )
    for line in notes:
        print(line)
    if len(strip_cpu_costs) > 1:
        # CPU time rather than wall time: other processes on a shared machine stretch the wall clock, not the work.
        spread = max(strip_cpu_costs.values()) / min(strip_cpu_costs.values())
        costs = ", ".join(f"N={n}: {c * 1e9:.2f} ns" for n, c in sorted(strip_cpu_costs.items()))
        print(f"CPU time per entry of a strip (flat = time linear in N x queries): {costs}; spread {spread:.2f}x")
        if spread > MAX_COST_SPREAD:
            failures.append(f"CPU time per entry varies {spread:.2f}x across gallery sizes (> {MAX_COST_SPREAD}x)")
    print(f"after the runs: {machine_summary()}")
    for failure in failures:
        print(f"TARGET MISSED: {failure}")
    return 1 if failures else 0


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    sys.exit(main())
