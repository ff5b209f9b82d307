"""What keeps `finetune.py` going on bad batches and stops it cleanly on a full disk, apart from the training loop.

- Bad steps: a batch with NaN/inf inputs, a forward that fails on non-finite values (`torch.multinomial` in the
  hard-negative sampling) or a non-finite loss is skipped (no parameter update, gradients dropped) with a warning
  naming its sample ids; every process takes the same decision, so DDP never waits for a process that skipped;
  `--max_bad_steps` bad optimizer steps in a row stop the run.
- Checkpoints: a full disk is said as such (which folder, how much the state needs, how much is free) instead of
  torch's `[enforce fail at inline_container.cc...]`; room is made by deleting checkpoints that rotation would delete
  anyway, never the newest complete one; weights that are not finite are never written.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, gather_object

logger = logging.getLogger("entityclip_hf.finetune")

# What torch.multinomial says when the hard-negative weights hold NaN or inf (torch 2.x, CPU and CUDA).
_SAMPLING_FAILURE = "probability tensor contains either `inf`, `nan` or element < 0"
# How the savers report a full disk: OSError's errno, torch's zip writer, safetensors' Rust I/O error.
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXTS = ("No space left", "StorageFull", "Disk quota exceeded", "enforce fail at inline_container.cc",
                    "file write failed")  # fmt: skip


class UsageError(ValueError):
    """A user error found once the run opens its data or model (a folder's layout, a checkpoint that cannot be
    loaded, an output folder holding another run): `finetune.py` says it on one line and exits with status 2."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many bad steps in a row, a full disk): the message says why and what to do."""


# ------------------------------------------------------------------------------------------------ bad batches
def nonfinite_inputs(inputs: dict[str, torch.Tensor]) -> str | None:
    """Which floating-point model inputs hold NaN or inf, in words, or None."""
    found = []
    for name, value in inputs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                found.append(f"{name} has {bad} NaN/inf value(s)")
    return "; ".join(found) or None


def guarded_forward(model, inputs: dict[str, torch.Tensor]):
    """(output, problem): the training forward, with a failure on non-finite values or a non-finite loss named as
    the batch's problem instead of raised. Other errors are bugs and are raised."""
    try:
        output = model(**inputs, return_loss=True)
    except RuntimeError as error:
        if _SAMPLING_FAILURE not in str(error):
            raise
        # The embeddings became NaN/inf inside the model (an overflow) and torch noticed in a sampling op. The
        # model's own hard-negative sampling draws such rows uniformly, so this catches models that do not.
        return None, f"the forward failed on non-finite values ({str(error).splitlines()[0]})"
    if not bool(torch.isfinite(output.loss.detach()).all()):
        return output, f"non-finite loss ({output.loss.item()})"
    return output, None


def on_any_process(flag: bool, accelerator) -> bool:
    """True on every process when `flag` is true on one of them: all processes skip together, or none does."""
    if accelerator.num_processes == 1:
        return flag
    count = torch.tensor([int(flag)], device=accelerator.device)
    return bool(accelerator.reduce(count, "sum").item() > 0)


def describe_bad_batch(problem: str | None, ids: list[str], accelerator) -> str:
    """The problem of every process that had one, with its batch's sample ids (a collective: all processes call it)."""
    reports = gather_object([(accelerator.process_index, problem, ids)])
    parts = []
    for process, process_problem, process_ids in reports:
        if process_problem is not None:
            where = f"process {process}: " if accelerator.num_processes > 1 else ""
            shown = ", ".join(process_ids[:20]) + (", ..." if len(process_ids) > 20 else "")
            parts.append(f"{where}{process_problem}; sample ids: {shown or 'unknown'}")
    return " | ".join(parts)


