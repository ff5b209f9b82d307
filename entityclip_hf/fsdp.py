"""FSDP2 for EntityCLIP: shard every parameter with torch's `fully_shard`, and save ordinary checkpoints from it.

CLIP's `logit_scale` is a 0-dim parameter and `fully_shard` refuses those ("Change logit_scale to a 1D tensor"). As
open_clip's `--fsdp` does, every 0-dim parameter is reshaped to 1 element before sharding (the model's arithmetic
broadcasts a [1] tensor exactly like a scalar) and back to 0-dim in every state dict written to disk, so `best/`,
`final/` and full checkpoints stay ordinary `save_pretrained` weights that `AutoModel` and `CLIPModel` load.

Training-state checkpoints come in two kinds:
- "sharded": torch.distributed.checkpoint (DCP), every process writes its own shards of the model and optimizer in
  parallel, nothing is ever gathered (the kind for large backbones; DCP's own format, loadable with any process count);
- "full": the main process writes the whole model (`fsdp_full_model.safetensors`, 0-dim scalars: an ordinary state
  dict) and the optimizer state (`fsdp_full_optimizer.safetensors`, flattened tensors + JSON parameter groups); they
  are broadcast back into the shards on load.
Loading finds the kind from the folder, whatever the saving run was told.

Used by `examples/finetune.py --fsdp` (and the GPU path through accelerate's FSDP plugin for the reshaping) and by
`bench/bench_fsdp_memory.py`. Imports torch only.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# Set on a model once its 0-dim parameters are 1-element tensors: the names, to restore them in saved state dicts.
SCALARS_ATTRIBUTE = "_entityclip_reshaped_scalars"
SHARDED_FOLDER = "fsdp_sharded"  # DCP checkpoint inside a training-state folder
FULL_MODEL_FILE = "fsdp_full_model.safetensors"  # not Accelerate's model.safetensors: the kinds never mix
FULL_OPTIMIZER_FILE = "fsdp_full_optimizer.safetensors"
STATE_DICT_KINDS = ("sharded", "full")
# Modules that become one FSDP unit each: one all-gather of their weights per forward, freed after it.
_UNIT_CLASS_SUFFIXES = ("EncoderLayer", "ExpertBank", "CrossModalMatcher")
# Methods that the model calls on a unit besides `forward`: FSDP must gather the unit's weights for them too.
_UNIT_FORWARD_METHODS = ("keys_values",)


# ----------------------------------------------------------------------------------------- 0-dim parameters
def reshape_scalar_parameters(model: nn.Module) -> list[str]:
    """Make every 0-dim parameter of `model` a 1-element one (in place; FSDP2 refuses 0-dim), returning their names.

    Idempotent. The optimizer must be built after this call (it holds the parameter objects).
    """
    names = list(getattr(model, SCALARS_ATTRIBUTE, []))
    for name, param in list(model.named_parameters()):
        if param.ndim == 0:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            setattr(owner, leaf, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
            names.append(name)
    setattr(model, SCALARS_ATTRIBUTE, names)
    return names


def to_saved_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the reshaped `model` with its former 0-dim parameters 0-dim again (what disk holds)."""
    names = set(getattr(model, SCALARS_ATTRIBUTE, []))
    return {
        key: value.reshape(()) if key in names and value.numel() == 1 else value for key, value in state_dict.items()
    }


def to_model_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from disk (0-dim scalars) in the shapes of the reshaped `model` (1-element)."""
    names = set(getattr(model, SCALARS_ATTRIBUTE, []))
    return {key: value.reshape(1) if key in names and value.ndim == 0 else value for key, value in state_dict.items()}


# ----------------------------------------------------------------------------------------- sharding
def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules sharded as units of their own: CLIP's encoder layers, the expert banks, the ITM matcher."""
    return [module for module in model.modules() if type(module).__name__.endswith(_UNIT_CLASS_SUFFIXES)]


