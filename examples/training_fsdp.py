"""How `finetune.py` wraps, checkpoints and saves the model: DDP (the default), FSDP2 through torch's `fully_shard`
(`--fsdp`), or FSDP2 through Accelerate's FSDP plugin (an `accelerate launch --config_file` with `fsdp_version: 2`).

- DDP: everything goes through `accelerator.prepare` / `save_state` / `get_state_dict`, as before.
- `--fsdp`: `entityclip_hf.fsdp.shard_model` shards every parameter (CLIP's 0-dim `logit_scale` as a 1-element one,
  the open_clip way) on the accelerator's device; the optimizer is built on the shards and NOT handed to Accelerate
  (whose `save_state` would write the main process's shards only): model and optimizer state go into the checkpoint
  folder as `--fsdp_state_dict` sharded (torch.distributed.checkpoint, every process writes its shards) or full (the
  main process writes safetensors), beside Accelerate's own files (scheduler, RNG states, sampler). Mixed precision
  is FSDP's `MixedPrecisionPolicy` (bf16 compute, fp32 master weights and reductions). Tested on CPU with gloo.
- Accelerate's FSDP plugin (needs GPUs): the 0-dim parameters are reshaped before `prepare`, and back to 0-dim in
  `best/` and `final/`; Accelerate shards, checkpoints and resumes (its `fsdp_state_dict_type`).
In every mode `best/` and `final/` are ordinary `save_pretrained` folders with a 0-dim `logit_scale`.
"""

from __future__ import annotations

import os

import torch
from accelerate import DistributedType
from training_guards import UsageError

from entityclip_hf import fsdp

TORCH_FSDP, ACCELERATE_FSDP, DDP = "fsdp2 (torch fully_shard)", "fsdp2 (accelerate plugin)", "ddp"


def sharding_mode(args, accelerator) -> str:
    if accelerator.distributed_type == DistributedType.FSDP:
        return ACCELERATE_FSDP
    return TORCH_FSDP if args.fsdp else DDP


def check_sharding_setup(args, accelerator) -> None:
    """Refuse the sharding setups that cannot work, with what to do instead (a `UsageError`)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        if args.fsdp:
            raise UsageError(
                "--fsdp shards with torch's fully_shard, and the accelerate config already asks for its FSDP plugin: "
                "use one of them (drop --fsdp, or launch without the FSDP config)"
            )
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            # FSDP1 flattens parameters and fails on the 0-dim logit_scale when saving (pytorch/pytorch#132934).
            raise UsageError(
                f"accelerate's FSDP plugin with fsdp_version {version}: EntityCLIP needs fsdp_version: 2 "
                "(examples/configs/accelerate_fsdp2.yaml)"
            )
        return
    if not args.fsdp:
        return
    if accelerator.num_processes < 2:
        raise UsageError(
            "--fsdp shards the model over the launched processes: launch 2 or more (`accelerate launch "
            "--multi_gpu --num_processes N ...` or `torchrun --nproc_per_node N ...`); one process trains unsharded"
        )
    if accelerator.mixed_precision == "fp16":
        raise UsageError("--fsdp with --mixed_precision fp16: use bf16 (fp16 needs a sharded gradient scaler)")
    if args.compile:
        raise UsageError("--fsdp with --compile: not supported together yet; drop one of them")


class Sharding:
    """The model's wrapping and everything that depends on it, for one run (`finetune.py` calls these in order)."""

    def __init__(self, args, accelerator):
        self.args, self.accelerator = args, accelerator
        self.mode = sharding_mode(args, accelerator)
        self.model = self.optimizer = None

    def prepare(self, model, make_optimizer, train_loader):
        """(model, optimizer, train_loader) ready to train; `make_optimizer(model)` builds the optimizer."""
        accelerator = self.accelerator
        if self.mode == TORCH_FSDP:
            model = fsdp.shard_model(model, accelerator.device, mixed_precision=accelerator.mixed_precision)
            optimizer = make_optimizer(model)  # over the shards (DTensors)
            train_loader = accelerator.prepare(train_loader)
        else:
            if self.mode == ACCELERATE_FSDP:
                fsdp.reshape_scalar_parameters(model)  # before the optimizer holds the parameters
            optimizer = make_optimizer(model)
            model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        self.model, self.optimizer = model, optimizer
        return model, optimizer, train_loader

    def sync_gradients(self, sync: bool) -> None:
        """Under `--fsdp`, reduce-scatter the gradients only on the micro-batch that ends an accumulated step (what
        `accelerator.accumulate` does with DDP's `no_sync`)."""
        if self.mode == TORCH_FSDP:
            fsdp.set_gradient_sync(self.model, sync)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights for `save_pretrained` on the main process, 0-dim scalars (a collective)."""
        if self.mode == TORCH_FSDP:
            return fsdp.full_state_dict(self.model)
        state_dict = self.accelerator.get_state_dict(self.model)
        return fsdp.to_saved_shapes(self.accelerator.unwrap_model(self.model), state_dict) if state_dict else {}

    def model_for_saving(self):
        """The model whose `save_pretrained` writes `full_state_dict()` (its config, code files, auto_map)."""
        return fsdp.model_for_saving(self.accelerator.unwrap_model(self.model))

    def to_model_shapes(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights read from a `save_pretrained` folder in the shapes of the (reshaped) model."""
        return fsdp.to_model_shapes(self.accelerator.unwrap_model(self.model), state_dict)

    def state_bytes(self, accelerate_bytes: int) -> int:
        """Bytes a checkpoint writes: what Accelerate's `save_state` writes, plus under `--fsdp` the model and
        optimizer shards of all processes (the main process writes them all with --fsdp_state_dict full)."""
        if self.mode != TORCH_FSDP:
            return accelerate_bytes
        return accelerate_bytes + fsdp.local_state_bytes(self.model, self.optimizer) * self.accelerator.num_processes

    def save_state(self, folder: str) -> None:
        """Write the checkpoint into `folder`: Accelerate's state (with `--fsdp`: without model and optimizer), then
        the model and optimizer shards. Every process calls it."""
        self.accelerator.save_state(folder)
        if self.mode == TORCH_FSDP:
            self.accelerator.wait_for_everyone()  # the folder exists on every process
            os.makedirs(folder, exist_ok=True)
            fsdp.save_training_state(self.model, self.optimizer, folder, self.args.fsdp_state_dict)

    def load_state(self, folder: str) -> None:
        """Restore what `save_state` wrote (a sharded or full FSDP state, whichever the folder holds)."""
        if self.mode == TORCH_FSDP and fsdp.saved_kind(folder) is None:
            raise UsageError(
                f"--resume {folder}: no FSDP model state in it (a checkpoint of a run without --fsdp?): resume "
                "with the wrapping of the run that wrote it"
            )
        if self.mode != TORCH_FSDP and fsdp.saved_kind(folder) is not None:
            raise UsageError(f"--resume {folder}: a checkpoint of an --fsdp run: resume it with --fsdp")
        self.accelerator.load_state(folder)
        if self.mode == TORCH_FSDP:
            fsdp.load_training_state(self.model, self.optimizer, folder)

    def describe(self) -> str:
        if self.mode == TORCH_FSDP:
            units = len(fsdp.shard_units(self.model))
            return f"{self.mode}: {units} sharded units + root, {self.args.fsdp_state_dict} state-dict checkpoints"
        return self.mode
