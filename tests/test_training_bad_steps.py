"""examples/finetune.py on poisoned batches: NaN/inf inputs or loss skip the step (named by sample ids), weights stay
finite, --max_bad_steps bad steps in a row stop the run with a clear message, and the processes of a DDP run agree."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))
import finetune  # noqa: E402
import training_data  # noqa: E402  (builds the collator finetune.py trains with)

from entityclip_hf.data import EntityCLIPCollator  # noqa: E402

SMALL = [
    "--dataset", "demo", "--demo_entities", "8", "--demo_captions", "8",  # 48 training pairs: 6 batches of 8
    "--tiny_hidden_size", "32", "--tiny_image_size", "32", "--tiny_patch_size", "8",
    "--batch_size", "8", "--learning_rate", "5e-4", "--eval_split", "", "--test_split", "",
]  # fmt: skip


class PoisoningCollator(EntityCLIPCollator):
    """Writes `value` into the pixels of the first row of the batches numbered in `poison` (1-based, call order)."""

    poison: dict[int, float] = {}
    poisoned_ids: list[str] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __call__(self, rows):
        batch = super().__call__(rows)
        self.calls += 1
        value = type(self).poison.get(self.calls)
        if value is not None:
            batch["pixel_values"][0] = value
            type(self).poisoned_ids.append(batch["ids"][0])
        return batch


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from entityclip_hf.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("bad_steps") / "data", num_entities=8, captions_per_entity=8)


@pytest.fixture
def poisoned(monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    def poison(batches: dict[int, float]):
        monkeypatch.setattr(PoisoningCollator, "poison", batches)
        monkeypatch.setattr(PoisoningCollator, "poisoned_ids", [])
        monkeypatch.setattr(training_data, "EntityCLIPCollator", PoisoningCollator)
        return PoisoningCollator.poisoned_ids

    yield poison
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def log_records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def assert_all_finite(path: Path) -> None:
    weights = load_file(path)
    assert weights and all(bool(torch.isfinite(value).all()) for value in weights.values()), path


def test_nan_input_and_a_failing_forward_skip_their_steps_and_name_the_samples(tmp_path, data_root, poisoned, capsys):
    # Batch 2: NaN pixels (found before the forward). Batch 4: huge but finite pixels: the embeddings overflow to
    # NaN inside the model; with gamma > 0 the hard-negative sampling draws those rows uniformly (so that every
    # process reaches the loss) and the loss comes out NaN.
    poisoned_ids = poisoned({2: float("nan"), 4: 1e30})
    out = tmp_path / "run"
    results = finetune.main([*SMALL, "--dataset_root", str(data_root), "--output_dir", str(out), "--num_epochs", "1"])
    printed = capsys.readouterr().out
    assert len(poisoned_ids) == 2
    assert (
        f"warning: step 2 skipped (no update): pixel_values has 3072 NaN/inf value(s); sample ids: {poisoned_ids[0]}"
        in printed
    )
    assert "warning: step 3 skipped (no update): non-finite loss (nan)" in printed
    assert poisoned_ids[1] in printed
    records = log_records(out)
    assert [r["step"] for r in records if "skipped_step" in r] == [1, 2], "logged at the step count they did not move"
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4], "6 batches, 4 optimizer steps"
    assert all(math.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    assert results["skipped_steps"] == 2
    # No update for the skipped batches: AdamW counted 4 steps, the scheduler too.
    optimizer_state = torch.load(out / "checkpoints" / "step_4" / "optimizer.bin", weights_only=True)
    assert {float(s["step"]) for s in optimizer_state["state"].values()} == {4.0}
    for path in (out / "final" / "model.safetensors", out / "checkpoints" / "step_4" / "model.safetensors"):
        assert_all_finite(path)


def test_an_epoch_whose_last_step_is_skipped_still_gets_its_checkpoint(tmp_path, data_root, poisoned):
    poisoned({6: float("nan")})  # the last of the first epoch's 6 batches
    out = tmp_path / "run"
    finetune.main([*SMALL, "--dataset_root", str(data_root), "--output_dir", str(out), "--num_epochs", "2"])
    state = json.loads((out / "checkpoints" / "step_5" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"], state["skipped_steps"]) == (0, 6, 1)
    assert finetune.checkpoint_steps(str(out)) == [5, 11]


def test_a_nan_loss_run_stops_after_max_bad_steps_with_a_clear_message(tmp_path, data_root, poisoned, capsys):
    # gamma = 0: no sampling, so the overflow shows as a NaN loss. Every batch after the first is poisoned.
    poisoned({call: 1e30 for call in range(2, 7)})
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        finetune.main([*SMALL, "--dataset_root", str(data_root), "--output_dir", str(out), "--gamma", "0",
                       "--num_epochs", "1", "--max_bad_steps", "3"])  # fmt: skip
    message = str(stopped.value.code)
    assert message.startswith("finetune.py: error: 3 optimizer steps in a row skipped for NaN/inf (--max_bad_steps 3)")
    assert "non-finite loss (nan)" in message and "\n" not in message
    assert "warning: step 2 skipped (no update): non-finite loss (nan)" in capsys.readouterr().out
    # The good step is kept: a checkpoint of step 1 with finite weights, from which --resume continues.
    state = json.loads((out / "checkpoints" / "step_1" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["skipped_steps"] == 3 and state["batches_in_epoch"] == 4
    assert_all_finite(out / "checkpoints" / "step_1" / "model.safetensors")


def test_non_finite_weights_are_never_written(tmp_path, tiny_clip_config, tiny_processor):
    from types import SimpleNamespace

    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

    model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config))
    with torch.no_grad():
        model.itm_head.weight[0, 0] = float("nan")
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, is_main_process=True)
    with pytest.raises(
        finetune.TrainingStopped,
        match=r"refusing to write .*best: 1 weight tensor\(s\) hold NaN/inf \(itm_head.weight\)",
    ):
        finetune.save_model_folder(accelerator, model, tiny_processor, str(tmp_path / "best"))
    assert not (tmp_path / "best").exists() and not (tmp_path / "best.tmp").exists()


POISON_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {examples!r})
sys.path.insert(0, {tests!r})
import finetune
import test_training_bad_steps as helpers
import training_data

if os.environ.get("RANK") == "1":  # only process 1 sees a bad batch: process 0 must skip with it, not hang
    helpers.PoisoningCollator.poison = {{2: float("nan")}}
training_data.EntityCLIPCollator = helpers.PoisoningCollator  # where finetune.py's loaders build their collator
finetune.main(sys.argv[1:])
"""


def test_two_processes_agree_to_skip_a_batch_that_only_one_of_them_has(tmp_path, data_root):
    script = tmp_path / "poisoned_finetune.py"
    script.write_text(POISON_ON_RANK_1.format(examples=str(EXAMPLES), tests=str(REPO / "tests")))
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [*launch, str(script), *SMALL, "--dataset_root", str(data_root), "--output_dir", str(out), "--cpu",
         "--batch_size", "4", "--max_steps", "4"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "warning: step 2 skipped (no update): process 1: pixel_values has" in output
    records = log_records(out)
    assert records[0]["run"]["num_processes"] == 2
    assert [r["step"] for r in records if "skipped_step" in r] == [1]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert_all_finite(out / "final" / "model.safetensors")
