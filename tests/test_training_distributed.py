"""Distributed training for real: `accelerate launch` with 2 CPU processes (gloo) against 1 process.

With gamma = 0 (the ITM head still runs, with weight 0: its hard negatives are drawn inside each process's batch, so
that term cannot match draw for draw), 2 processes x batch 8 must follow 1 process x batch 16 step by step: the
contrastive losses all-gather with gradient, the processes see the two halves of the same global batch, and DDP
averages the gradients. A 1-process run on the LOCAL batch (8) must differ, or the comparison proves nothing.
"""

import json

import pytest
import torch

from tests.finetune_runs import assert_final_weights_follow, log_by_step, run_finetune

STEPS = 6
COMMON = [
    "--dataset", "demo", "--demo_entities", "8", "--demo_captions", "8",  # 48 training pairs: 3 steps per epoch
    "--tiny_hidden_size", "32", "--tiny_image_size", "32", "--tiny_patch_size", "8",
    "--learning_rate", "5e-4", "--max_steps", str(STEPS), "--eval_every", "3", "--save_every", str(STEPS),
    "--eval_batch_size", "8", "--test_split", "", "--cpu",
    # Adam divides each gradient by its own running size: where a gradient is mathematically zero (attention key
    # biases) float noise would become full-size steps. A larger epsilon keeps noise noise.
    "--adam_epsilon", "1e-6",
]  # fmt: skip


def run(output_dir, *args, processes=1):
    return run_finetune(*COMMON, "--output_dir", output_dir, *args, processes=processes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    data = ["--dataset_root", str(root / "data")]
    run(root / "one", *data, "--batch_size", "16", "--gamma", "0")  # also builds the demo data for the others
    run(root / "two", *data, "--batch_size", "8", "--gamma", "0", processes=2)
    run(root / "local", *data, "--batch_size", "8", "--gamma", "0", "--max_steps", "1")
    output = run(root / "full", *data, "--batch_size", "8", processes=2)  # the full loss, gamma 0.1
    return root, output


def test_two_processes_really_ran(runs):
    root, _ = runs
    for name in ("two", "full"):
        _, run_records = log_by_step(root / name)
        assert run_records[0]["num_processes"] == 2, "accelerate must not fall back to one process"
    assert log_by_step(root / "one")[1][0]["num_processes"] == 1


def test_two_processes_log_the_evaluation_diagnostics(runs):
    root, _ = runs
    full, _ = log_by_step(root / "full")
    for step in (0, 3, 6):
        assert 0.0 <= full[step]["eval/itm_auc"] <= 1.0
        assert full[step]["eval/expert_contrastive_loss_shuffled_images"] > 0


def test_two_processes_follow_one_process_on_the_global_batch(runs):
    root, _ = runs
    one, _ = log_by_step(root / "one")
    two, _ = log_by_step(root / "two")
    assert sorted(one) == sorted(two) == list(range(STEPS + 1))
    for step in range(1, STEPS + 1):
        for name in ("train/loss", "train/contrastive_loss", "train/expert_contrastive_loss", "train/itm_loss"):
            assert two[step][name] == pytest.approx(one[step][name], rel=1e-5, abs=1e-6), (step, name)
        assert two[step]["lr"] == pytest.approx(one[step]["lr"], rel=1e-9), "same schedule for any process count"
    # Training moved: the losses are not constant.
    assert one[STEPS]["train/contrastive_loss"] < one[1]["train/contrastive_loss"] - 0.05
    # Evaluation gathers both processes' embeddings (dropping the duplicates that even batches add).
    for step in (0, 3, 6):
        assert two[step]["eval/contrastive_loss"] == pytest.approx(one[step]["eval/contrastive_loss"], rel=1e-5)

    assert_final_weights_follow(root / "two", root / "one")


def test_one_process_on_the_local_batch_differs(runs):
    root, _ = runs
    local, _ = log_by_step(root / "local")
    two, _ = log_by_step(root / "two")
    # The same first 8 pairs, but without the other process's 8 as negatives: a different (smaller) loss.
    assert abs(local[1]["train/contrastive_loss"] - two[1]["train/contrastive_loss"]) > 1e-2


def test_full_loss_trains_with_two_processes(runs):
    root, output = runs
    steps, _ = log_by_step(root / "full")
    assert "unused parameters" not in output.lower()
    for step in range(1, STEPS + 1):
        record = steps[step]
        assert all(torch.isfinite(torch.tensor(record[f"train/{name}"])) for name in ("loss", "itm_loss"))
        assert record["train/itm_loss"] > 0.1, "hard negatives are mined and scored"
    assert steps[STEPS]["train/loss"] < steps[1]["train/loss"]
    state = json.loads((root / "full" / "checkpoints" / f"step_{STEPS}" / "trainer_state.json").read_text())
    assert state["step"] == STEPS
    assert (root / "full" / "checkpoints" / f"step_{STEPS}" / "random_states_1.pkl").exists(), "both RNG states"
