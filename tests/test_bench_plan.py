"""bench/run_all.py: the GPU plan (bf16, torch.compile, GPU batches, data-pipeline workers) only when CUDA is there."""

import sys
from pathlib import Path
from unittest import mock

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import run_all  # noqa: E402


def commands_run(cuda: bool, tmp_path, monkeypatch) -> list[list[str]]:
    """The (script + arguments) run_all.main would run, with torch.cuda.is_available() answering `cuda`."""
    commands = []

    def fake_run(script, arguments, writes_markdown, workdir):
        commands.append([script, *arguments])
        return "report", 0.0, 0

    monkeypatch.setattr(run_all, "run_benchmark", fake_run)
    monkeypatch.setattr(run_all, "README", tmp_path / "README.md")
    with mock.patch("torch.cuda.is_available", return_value=cuda):
        assert run_all.main([]) == 0
    return commands


def test_without_cuda_every_benchmark_runs_on_the_cpu(tmp_path, monkeypatch):
    commands = commands_run(False, tmp_path, monkeypatch)
    assert [command[0] for command in commands] == [script for _, script, _, _ in run_all.CPU_BENCHMARKS]
    assert not any("cuda" in command for command in commands)
    # The allocator row measures what finetune.py sets (entityclip_hf.allocator), at both batch sizes.
    assert ["bench_training_step.py", "--malloc", "mallopt"] in [command[:3] for command in commands]


def test_with_cuda_the_gpu_plan_runs(tmp_path, monkeypatch):
    commands = commands_run(True, tmp_path, monkeypatch)
    training = [command for command in commands if command[0] == "bench_training_step.py"]
    inference = [command for command in commands if command[0] == "bench_inference.py"]
    assert training and inference
    for command in training + inference:
        assert command[command.index("--device") + 1] == "cuda"
        assert command[command.index("--precision") + 1] == "bf16"
    assert any("--compile" in command for command in training)
    # The first training bench hands its figures to the data pipeline (workers needed to feed the GPU step).
    assert "--json-out" in training[0]
    pipeline = next(command for command in commands if command[0] == "bench_data_pipeline.py")
    assert "torchvision" in pipeline and "1" in pipeline[pipeline.index("--workers") :]


@pytest.mark.parametrize("flash_installed", [False, True])
def test_flash_attention_row_only_where_flash_attn_is_installed(flash_installed):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "flash_attn":
            return object() if flash_installed else None
        return real_find_spec(name, *args)

    with mock.patch("importlib.util.find_spec", side_effect=find_spec):
        device, plan, batch_size = run_all.benchmark_plan(cuda=True)
    assert device == "cuda" and batch_size == run_all.GPU_TRAINING_BATCH_SIZES[-1]
    assert (run_all.GPU_FLASH_ATTENTION in plan) == flash_installed


def test_training_bench_refuses_cuda_without_it():
    import bench_training_step

    with mock.patch("torch.cuda.is_available", return_value=False), pytest.raises(SystemExit, match="CUDA is not"):
        bench_training_step.main(["--device", "cuda"])
