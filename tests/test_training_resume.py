"""Checkpoint and resume: a run that crashes and is resumed ends exactly where an uninterrupted run ends.

The crashed run exits hard (`os._exit`, no cleanup) after step 7, with its last checkpoint at step 5, in the middle
of an epoch (6 batches per epoch): `--resume` must restore model, optimizer, scheduler and RNG states, skip the 5
batches already consumed in that epoch, redo steps 6-7, cross into the next epoch with the same shuffle and reach
bitwise the same weights as the straight run (one thread per process: multithreaded CPU BLAS is not bitwise
reproducible from one call to the next).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.finetune_runs import run_finetune, training_records

STEPS, SAVE_EVERY, CRASH_AFTER = 12, 5, 7
COMMON = [
    "--dataset", "demo", "--demo_entities", "8", "--demo_captions", "8",  # 48 training pairs: 6 batches of 8
    "--tiny_hidden_size", "32", "--tiny_image_size", "32", "--tiny_patch_size", "8",
    "--batch_size", "8", "--learning_rate", "5e-4", "--warmup_steps", "2", "--max_steps", str(STEPS),
    "--save_every", str(SAVE_EVERY), "--eval_every", "4", "--eval_batch_size", "8", "--test_split", "",
]  # fmt: skip


def run(output_dir, *args, expect=0):
    return run_finetune(*COMMON, "--output_dir", output_dir, *args, expect=expect)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = ["--dataset_root", str(root / "data")]
    run(root / "straight", *data)
    crashed = root / "crashed"
    run(crashed, *data, "--crash_after_step", str(CRASH_AFTER), expect=3)
    after_crash = {
        "checkpoints": sorted(p.name for p in (crashed / "checkpoints").iterdir()),
        "final": (crashed / "final").exists(),
        "logged_steps": sorted(training_records(crashed)),
    }
    # What a kill during a save leaves behind, and a checkpoint folder without its trainer state: never resumed from.
    partial = crashed / "checkpoints" / ".tmp-step_10"
    shutil.copytree(crashed / "checkpoints" / f"step_{SAVE_EVERY}", partial)
    (partial / "model.safetensors").write_bytes(b"half-written")
    shutil.copytree(partial, crashed / "checkpoints" / "step_9")
    (crashed / "checkpoints" / "step_9" / "trainer_state.json").unlink()
    output = run(crashed, *data, "--resume")
    return root, after_crash, output


def test_crash_leaves_the_last_complete_checkpoint(runs):
    _, after_crash, _ = runs
    assert after_crash["checkpoints"] == [f"step_{SAVE_EVERY}"]
    assert not after_crash["final"], "the crash came before the end"
    assert after_crash["logged_steps"] == list(range(1, CRASH_AFTER + 1)), "log lines are flushed as written"


def test_resume_picks_the_latest_complete_checkpoint(runs):
    root, _, output = runs
    assert f"resumed from {root / 'crashed' / 'checkpoints' / f'step_{SAVE_EVERY}'} at step {SAVE_EVERY}" in output
    state = json.loads((root / "crashed" / "checkpoints" / f"step_{STEPS}" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["epoch"] == 1


def test_resumed_run_repeats_the_straight_run_step_by_step(runs):
    root, _, _ = runs
    straight, resumed = training_records(root / "straight"), training_records(root / "crashed")
    assert sorted(resumed) == sorted(straight) == list(range(1, STEPS + 1))
    for step in range(SAVE_EVERY + 1, STEPS + 1):
        for name in ("train/loss", "train/itm_loss", "lr"):  # itm_loss: the hard negatives drawn are the same
            assert resumed[step][name] == straight[step][name], (step, name)


def test_resumed_run_ends_with_bitwise_the_same_weights(runs):
    root, _, _ = runs
    straight = load_file(root / "straight" / "final" / "model.safetensors")
    resumed = load_file(root / "crashed" / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    different = [key for key in straight if not torch.equal(straight[key], resumed[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # The best model (by validation rsum) and its step survive the crash too.
    results = [json.loads((root / name / "results.json").read_text()) for name in ("straight", "crashed")]
    assert results[0]["best_step"] == results[1]["best_step"]
    assert results[0]["final"] == results[1]["final"]
