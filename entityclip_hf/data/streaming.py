"""Training batches streamed from an `IterableDataset`, with an order fixed by the seed and exact mid-epoch resume.

`StreamingLoader` wraps a stream of rows (`sources.open_source_stream`: datasets streaming, webdataset shards, or a
map-style split's Arrow files) for `--streaming` training:

- shards are split across processes (`datasets.distributed.split_dataset_by_node`) and, within a process, across
  DataLoader workers (datasets' own worker split): nothing reads the whole corpus, nothing holds it in memory;
- the order depends only on the seed and the epoch (datasets' seeded shard shuffle and shuffle buffer, `set_epoch`);
- each batch comes from one worker (the DataLoader takes them round-robin), and the loader counts, per process and
  per worker, how many batches were consumed (`position()`, all processes' counts, the same on every process, a few
  integers). A resume gives each worker its count back: the worker drops that many rows of its own stream before it
  batches again, undecoded (images are decoded in the collator only), so the resumed run sees exactly the batches the
  straight run would have;
- every process yields the same number of batches (the all-gathered contrastive loss needs every process at every
  step): the epoch ends for all when one process runs out; one small gather per batch says who still has one;
- `len()` is the number of batches per process of the epoch once it is known (the epoch's last batch is fetched ahead),
  else the estimate from the split's row count (`estimate_num_rows`: exact from parquet footers, Arrow files or the
  dataset's info; estimated for webdataset shards and text files).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, get_worker_info

from .formats import canonical_split
from .loading import is_file_layout, load_entity_dataset
from .sources import is_saved_to_disk, looks_like_hub_id, open_source, open_source_stream, split_data_files

logger = logging.getLogger(__name__)


class _ResumedRows(torch.utils.data.IterableDataset):
    """The rows of a stream, each DataLoader worker first dropping the rows it had batched before the resume point.

    datasets' `IterableDataset.__iter__` gives each worker its own shards (it reads the worker info itself), so the
    rows dropped here are this worker's, in this worker's order.
    """

    def __init__(self, stream: datasets.IterableDataset, skip_rows: list[int]):
        self.stream = stream
        self.skip_rows = skip_rows

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return itertools.islice(iter(self.stream), self.skip_rows[worker], None)


class _WorkerTaggedCollate:
    """A collate function that also says which DataLoader worker built the batch (the resume position counts them)."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, rows):
        info = get_worker_info()
        return (info.id if info is not None else 0), self.collate_fn(rows)


def _in_straight_order(batches: Iterator[tuple[int, object]], num_workers: int, last_worker: int):
    """`batches` (worker, batch) of a DataLoader in the order a straight run would have taken them after a batch of
    `last_worker` (-1: from the epoch's start).

    A DataLoader takes its workers' batches round-robin from worker 0, passing over a worker once it has run out. A
    straight run's order is that cycle; a resumed DataLoader starts its cycle at worker 0 again, so its batches are
    queued per worker (at most about one round) and given out in the straight run's cycle. A worker has run out
    when a later worker's batch arrives in its turn, or when the DataLoader ends.
    """
    workers = max(1, num_workers)
    queues: list[deque] = [deque() for _ in range(workers)]
    finished: set[int] = set()  # workers the DataLoader will not give another batch
    loader_next = 0  # the worker whose batch the DataLoader gives next

    def following(worker: int, usable) -> int | None:
        for step in range(1, workers + 1):
            candidate = (worker + step) % workers
            if usable(candidate):
                return candidate
        return None

    def pull() -> None:
        nonlocal loader_next
        item = next(batches, None)
        if item is None:
            finished.update(range(workers))
            return
        worker = item[0]
        while loader_next != worker:  # the workers whose turn it was ran out
            finished.add(loader_next)
            loader_next = following(loader_next, lambda w: w not in finished)
        queues[worker].append(item)
        loader_next = following(worker, lambda w: w not in finished)

    def alive(worker: int) -> bool:
        return bool(queues[worker]) or worker not in finished

    wanted = following(last_worker % workers if last_worker >= 0 else workers - 1, alive)
    while wanted is not None:
        while not queues[wanted] and wanted not in finished:
            pull()
        if queues[wanted]:
            yield queues[wanted].popleft()
        wanted = following(wanted, alive)


