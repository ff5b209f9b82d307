"""Where `finetune.py` writes and reads its model folders and checkpoints, atomically and never over a full disk.

- `best/`, `final/`: `save_pretrained` folders (safetensors, the code files for trust_remote_code, the processor),
  written to a temporary folder and renamed; whatever wraps the model (DDP, FSDP2), the weights are whole tensors
  with CLIP's 0-dim `logit_scale`.
- `checkpoints/step_N`: Accelerate's `save_state` (and, under `--fsdp`, the model and optimizer shards: see
  `training_fsdp.py`) plus the loop position in `trainer_state.json`; rotated to `--keep_checkpoints`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from training_fsdp import Sharding
from training_guards import (
    TrainingStopped,
    UsageError,
    agree_on_problem,
    checkpoint_room_problem,
    guarded_write,
    main_process_decides,
    nonfinite_weights,
    state_bytes,
    tensor_bytes,
)

STATE_FILE = "trainer_state.json"


def replace_dir(tmp: str, final: str) -> None:
    """Move the finished folder `tmp` to `final`, so that `final` is never a half-written folder."""
    old = final + ".old"
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def refuse_nonfinite_weights(model, path: str) -> None:
    """No NaN weights on disk: the skipped steps keep them out; this would catch a way in that they do not."""
    bad = nonfinite_weights(model)
    if bad:
        raise TrainingStopped(
            f"refusing to write {path}: {len(bad)} weight tensor(s) hold NaN/inf ({', '.join(bad[:3])})"
        )


def save_model_folder(accelerator, model, processor, path: str, sharding: Sharding | None = None) -> None:
    """`save_pretrained` of model (safetensors, code files for trust_remote_code) and processor, atomically."""
    refuse_nonfinite_weights(accelerator.unwrap_model(model), path)
    # A collective under FSDP/DeepSpeed: every process calls it. FSDP: whole tensors, 0-dim logit_scale.
    state_dict = sharding.full_state_dict() if sharding else accelerator.get_state_dict(model)
    problem = None
    if accelerator.is_main_process:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)

        def write():
            saving = sharding.model_for_saving() if sharding else accelerator.unwrap_model(model)
            saving.save_pretrained(tmp, state_dict=state_dict)
            processor.save_pretrained(tmp)
            replace_dir(tmp, path)

        problem = guarded_write(path, os.path.dirname(os.path.abspath(path)), room_needed(state_dict), write, tmp)
    problem = main_process_decides(problem, accelerator)  # every process stops, or none
    if problem:
        raise TrainingStopped(problem)
    accelerator.wait_for_everyone()


def room_needed(tensors) -> int:
    """Bytes to have free before writing `tensors` (a state dict, an accelerator's state): theirs, plus headers."""
    count = tensors if isinstance(tensors, int) else tensor_bytes(tensors)
    return int(count * 1.01) + (1 << 20)


def load_model_folder(model, path: str, sharding: Sharding | None = None) -> None:
    """Load the weights of a `save_pretrained` folder into the prepared `model` in place (to test best/).

    `set_model_state_dict` takes the full tensors whatever wraps the model (DDP here; it would also fill FSDP shards).
    Every process calls it.
    """
    full_state_dict = {}
    for shard in sorted(Path(path).glob("*.safetensors")):  # one file, or the shards of a large model
        full_state_dict.update(load_file(shard))
    if sharding:  # FSDP: the 0-dim logit_scale of the folder as the model's 1-element shard
        full_state_dict = sharding.to_model_shapes(full_state_dict)
    set_model_state_dict(model, full_state_dict, options=StateDictOptions(full_state_dict=True, strict=True))


def checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the complete checkpoints in output_dir/checkpoints, oldest first."""
    folder = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    names = [m.group(1) for m in map(re.compile(r"step_(\d+)$").match, os.listdir(folder)) if m]
    return sorted(int(n) for n in names if os.path.exists(os.path.join(folder, f"step_{n}", STATE_FILE)))


def save_checkpoint(accelerator, args, state: dict, sharding: Sharding | None = None) -> None:
    """`save_state` (model, optimizer, scheduler, RNGs) + the loop position, written to a temp folder then renamed.

    Free space is checked first: what rotation deletes after this checkpoint may go before it, but never the newest
    complete checkpoint. A full disk stops the run on every process with a message saying so.
    """
    folder = os.path.join(args.output_dir, "checkpoints")
    tmp, final = os.path.join(folder, f".tmp-step_{state['step']}"), os.path.join(folder, f"step_{state['step']}")
    refuse_nonfinite_weights(sharding.model if sharding else accelerator.unwrap_model(accelerator._models[0]), final)
    needed = room_needed(sharding.state_bytes(state_bytes(accelerator)) if sharding else state_bytes(accelerator))
    problem, save_state = None, sharding.save_state if sharding else accelerator.save_state
    if accelerator.is_main_process:
        os.makedirs(folder, exist_ok=True)
        steps = [step for step in checkpoint_steps(args.output_dir) if step != state["step"]]
        rotated = steps[: max(0, len(steps) - (args.keep_checkpoints - 1))][: len(steps) - 1]  # never the newest
        deletable = [os.path.join(folder, f"step_{step}") for step in rotated]
        problem = checkpoint_room_problem(folder, needed, deletable, final)
    problem = main_process_decides(problem, accelerator)
    if problem is None:  # every process writes its part (its RNG state), then all agree on how it went
        problem = agree_on_problem(guarded_write(final, folder, 0, lambda: save_state(tmp)), accelerator)
    if problem is None and accelerator.is_main_process:

        def finish():
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f, indent=2)
            replace_dir(tmp, final)
            for step in checkpoint_steps(args.output_dir)[: -args.keep_checkpoints]:
                shutil.rmtree(os.path.join(folder, f"step_{step}"), ignore_errors=True)

        problem = guarded_write(final, folder, 0, finish)
    problem = main_process_decides(problem, accelerator)
    if problem is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint only takes the room others need
        raise TrainingStopped(problem)
    accelerator.wait_for_everyone()


def find_checkpoint(args) -> str | None:
    """The checkpoint folder --resume asks for (given, or the latest complete one), or None."""
    if not args.resume:
        return None
    if args.resume != "latest":
        if not os.path.exists(os.path.join(args.resume, STATE_FILE)):
            raise UsageError(f"--resume {args.resume}: not a complete checkpoint (no {STATE_FILE})")
        return args.resume
    steps = checkpoint_steps(args.output_dir)
    return os.path.join(args.output_dir, "checkpoints", f"step_{steps[-1]}") if steps else None