class BadStepCounter:
    """Counts optimizer steps skipped in a row: `bad_step` says when `max_in_a_row` of them must stop the run."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row  # 0: never stop
        self.in_a_row = 0

    def good_step(self) -> None:
        self.in_a_row = 0

    def bad_step(self) -> bool:
        """Count one skipped step; True when the run must stop."""
        self.in_a_row += 1
        return bool(self.max_in_a_row) and self.in_a_row >= self.max_in_a_row

    def stop_message(self, last_problem: str, checkpoint: str) -> str:
        return (
            f"{self.in_a_row} optimizer steps in a row skipped for NaN/inf (--max_bad_steps {self.max_in_a_row}); "
            f"the last: {last_problem}. The weights are those of the last good step, saved in {checkpoint}: look at "
            "these samples, or lower --learning_rate / set --max_grad_norm, then --resume"
        )


# ------------------------------------------------------------------------------------------------ checkpoints
def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _tensor_bytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def tensor_bytes(value) -> int:
    """Bytes of the tensors in `value` (a tensor, or dicts / lists of them, like a state dict)."""
    return _tensor_bytes(value)


def state_bytes(accelerator) -> int:
    """Bytes of the tensors `save_state` writes: every model's state dict and every optimizer's state."""
    models = sum(_tensor_bytes(model.state_dict()) for model in accelerator._models)
    optimizers = sum(_tensor_bytes(optimizer.state_dict()["state"]) for optimizer in accelerator._optimizers)
    return models + optimizers


def free_bytes(folder: str) -> int:
    """Free space of the file system holding `folder` (or the nearest existing folder above it)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    return any(text in str(error) for text in _DISK_FULL_TEXTS)


def disk_full_message(what: str, folder: str, needed: int, error: BaseException | None = None) -> str:
    cause = f" ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})" if error else ""
    return (
        f"the disk is full: writing {what} needs about {format_bytes(needed)} ({needed} bytes of tensors) and {folder} "
        f"has {format_bytes(free_bytes(folder))} free{cause}. Free some space (or lower --keep_checkpoints, or choose "
        "an --output_dir on a larger disk), then --resume: the last complete checkpoint is kept"
    )


def make_room(folder: str, needed: int, deletable: list[str]) -> list[str]:
    """Delete folders of `deletable` (oldest first) until `needed` bytes are free; the ones deleted.

    `deletable` must hold only checkpoints that rotation would delete after the new one is written anyway, and never
    the newest complete one: deleting them first loses nothing that would have been kept.
    """
    deleted = []
    for path in deletable:
        if free_bytes(folder) >= needed:
            break
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def checkpoint_room_problem(folder: str, needed: int, deletable: list[str], what: str) -> str | None:
    """Make room for a checkpoint of `needed` bytes in `folder` before writing it, or say why there is none.

    Deleted, oldest first and only as far as needed: incomplete `.tmp-*` folders of interrupted writes, then the
    `deletable` checkpoints (those rotation deletes once the new one is written, never the newest complete one).
    """
    if free_bytes(folder) >= needed:
        return None
    leftovers = sorted(str(path) for path in Path(folder).glob(".tmp-*") if path.is_dir())
    deleted = make_room(folder, needed, leftovers + deletable)
    if deleted:
        logger.warning("made room for %s: deleted %s", what, ", ".join(deleted))
    if free_bytes(folder) >= needed:
        return None
    return disk_full_message(what, folder, needed)


def guarded_write(what: str, folder: str, needed: int, write, cleanup: str | None = None) -> str | None:
    """Run `write()`; a full disk (checked first when `needed` > 0, or the writer's own error) becomes the returned
    message, after removing the half-written `cleanup` folder. Other errors are bugs: raised."""
    if needed and free_bytes(folder) < needed:
        return disk_full_message(what, folder, needed)
    try:
        write()
    except Exception as error:  # torch raises RuntimeError, safetensors SafetensorError, Python OSError
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        if is_disk_full(error):
            return disk_full_message(what, folder, max(needed, 1), error)
        raise
    return None


def agree_on_problem(problem: str | None, accelerator) -> str | None:
    """Every process's problem (one string), the same on all of them: a collective that all processes call."""
    problems = [item for item in gather_object([problem]) if item is not None]
    return " | ".join(dict.fromkeys(problems)) or None


def main_process_decides(value, accelerator):
    """The main process's `value` on every process (a collective)."""
    return broadcast_object_list([value], from_process=0)[0] if accelerator.num_processes > 1 else value


def nonfinite_weights(model) -> list[str]:
    """Names of the parameters or buffers holding NaN or inf (empty when all are finite)."""
    return [
        name
        for name, value in list(model.named_parameters()) + list(model.named_buffers())
        if value.is_floating_point() and not bool(torch.isfinite(value.detach()).all())
    ]


__all__ = [
    "BadStepCounter",
    "TrainingStopped",
    "UsageError",
    "agree_on_problem",
    "checkpoint_room_problem",
    "describe_bad_batch",
    "disk_full_message",
    "format_bytes",
    "free_bytes",
    "guarded_forward",
    "guarded_write",
    "is_disk_full",
    "main_process_decides",
    "make_room",
    "nonfinite_inputs",
    "nonfinite_weights",
    "on_any_process",
    "state_bytes",
    "tensor_bytes",
]