def _send_to_device(batch, device):
    if device is None:
        return batch
    return type(batch)(
        {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    )


class StreamingLoader:
    """Batches of `batch_size` rows per process from a row stream; see the module docstring.

    Args:
        stream: an `IterableDataset` of rows (all processes pass the same one, unsplit).
        batch_size: rows per batch and process.
        collate_fn: rows -> batch (a mapping of tensors, e.g. `EntityCLIPCollator`), run in the workers.
        num_workers: DataLoader workers per process (capped at the shards this process has: an idle worker would
            end every epoch at once).
        seed: fixes the shard order and the shuffle buffer (with the epoch).
        shuffle_buffer: rows in datasets' shuffle buffer (0: no shuffling at all, shards read in order).
        accelerator: the `accelerate.Accelerator` of a multi-process run (process index, count, gather, device);
            None: one process on the CPU.
        num_rows: the split's row count (exact or estimated), for `len()` before an epoch has ended.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        batch_size: int,
        collate_fn: Callable,
        *,
        num_workers: int = 0,
        seed: int = 42,
        shuffle_buffer: int = 1000,
        accelerator=None,
        num_rows: int | None = None,
    ):
        self.batch_size = batch_size
        self.seed = seed
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world_size = accelerator.num_processes if accelerator is not None else 1
        self.device = accelerator.device if accelerator is not None else None
        if shuffle_buffer > 0:
            stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        shards = self.stream.num_shards
        self.num_workers = min(num_workers, shards)
        if self.num_workers < num_workers:
            logger.warning(
                "streaming: %d DataLoader workers asked for, %d used (this process reads %d shard(s); a worker without "
                "a shard would end every epoch at once). More shards, more workers: reshard the data.",
                num_workers, self.num_workers, shards,
            )  # fmt: skip
        self.collate_fn = _WorkerTaggedCollate(collate_fn)
        self.num_rows = num_rows
        self.epoch = 0
        self._batches = self._empty_counts()
        self._last_workers = [-1] * self.world_size
        self._complete = False

    # ------------------------------------------------------------------------------------------- length, position
    def _empty_counts(self) -> list[list[int]]:
        return [[0] * max(1, self.num_workers) for _ in range(self.world_size)]

    def estimated_batches(self) -> int:
        """Batches per process and epoch from `num_rows` (an upper bound when the row count is exact), or 0."""
        return (self.num_rows or 0) // (self.world_size * self.batch_size)

    def __len__(self) -> int:
        consumed = sum(self._batches[self.rank])
        if self._complete:
            return consumed
        return max(self.estimated_batches(), consumed + 1)

    def position(self) -> dict:
        """Where this epoch is: per process and worker, batches consumed; JSON, for the checkpoint's state file."""
        return {
            "epoch": self.epoch,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "batches": [list(counts) for counts in self._batches],
            "last_workers": list(self._last_workers),
            "complete": self._complete,
        }

    def _start(self, epoch: int, position: dict | None) -> None:
        self.epoch, self._batches, self._complete = epoch, self._empty_counts(), False
        self._last_workers = [-1] * self.world_size
        if not position or position.get("epoch") != epoch:
            return
        saved = {key: position.get(key) for key in ("world_size", "num_workers", "batch_size", "seed")}
        now = {"world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size,
               "seed": self.seed}  # fmt: skip
        if saved != now:
            raise ValueError(
                f"streaming resume: the checkpoint was taken with {json.dumps(saved)}, this run has {json.dumps(now)}; "
                "an exact resume needs the same processes, DataLoader workers, batch size and seed"
            )
        self._batches = [list(counts) for counts in position["batches"]]
        self._last_workers = list(position["last_workers"])
        self._complete = bool(position.get("complete"))

    # ------------------------------------------------------------------------------------------- iteration
    def _everyone_has(self, item) -> list[int]:
        """The worker of each process's next batch (-1: that process has none); one gather when distributed."""
        worker = item[0] if item is not None else -1
        if self.world_size == 1:
            return [worker]
        flags = torch.tensor([worker], dtype=torch.long, device=self.device)
        return self.accelerator.gather(flags).cpu().tolist()

    def epoch_batches(self, epoch: int, position: dict | None = None) -> Iterator:
        """The batches of `epoch`, from `position` (a `position()` of this epoch) on, or from its start."""
        self._start(epoch, position)
        if self._complete:  # the checkpoint was taken after this epoch's last batch
            return
        skip_rows = [count * self.batch_size for count in self._batches[self.rank]]
        self.stream.set_epoch(epoch)
        loader = DataLoader(
            _ResumedRows(self.stream, skip_rows),
            batch_size=self.batch_size,
            drop_last=True,  # equal batches everywhere (the all-gathered loss); a worker's last rows wait an epoch
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed + epoch),
        )
        iterator = _in_straight_order(iter(loader), self.num_workers, self._last_workers[self.rank])
        current = next(iterator, None)
        workers = self._everyone_has(current)
        while min(workers) >= 0:
            following = next(iterator, None)  # fetched ahead: the loop learns which batch is the epoch's last
            next_workers = self._everyone_has(following)
            for rank, worker in enumerate(workers):
                self._batches[rank][worker] += 1
                self._last_workers[rank] = worker
            self._complete = min(next_workers) < 0
            yield _send_to_device(current[1], self.device)
            current, workers = following, next_workers
        self._complete = True


