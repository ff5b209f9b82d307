"""Shared helpers of the benchmarks: ViT-B/32 shapes, timing, peak memory, matmul throughput, worker processes, tables.

Every benchmark compares EntityCLIP with `CLIPModel` side by side in the same run. Models that are timed against each
other live in their own worker processes (`Worker`) driven alternately by the parent (A B A B ...): noise from the
rest of the machine then hits both, and each process's peak resident memory belongs to one model only.
"""

import multiprocessing
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig

# CLIP's tokenizer: vocabulary size and the ids of <|startoftext|> / <|endoftext|> (HF_NOTES: pooling looks for eos).
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_TOKEN_ID = 49406
CLIP_EOS_TOKEN_ID = 49407


def vit_b32_clip_config(attn_implementation: str = "sdpa") -> CLIPConfig:
    """The shapes of OpenAI's ViT-B/32 CLIP (text 512 wide, vision 768 wide, 12 layers each, 224 px), built offline."""
    return CLIPConfig(
        text_config={
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 77,
            "bos_token_id": CLIP_BOS_TOKEN_ID,
            "eos_token_id": CLIP_EOS_TOKEN_ID,
            "pad_token_id": CLIP_EOS_TOKEN_ID,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=512,
        attn_implementation=attn_implementation,
    )


def random_token_ids(batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[B, length] token ids shaped like CLIP's: <|startoftext|>, random words, <|endoftext|> as the last token."""
    ids = torch.randint(0, CLIP_BOS_TOKEN_ID, (batch_size, length), generator=generator)
    ids[:, 0] = CLIP_BOS_TOKEN_ID
    ids[:, -1] = CLIP_EOS_TOKEN_ID
    return ids


def random_batch(
    batch_size: int, text_length: int, explanation_length: int | None, image_size: int = 224, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A deterministic batch of images, texts and (optionally) explanations, with every token real (no padding)."""
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": random_token_ids(batch_size, text_length, generator),
    }
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if explanation_length is not None:
        batch["explanation_input_ids"] = random_token_ids(batch_size, explanation_length, generator)
        batch["explanation_attention_mask"] = torch.ones_like(batch["explanation_input_ids"])
    return batch


# ---------------------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def resident_memory_bytes() -> int:
    """Current resident memory (VmRSS) of this process."""
    return _proc_status_kib("VmRSS") * 1024


def peak_resident_memory_bytes() -> int:
    """Peak resident memory (VmHWM) of this process since it started or since `reset_peak_resident_memory`."""
    return _proc_status_kib("VmHWM") * 1024


def reset_peak_resident_memory() -> bool:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------- compute
def matmul_throughput(
    size: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5, device: str = "cpu"
) -> float:
    """This machine's matmul throughput in FLOP/s: best of `repeats` timed `size`x`size` products (2 size^3 FLOPs).

    The best run, not the median, because it estimates what the hardware can do; the benchmarks then report their
    achieved FLOP/s as a fraction of it. On CUDA each product is timed to its end (synchronised).
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.matmul(a, b)  # warm-up: thread pool, oneDNN/BLAS kernels, cuBLAS handles
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions, attention; forward and backward) by `FlopCounterMode`."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_wall_and_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock seconds and this process's CPU seconds (all threads) of one call of `fn`.

    On a machine shared with other jobs the wall time grows whenever they take the cores, while the CPU time stays
    close to the work done: printed beside the wall time, it shows how much of a slow figure is contention.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------------------- workers
def _worker_main(connection, factory: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """Body of a worker process: build the runner, then execute the parent's calls one at a time."""
    try:
        baseline = resident_memory_bytes()
        runner = factory(*args, **kwargs)
        connection.send(("ok", {"baseline_rss": baseline, "rss_after_build": resident_memory_bytes()}))
    except BaseException:  # noqa: BLE001 - the parent must see why the worker could not start
        connection.send(("error", traceback.format_exc()))
        return
    while True:
        method, call_kwargs = connection.recv()
        if method is None:
            return
        try:
            connection.send(("ok", getattr(runner, method)(**call_kwargs)))
        except BaseException:  # noqa: BLE001 - report to the parent, which raises with the worker's traceback
            connection.send(("error", traceback.format_exc()))


class Worker:
    """A subprocess holding one object built by `factory(*args, **kwargs)`; `call(name, **kw)` runs its methods.

    `worker_env`: extra environment variables of the worker process only.

    `factory` must be a module-level function of an importable module (or of the script run as `__main__`), because
    the process is started with `spawn` (a fresh interpreter: no memory or allocator state shared with the parent).
    """

    def __init__(
        self, name: str, factory: Callable[..., Any], *args, worker_env: dict[str, str] | None = None, **kwargs
    ):
        self.name = name
        context = multiprocessing.get_context("spawn")
        self._connection, child_connection = context.Pipe()
        self._process = context.Process(
            target=_worker_main, args=(child_connection, factory, args, kwargs), name=name, daemon=True
        )
        # Environment variables read at process start-up (GLIBC_TUNABLES, OMP_*) must be set when it starts.
        saved = {key: os.environ.get(key) for key in worker_env or {}}
        os.environ.update(worker_env or {})
        try:
            self._process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        child_connection.close()
        self._started = False
        self.build_info: dict | None = None

    def _receive(self):
        try:
            status, payload = self._connection.recv()
        except EOFError as error:
            raise RuntimeError(
                f"worker {self.name!r} died (exit code {self._process.exitcode}); out of memory?"
            ) from error
        if status == "error":
            raise RuntimeError(f"worker {self.name!r} failed:\n{payload}")
        return payload

    def wait_ready(self) -> dict:
        """Block until the worker has built its object; returns its resident memory before and after building."""
        if not self._started:
            self.build_info = self._receive()
            self._started = True
        return self.build_info

    def call(self, method: str, **kwargs):
        self.wait_ready()
        self._connection.send((method, kwargs))
        return self._receive()

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._connection.send((None, None))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join()
        self._connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def interleaved(
    workers: Sequence[Worker], method: str, iterations: int, wait_idle: float = 0.0, **kwargs
) -> dict[str, list]:
    """Call `method` on each worker in turn (A B A B ...), `iterations` times; returns each worker's results.

    With `wait_idle` > 0, each round first waits (up to that many seconds) for the other jobs on the machine to
    leave the cores alone (`wait_for_idle_cpu`).
    """
    results: dict[str, list] = {worker.name: [] for worker in workers}
    for _ in range(iterations):
        if wait_idle > 0:
            wait_for_idle_cpu(timeout=wait_idle)
        for worker in workers:
            results[worker.name].append(worker.call(method, **kwargs))
    return results


def _cpu_busy_and_total() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def machine_busy_fraction(interval: float = 1.0) -> float:
    """Share of all cores busy (any process) over the next `interval` seconds, from /proc/stat."""
    busy_before, total_before = _cpu_busy_and_total()
    time.sleep(interval)
    busy_after, total_after = _cpu_busy_and_total()
    return (busy_after - busy_before) / max(total_after - total_before, 1)


def wait_for_idle_cpu(max_busy: float = 0.15, interval: float = 2.0, timeout: float = 60.0) -> bool:
    """Wait until the machine's cores are at most `max_busy` busy over `interval` s; False if `timeout` ran out.

    Timings taken while other jobs run measure the other jobs: on a shared machine, call this (with this process
    and its workers idle) before timing.
    """
    deadline = time.monotonic() + timeout
    while True:
        if machine_busy_fraction(interval) <= max_busy:
            return True
        if time.monotonic() >= deadline:
            return False


# ---------------------------------------------------------------------------------------------------------- reporting
def machine_summary() -> str:
    """One line naming the CPU, cores, torch version, threads and the load average (a busy machine skews timings)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {load}"
    )


def report(text: str, markdown_out: Path | None) -> None:
    """Print a benchmark's result followed by the machine it ran on, and write both to `--markdown-out` if given."""
    text = f"{text}\n\nMachine: {machine_summary()}"
    print("\n" + text)
    if markdown_out:
        markdown_out.write_text(text + "\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as printed, and pasted as is into bench/README.md)."""
    cells = [[str(header) for header in headers]] + [[_format_cell(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]

    def line(row):
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(cells[0]), separator] + [line(row) for row in cells[1:]])


def _format_cell(cell: Any) -> str:
    if isinstance(cell, float):
        if cell == 0 or 0.01 <= abs(cell) < 1e5:
            return f"{cell:.3g}" if abs(cell) < 100 else f"{cell:.0f}"
        return f"{cell:.3g}"
    return str(cell)


def gib(num_bytes: float) -> float:
    return num_bytes / 2**30
