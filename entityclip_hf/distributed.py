"""Encoding and evaluation over several processes (`accelerate launch` / `torchrun`), with one process's results.

Each process encodes one contiguous shard of the rows (sizes differ by at most one, nothing padded or repeated), the
shards are all-gathered back in row order, so every process holds exactly the embeddings one process would have
computed; the metric is computed by the main process only and broadcast. Without a launcher (or with one process)
every function here is a no-op and the code runs as before.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_launched_processes(device: torch.device) -> torch.device:
    """Join the launcher's process group when it started several processes; the device this process encodes on.

    Accelerate's `PartialState` sets it up from the launcher's environment: gloo on CPU, NCCL on GPUs (each process
    then takes the GPU of its local rank when `device` is a CUDA device without an index).
    """
    if launched_processes() <= 1:
        return device
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    if device.type == "cuda" and device.index is None:
        return state.device
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def shard_range(num_rows: int, process: int | None = None, processes: int | None = None) -> range:
    """The contiguous rows of `num_rows` that `process` of `processes` encodes (the first ones take one more)."""
    process = rank() if process is None else process
    processes = world_size() if processes is None else processes
    base, extra = divmod(num_rows, processes)
    start = process * base + min(process, extra)
    return range(start, start + base + (1 if process < extra else 0))


def _collective_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_shards(local: torch.Tensor, num_rows: int) -> torch.Tensor:
    """All processes' `local` rows (each its `shard_range(num_rows)`), concatenated in row order, on every process."""
    if not is_distributed():
        return local
    sizes = [len(shard_range(num_rows, p)) for p in range(world_size())]
    if local.shape[0] != sizes[rank()]:
        raise ValueError(f"process {rank()} holds {local.shape[0]} rows, its shard has {sizes[rank()]}")
    device = _collective_device()
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([shard[:size] for shard, size in zip(gathered, sizes, strict=True)]).to(local.device)


def first_error(message: str | None) -> str | None:
    """The error of the lowest-ranked process that had one (the first in row order), on every process, or None:
    all processes raise together instead of leaving the others waiting in a collective."""
    if not is_distributed():
        return message
    messages = [None] * world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


def from_main_process(value):
    """The main process's `value` on every process."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@contextlib.contextmanager
def main_process_first():
    """The main process runs the block first (a dataset cache is written once), then the others."""
    if is_distributed() and not is_main_process():
        dist.barrier()
    try:
        yield
    finally:
        if is_distributed() and is_main_process():
            dist.barrier()


def leave() -> None:
    """Every process is done: leave the process group (a launched process may then exit)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def end_launched_process(status: int = 0) -> None:
    """End a process that a launcher started among several, everything written (call after `leave`); no-op otherwise.

    Tearing down torch's objects after a peer process has exited was seen to hang the last one at exit (2 gloo CPU
    processes, torch 2.13; in native destructors, not in Python): finetune.py ends its launched processes the same way.
    """
    if launched_processes() > 1:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


__all__ = [
    "end_launched_process",
    "first_error",
    "from_main_process",
    "gather_shards",
    "is_distributed",
    "is_main_process",
    "join_launched_processes",
    "launched_processes",
    "leave",
    "main_process_first",
    "rank",
    "shard_range",
    "world_size",
]
