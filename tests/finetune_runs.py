"""Running `examples/finetune.py` as a user does, in a subprocess: one process, or two CPU processes (gloo) under
`accelerate launch`, one thread each (two processes x one thread on 2 cores; and multithreaded CPU BLAS is not
bitwise reproducible from one call to the next, which the resume tests need). Shared by the training tests."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
FINETUNE = str(REPO / "examples" / "finetune.py")
# `accelerate launch`, whatever is on PATH, with two CPU processes and no compile.
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TWO_CPU_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
# The slowest of these runs takes ~20 s on 2 cores; a run past this is stuck.
RUN_TIMEOUT = 300
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def run_finetune(*args, processes: int = 1, expect: int = 0, timeout: float = RUN_TIMEOUT) -> str:
    """Run finetune.py with ``args`` (converted to strings); assert its exit code; return stdout + stderr.

    A run that is not done after ``timeout`` seconds fails the test, its whole process group killed (a launcher's
    workers too), instead of holding the suite until CI's own limit.
    """
    if processes == 1:
        command = [sys.executable, FINETUNE]
    elif processes == 2:
        command = [*ACCELERATE, *TWO_CPU_PROCESSES, "--dynamo_backend", "no", FINETUNE]
    else:
        raise ValueError(f"processes must be 1 or 2 (2 CPU cores), got {processes}")
    process = subprocess.Popen(
        [*command, *map(str, args)],
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so a timeout can end the launcher's workers with it
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"finetune.py still running after {timeout:.0f} s, killed: {stderr[-4000:]}") from None
    assert process.returncode == expect, stderr[-4000:]
    return stdout + stderr


def log_by_step(output_dir) -> tuple[dict[int, dict], list[dict]]:
    """({step: every record of that step merged}, the `run` records) from a run's train_log.jsonl."""
    steps, runs = {}, []
    for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "run" in record:
            runs.append(record["run"])
        else:
            steps.setdefault(record["step"], {}).update(record)
    return steps, runs


def training_records(output_dir) -> dict[int, dict]:
    """{step: training record}; a resumed run's repeated steps overwrite the crashed run's."""
    steps = {}
    for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            steps[record["step"]] = record
    return steps


def assert_final_weights_follow(output_dir, reference_dir) -> None:
    """The final weights of one run equal another's (1e-5), each tensor by name.

    An attention key bias adds the same score to every key of a query: softmax cancels it, so its gradient is
    mathematically zero and Adam turns float noise (which differs between process counts and wrappings) into steps.
    It cannot change any output; it only has to stay near its start (1e-2). Every other weight must follow.
    """
    weights = load_file(Path(output_dir) / "final" / "model.safetensors")
    reference = load_file(Path(reference_dir) / "final" / "model.safetensors")
    assert weights.keys() == reference.keys()
    for key in reference:
        tolerance = 1e-2 if key.endswith("k_proj.bias") else 1e-5
        torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=tolerance, msg=key)
