"""examples/finetune.py on a full disk (simulated: shutil.disk_usage and the savers patched): the message says that
the disk is full, which folder, how much the checkpoint needs and how much is free; rotation never deletes the
newest complete checkpoint before the new one is complete, and no half-written checkpoint is left behind."""

import errno
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
import finetune  # noqa: E402
import training_guards  # noqa: E402

DISK_FULL_ERRORS = [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4736 vs 4628"),
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
]


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    optimizer.step()  # AdamW's moments exist: the checkpoint holds 3x the weights
    accelerator.prepare(model, optimizer)
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def simulate_disk(monkeypatch, root: Path, free_now: int) -> None:
    """A disk that has `free_now` bytes free at this moment: deleting or writing files under `root` changes it."""
    capacity = free_now + folder_bytes(root)
    real = shutil.disk_usage

    def disk_usage(path):
        total = real(path)
        return total._replace(free=max(0, capacity - folder_bytes(root)))

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def save(accelerator, out: Path, step: int, keep: int) -> None:
    state = {"step": step, "epoch": 0, "batches_in_epoch": step}
    finetune.save_checkpoint(accelerator, SimpleNamespace(output_dir=str(out), keep_checkpoints=keep), state)


def test_rotation_frees_the_oldest_checkpoint_before_writing_when_the_disk_needs_it(accelerator, tmp_path, monkeypatch):
    out = tmp_path / "run"
    save(accelerator, out, 1, keep=2)
    save(accelerator, out, 2, keep=2)
    checkpoints = out / "checkpoints"
    needed = finetune.room_needed(training_guards.state_bytes(accelerator))
    simulate_disk(monkeypatch, out, free_now=needed - 1)  # room for the new one only once step_1 is gone
    seen_while_writing = []
    real_save_state = accelerator.save_state
    monkeypatch.setattr(
        accelerator,
        "save_state",
        lambda path: (seen_while_writing.append(sorted(p.name for p in checkpoints.iterdir())), real_save_state(path)),
    )
    save(accelerator, out, 3, keep=2)
    assert seen_while_writing == [["step_2"]], "step_1 (rotated anyway) went first; step_2, the newest, stayed"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2", "step_3"]
    assert finetune.checkpoint_steps(str(out)) == [2, 3]


def test_the_newest_complete_checkpoint_is_never_deleted_to_make_room(accelerator, tmp_path, monkeypatch):
    out = tmp_path / "run"
    save(accelerator, out, 2, keep=1)
    (out / "checkpoints" / ".tmp-step_1").mkdir()  # an interrupted write of an earlier run: may go
    (out / "checkpoints" / ".tmp-step_1" / "model.safetensors").write_bytes(b"\0" * 1000)
    needed = finetune.room_needed(training_guards.state_bytes(accelerator))
    simulate_disk(monkeypatch, out, free_now=needed // 2)
    monkeypatch.setattr(accelerator, "save_state", lambda path: pytest.fail("must not start writing"))
    with pytest.raises(finetune.TrainingStopped) as stopped:
        save(accelerator, out, 3, keep=1)
    message = str(stopped.value)
    free = needed // 2 + 1000
    assert message.startswith(f"the disk is full: writing {out / 'checkpoints' / 'step_3'} needs about ")
    assert (
        f"({needed} bytes of tensors) and {out / 'checkpoints'} has {training_guards.format_bytes(free)} free"
        in message
    )
    assert "--resume" in message and "\n" not in message
    assert finetune.checkpoint_steps(str(out)) == [2], "the last complete checkpoint is kept"
    assert not (out / "checkpoints" / ".tmp-step_1").exists(), "the leftover of an interrupted write was deleted"


@pytest.mark.parametrize("error", DISK_FULL_ERRORS, ids=["torch", "oserror", "safetensors"])
def test_a_save_that_fails_on_a_full_disk_says_so_and_leaves_no_partial_checkpoint(
    accelerator, tmp_path, monkeypatch, error
):
    out = tmp_path / "run"
    save(accelerator, out, 1, keep=2)

    def fail_midway(path):
        os.makedirs(path, exist_ok=True)
        Path(path, "model.safetensors").write_bytes(b"\0" * 100)
        raise error

    monkeypatch.setattr(accelerator, "save_state", fail_midway)
    with pytest.raises(finetune.TrainingStopped, match=r"^the disk is full: writing .*step_2 needs about .* free \("):
        save(accelerator, out, 2, keep=2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"], "no .tmp-step_2 left"


def test_other_save_errors_are_bugs_and_raised_as_they_are(accelerator, tmp_path, monkeypatch):
    monkeypatch.setattr(accelerator, "save_state", lambda path: (_ for _ in ()).throw(KeyError("a bug")))
    with pytest.raises(KeyError, match="a bug"):
        save(accelerator, tmp_path / "run", 1, keep=2)


def test_best_folder_on_a_full_disk(tmp_path, monkeypatch, tiny_clip_config, tiny_processor):
    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

    model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config))
    accelerator = SimpleNamespace(
        unwrap_model=lambda m: m, is_main_process=True, num_processes=1, get_state_dict=lambda m: m.state_dict(),
        wait_for_everyone=lambda: None,
    )  # fmt: skip
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "config.json").write_text("{}")  # the earlier best/
    simulate_disk(monkeypatch, tmp_path, free_now=1000)
    with pytest.raises(finetune.TrainingStopped, match=rf"the disk is full: writing {tmp_path / 'best'} needs about"):
        finetune.save_model_folder(accelerator, model, tiny_processor, str(tmp_path / "best"))
    assert (tmp_path / "best" / "config.json").read_text() == "{}", "the earlier best/ is untouched"
    assert not (tmp_path / "best.tmp").exists()


def test_finetune_exits_with_one_line_on_a_full_disk(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    from entityclip_hf.data import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", num_entities=8, captions_per_entity=8)
    out = tmp_path / "run"
    simulate_disk(monkeypatch, tmp_path, free_now=0)
    arguments = [
        "--dataset", "demo", "--dataset_root", str(data), "--demo_entities", "8", "--demo_captions", "8",
        "--tiny_hidden_size", "32", "--batch_size", "8", "--eval_split", "", "--test_split", "",
        "--max_steps", "2", "--save_every", "1", "--output_dir", str(out),
    ]  # fmt: skip
    try:
        with pytest.raises(SystemExit) as stopped:
            finetune.main(arguments)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    message = str(stopped.value.code)
    assert message.startswith(f"finetune.py: error: the disk is full: writing {out / 'checkpoints' / 'step_1'}")
    assert "\n" not in message and not (out / "checkpoints" / ".tmp-step_1").exists()