# ----------------------------------------------------------------------------------------------- row counts
def _count_webdataset_samples(path: Path) -> int:
    with tarfile.open(path) as tar:
        # webdataset's sample key: the member's path up to the first dot of its file name.
        return len({os.path.join(os.path.dirname(m.name), os.path.basename(m.name).split(".", 1)[0])
                    for m in tar if m.isfile()})  # fmt: skip


def _count_rows(files: list[str]) -> tuple[int, bool] | None:
    """(rows, exact) of a split's data files: parquet footers and Arrow files exactly; webdataset shards from the
    first one, text files from the line density of their first MiB (estimates). None when unknown."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    suffixes = {Path(file).suffix.lower() for file in files}
    if suffixes == {".parquet"}:
        return sum(pq.ParquetFile(file).metadata.num_rows for file in files), True
    if suffixes == {".arrow"}:
        total = 0
        for file in files:
            with pa.memory_map(file) as source:
                total += sum(batch.num_rows for batch in pa.ipc.open_stream(source))
        return total, True
    if suffixes == {".tar"}:
        return _count_webdataset_samples(Path(files[0])) * len(files), len(files) == 1
    if suffixes <= {".jsonl", ".csv", ".json"}:
        total = 0.0
        for file in files:
            size = os.path.getsize(file)
            with open(file, "rb") as handle:
                head = handle.read(1 << 20)
            total += head.count(b"\n") * (size / max(1, len(head)))
        return int(total), False
    return None


def estimate_num_rows(source, split: str = "train") -> tuple[int | None, str]:
    """(rows of `split`, how they were counted: "exact", "estimated" or "unknown") without reading the split."""
    if isinstance(source, datasets.Dataset):
        return len(source), "exact"
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir() and is_saved_to_disk(path):
        loaded = datasets.load_from_disk(str(path))
        loaded = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return len(loaded), "exact"
    files = None
    if path.is_dir():
        files = split_data_files(path).get(split)
    elif path.is_file():
        files = [str(path)]
    elif looks_like_hub_id(str(source)):
        try:
            info = datasets.load_dataset_builder(str(source)).info
        except Exception as error:  # noqa: BLE001 - no length is no reason to fail: the progress bar estimates
            logger.info("streaming: no row count for %s (%s)", source, error)
            return None, "unknown"
        if info.splits and split in info.splits and info.splits[split].num_examples:
            return info.splits[split].num_examples, "exact"
        return None, "unknown"
    counted = _count_rows(files) if files else None
    if counted is None:
        return None, "unknown"
    return counted[0], "exact" if counted[1] else "estimated"


def load_for_streaming(
    name,
    root=None,
    *,
    columns=None,
    explanations="auto",
    check_images: str = "header",
    other_splits=("validation", "test"),
    cache_dir: str | None = None,
    stream_shards: int = 256,
) -> tuple[datasets.IterableDataset, int | None, str, datasets.DatasetDict]:
    """What `--streaming` trains on: (the train split as a row stream, its rows, how they were counted, the other
    splits asked for, loaded and checked by `load_entity_dataset`).

    A file layout (`n24news`, `jsonl`, ...) is loaded and checked as usual and its train split streams from its Arrow
    cache file; a `datasets` source's train split is never loaded, only streamed (its rows are checked on the fly).
    """
    if is_file_layout(name):
        loaded = load_entity_dataset(name, root, explanations=explanations, check_images=check_images,
                                     cache_dir=cache_dir)  # fmt: skip
        train = loaded.pop("train") if "train" in loaded else None
        if train is None:
            raise FileNotFoundError(f"{name} at {root}: no train split")
        others = datasets.DatasetDict({split: loaded[split] for split in other_splits if split in loaded})
        return open_source_stream(train, stream_shards=stream_shards), len(train), "exact", others
    streams, _ = open_source(name, streaming=True, cache_dir=cache_dir, stream_shards=stream_shards)
    present = [split for split in other_splits if split and canonical_split(split) in streams]
    others = (
        load_entity_dataset(
            name,
            columns=columns,
            explanations=explanations,
            splits=present,
            check_images=check_images,
            cache_dir=cache_dir,
        )  # fmt: skip
        if present
        else datasets.DatasetDict()
    )
    stream = open_source_stream(name, "train", columns, cache_dir=cache_dir, stream_shards=stream_shards)
    rows, how = estimate_num_rows(name, "train")
    return stream, rows, how, others


__all__ = ["StreamingLoader", "estimate_num_rows", "load_for_streaming"]
