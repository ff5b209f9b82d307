"""Streaming: shards split across processes and DataLoader workers, an order fixed by the seed, a resume mid-epoch
that gives exactly the batches of a straight run, and an epoch length known or estimated."""

import json

import pytest
import torch
from accelerate import debug_launcher

from entityclip_hf.data.sources import open_source_stream
from entityclip_hf.data.streaming import StreamingLoader, estimate_num_rows
from tests.test_data_sources import write_shards


class IdsCollate:
    """Rows -> their ids, and a tensor (what the loader moves to the device)."""

    def __call__(self, rows):
        return {"ids": [row["id"] for row in rows], "rows": torch.tensor([len(rows)])}


def run_epoch(loader, epoch, position=None, stop_after=None):
    """The ids of each batch of `epoch` (from `position`), and the position after `stop_after` batches."""
    batches, saved = [], None
    for batch in loader.epoch_batches(epoch, position):
        batches.append(batch["ids"])
        if stop_after is not None and len(batches) == stop_after:
            saved = json.loads(json.dumps(loader.position()))  # as the checkpoint's state file keeps it
            break
    return batches, saved


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream") / "wds"
    keys = write_shards(folder, shards=4, per_shard=10, bad_every=7)  # 40 samples, 5 blank texts left out
    return folder, keys


def make_loader(folder, num_workers, seed=7, accelerator=None, batch_size=3):
    rows, _ = estimate_num_rows(str(folder))
    return StreamingLoader(
        open_source_stream(str(folder)), batch_size, IdsCollate(), num_workers=num_workers, seed=seed,
        shuffle_buffer=8, accelerator=accelerator, num_rows=rows,
    )  # fmt: skip


def test_order_is_fixed_by_seed_and_epoch_and_covers_the_data(shards):
    folder, keys = shards
    loader = make_loader(folder, num_workers=2)
    first, _ = run_epoch(loader, 0)
    again, _ = run_epoch(make_loader(folder, num_workers=2), 0)
    assert first == again  # same seed, same epoch: same batches
    assert run_epoch(loader, 1)[0] != first  # another epoch: another order
    assert run_epoch(make_loader(folder, num_workers=2, seed=8), 0)[0] != first
    seen = [key for batch in first for key in batch]
    assert len(seen) == len(set(seen)) and set(seen) <= set(keys)
    # 2 workers, 2 shards each of 8 or 9 good rows: each drops its last partial batch (of under 3 rows).
    assert len(seen) >= len(keys) - 2 * 2
    assert len(loader) == len(first)  # known once the epoch ended


def test_resume_mid_epoch_equals_a_straight_run(shards):
    folder, _ = shards
    for num_workers in (0, 2):
        straight, _ = run_epoch(make_loader(folder, num_workers), 0)
        for stop_after in (1, 4, len(straight) - 1):
            head, position = run_epoch(make_loader(folder, num_workers), 0, stop_after=stop_after)
            tail, _ = run_epoch(make_loader(folder, num_workers), 0, position)  # a fresh loader: a new process
            assert head + tail == straight, (num_workers, stop_after)
        _, last = run_epoch(make_loader(folder, num_workers), 0, stop_after=len(straight))
        assert last["complete"] and run_epoch(make_loader(folder, num_workers), 0, last)[0] == []
    _, position = run_epoch(make_loader(folder, 2), 0, stop_after=2)
    with pytest.raises(ValueError, match="same processes, DataLoader workers"):
        next(make_loader(folder, 1).epoch_batches(0, position))


def test_resume_exact_when_a_worker_runs_out_first(tmp_path):
    # 3 shards for 2 workers: one worker has twice the rows, so it goes on alone after the other has run out.
    folder = tmp_path / "uneven"
    write_shards(folder, shards=3, per_shard=7)
    straight, _ = run_epoch(make_loader(folder, 2), 0)
    seen = [key for batch in straight for key in batch]
    assert len(seen) == len(set(seen)) == 18  # 2 workers x 2 drop their partial batches of 14 and 7 rows
    for stop_after in range(1, len(straight), 2):
        head, position = run_epoch(make_loader(folder, 2), 0, stop_after=stop_after)
        tail, _ = run_epoch(make_loader(folder, 2), 0, position)
        assert head + tail == straight, stop_after


def test_length_known_or_estimated(shards, tmp_path):
    folder, _ = shards
    assert estimate_num_rows(str(folder)) == (40, "estimated")  # 4 shards x the first shard's 10 samples
    loader = make_loader(folder, num_workers=0)
    assert len(loader) == 40 // 3  # before the epoch: from the estimate
    batches, _ = run_epoch(loader, 0)
    assert len(loader) == len(batches) == 35 // 3  # after it: what it was
    import datasets

    table = datasets.Dataset.from_dict({"text": ["a", "b", "c"]})
    table.to_parquet(tmp_path / "train.parquet")
    assert estimate_num_rows(str(tmp_path)) == (3, "exact")  # parquet footers


def _two_process_epoch(folder, results):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    straight, _ = run_epoch(make_loader(folder, 1, accelerator=accelerator), 0)
    head, position = run_epoch(make_loader(folder, 1, accelerator=accelerator), 0, stop_after=2)
    tail, _ = run_epoch(make_loader(folder, 1, accelerator=accelerator), 0, position)
    results[accelerator.process_index] = {"straight": straight, "resumed": head + tail, "position": position}


def test_two_processes_read_disjoint_shards_and_resume_exactly(shards):
    import multiprocessing

    folder, _ = shards
    results = multiprocessing.Manager().dict()
    debug_launcher(_two_process_epoch, args=(folder, results), num_processes=2)
    first, second = results[0], results[1]
    for result in (first, second):
        assert result["resumed"] == result["straight"]
    assert len(first["straight"]) == len(second["straight"])  # the same number of steps everywhere
    ids = [{key for batch in result["straight"] for key in batch} for result in (first, second)]
    assert not ids[0] & ids[1]  # 2 shards each: no sample read twice
    assert {key.split("_")[0] for key in ids[0]}.isdisjoint({key.split("_")[0] for key in ids[1]})
    assert first["position"] == second["position"]  # every process knows every process's counts