def shard_model(model: nn.Module, device: torch.device, mixed_precision: str = "no") -> nn.Module:
    """Shard every parameter of `model` over all processes with FSDP2 (`fully_shard`), in place; returns it.

    One unit per encoder layer and expert bank, then the root (embeddings, projections, gates, heads, logit_scale).
    `mixed_precision` "bf16" computes in bfloat16 with float32 master weights and float32 gradient reduction (FSDP's
    own policy; Accelerate's autocast does not reach a model it did not prepare). Needs an initialised process group.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP needs a process group: launch with `accelerate launch` or `torchrun`")
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(
            f"FSDP mixed precision {mixed_precision!r}: use 'bf16' or 'no' (fp16 needs a sharded gradient scaler)"
        )
    reshape_scalar_parameters(model)
    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16"
        else MixedPrecisionPolicy()
    )
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
        for method in _UNIT_FORWARD_METHODS:
            if hasattr(unit, method):
                register_fsdp_forward_method(unit, method)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def model_for_saving(model: nn.Module) -> nn.Module:
    """What to call `save_pretrained(folder, state_dict=full_state_dict(model))` on: `model` itself, or for a sharded
    one a weightless (meta-device) twin of its own class. FSDP2 swaps the class for a generated `FSDP<Class>` defined
    in torch, and `save_pretrained` would write that class into `auto_map` and copy torch's files beside the weights."""
    if not is_sharded(model):
        return model
    from torch.distributed.fsdp import FSDPModule

    own_class = next(c for c in type(model).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
    with torch.device("meta"):
        return own_class(model.config)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter gradients on this backward (True) or keep accumulating them unsharded (False): FSDP2's
    counterpart of DDP's `no_sync`, for gradient accumulation."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


# ----------------------------------------------------------------------------------------- state dicts
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of the main process, in their saved shapes (0-dim scalars); `{}` on the
    other processes. A collective: every process calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state_dict = get_model_state_dict(model, options=options)
    return to_saved_shapes(model, state_dict) if _rank() == 0 else {}


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load whole weights read on the main process (disk shapes) into the sharded `model`; the other processes pass
    `{}` and receive their shards by broadcast. A collective."""
    state_dict = to_model_shapes(model, state_dict) if _rank() == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, state_dict, options=options)


# ----------------------------------------------------------------------------------------- training checkpoints
def save_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str, kind: str) -> None:
    """Write model and optimizer state into `folder` (which exists on every process that writes), as `kind`."""
    if kind not in STATE_DICT_KINDS:
        raise ValueError(f"state dict kind {kind!r}: expected one of {STATE_DICT_KINDS}")
    if kind == "sharded":
        import torch.distributed.checkpoint as dcp

        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=os.path.join(folder, SHARDED_FOLDER))
        return
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = full_state_dict(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if _rank() == 0:
        save_file(model_state, os.path.join(folder, FULL_MODEL_FILE), metadata={"format": "pt"})
        tensors, metadata = _flatten_optimizer_state(model, optimizer_state)
        save_file(tensors, os.path.join(folder, FULL_OPTIMIZER_FILE), metadata=metadata)


def saved_kind(folder: str) -> str | None:
    """Which kind of training state `folder` holds ("sharded", "full"), or None."""
    if os.path.isdir(os.path.join(folder, SHARDED_FOLDER)):
        return "sharded"
    if os.path.exists(os.path.join(folder, FULL_MODEL_FILE)) and os.path.exists(
        os.path.join(folder, FULL_OPTIMIZER_FILE)
    ):
        return "full"
    return None


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> str:
    """Restore model and optimizer state written by `save_training_state` (either kind); returns the kind."""
    kind = saved_kind(folder)
    if kind is None:
        raise ValueError(
            f"{folder}: no FSDP training state ({SHARDED_FOLDER}/, or {FULL_MODEL_FILE} + {FULL_OPTIMIZER_FILE}); "
            "was it written by a run without --fsdp? Resume with the same sharding as the run that wrote it"
        )
    if kind == "sharded":
        import torch.distributed.checkpoint as dcp

        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=os.path.join(folder, SHARDED_FOLDER))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        return kind
    model_state, optimizer_state = {}, {}
    if _rank() == 0:
        model_state = load_file(os.path.join(folder, FULL_MODEL_FILE))
        optimizer_state = _unflatten_optimizer_state(model, os.path.join(folder, FULL_OPTIMIZER_FILE))
    load_full_state_dict(model, model_state)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    return kind


def _flatten_optimizer_state(model, optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    # safetensors holds flat tensors: "<parameter name>/<state name>" (0-dim scalars as saved), and the parameter
    # groups (floats, names) go to the header as JSON. Nothing in it needs unpickling to load.
    tensors = {}
    for param_name, param_state in optimizer_state["state"].items():
        for key, value in param_state.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"{param_name}/{key}"] = value.detach().cpu().contiguous()
    return _flat_saved_shapes(model, tensors), {"param_groups": json.dumps(optimizer_state["param_groups"])}


def _flat_saved_shapes(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = set(getattr(model, SCALARS_ATTRIBUTE, []))
    return {
        key: value.reshape(()) if key.rpartition("/")[0] in names and value.numel() == 1 else value
        for key, value in tensors.items()
    }


def _unflatten_optimizer_state(model, path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        param_groups = json.loads(f.metadata()["param_groups"])
    names = set(getattr(model, SCALARS_ATTRIBUTE, []))
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path).items():
        param_name, _, state_name = key.rpartition("/")
        if param_name in names and state_name != "step" and value.ndim == 0:
            value = value.reshape(1)
        state.setdefault(param_name, {})[state_name] = value
    return {"state": state, "param_groups": param_groups}


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of this process's shards of the model (and optimizer state): what it holds and writes."""

    def local(value):
        return value.to_local() if hasattr(value, "to_local") else value

    count = sum(local(p).numel() * p.element_size() for p in model.parameters())
    if optimizer is not None:
        for param_state in optimizer.state.values():
            count += sum(local(v).numel() * v.element_size() for v in param_state.values() if torch.is_tensor(v))
    return count


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


__all__ = [
    "STATE_DICT_KINDS",
    "full_state_dict",
    "is_sharded",
    "load_full_state_dict",
    "load_training_state",
    "local_state_bytes",
    "model_for_saving",
    "reshape_scalar_parameters",
    "save_training_state",
    "saved_kind",
    "set_gradient_sync",
    "shard_model",
    "shard_units",
    "to_model_shapes",
    "to_saved_shapes",
]
