"""`finetune.py --streaming` on webdataset shards with 2 DataLoader workers: a run that crashes mid-epoch and is
resumed repeats the straight run step by step and ends with bitwise the same weights; column flags are checked."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.finetune_runs import run_finetune, training_records
from tests.test_data_sources import write_shards

STEPS, SAVE_EVERY, CRASH_AFTER = 9, 4, 6
COMMON = [
    "--tiny_hidden_size", "32", "--tiny_image_size", "32", "--tiny_patch_size", "8",
    "--batch_size", "8", "--learning_rate", "5e-4", "--max_steps", str(STEPS), "--save_every", str(SAVE_EVERY), "--keep_checkpoints", "5",
    "--test_split", "", "--streaming", "--num_workers", "2", "--shuffle_buffer", "16",
]  # fmt: skip


def run(*args, expect=0):
    return run_finetune(*COMMON, *args, expect=expect)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    write_shards(root / "wds", shards=4, per_shard=12)  # 48 samples, 2 workers x 3 batches of 8 per epoch
    data = ["--dataset", root / "wds"]
    run(*data, "--output_dir", root / "straight")
    run(*data, "--output_dir", root / "crashed", "--crash_after_step", CRASH_AFTER, expect=3)
    output = run(*data, "--output_dir", root / "crashed", "--resume")
    return root, output


def test_streamed_run_resumed_mid_epoch_repeats_the_straight_run(runs):
    root, output = runs
    assert f"resumed from {root / 'crashed' / 'checkpoints' / f'step_{SAVE_EVERY}'}" in output
    state = json.loads((root / "crashed" / "checkpoints" / f"step_{SAVE_EVERY}" / "trainer_state.json").read_text())
    assert state["epoch"] == 0 and state["batches_in_epoch"] == SAVE_EVERY  # mid-epoch (6 batches)
    assert sum(state["stream_position"]["batches"][0]) == SAVE_EVERY
    straight, resumed = training_records(root / "straight"), training_records(root / "crashed")
    assert sorted(straight) == sorted(resumed) == list(range(1, STEPS + 1))
    assert {straight[step]["epoch"] for step in straight} == {0, 1}  # crosses into the next epoch
    for step in range(SAVE_EVERY + 1, STEPS + 1):
        for name in ("train/loss", "train/itm_loss", "lr"):
            assert resumed[step][name] == straight[step][name], (step, name)
    weights = [load_file(root / name / "final" / "model.safetensors") for name in ("straight", "crashed")]
    different = [key for key in weights[0] if not torch.equal(weights[0][key], weights[1][key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_column_flags_are_checked(tmp_path):
    write_shards(tmp_path / "wds", shards=1, per_shard=2)
    output = run("--dataset", tmp_path / "wds", "--text_column", "caption", "--output_dir", tmp_path / "out", expect=2)
    assert "no column 'caption' (--text_column); its columns: ['jpg', 'txt', '__key__', '__url__']" in output
    output = run("--dataset", "jsonl", "--dataset_root", tmp_path, "--text_column", "caption", expect=2)
    assert "--text_column: only for a datasets source" in output
