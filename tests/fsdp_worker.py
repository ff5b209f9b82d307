"""Launched by tests/test_training_fsdp.py with `torchrun --nproc_per_node 2`: FSDP2 against DDP in the same processes.

Each process builds the same tiny EntityCLIP (same seed), takes its half of one global batch of 16 pairs and runs one
training forward and backward three ways: DDP, FSDP2 (`entityclip_hf.fsdp.shard_model`), and FSDP2 with activation
checkpointing. The same ITM negatives are drawn each time (the RNG is reseeded before every forward). Then an AdamW
step on the FSDP2 model is saved as a sharded and as a full training state, loaded into fresh sharded models, and one
more step is taken on each. Process 0 writes what it measured to the JSON file named on the command line; the test
asserts on it.
"""

import copy
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel, fsdp
from entityclip_hf.data import EntityCLIPCollator
from entityclip_hf.tiny_models import tiny_clip_config, tiny_processor

GLOBAL_BATCH = 16


def global_batch(processor):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(GLOBAL_BATCH):
        pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
        samples.append(
            {
                "image": Image.fromarray(pixels),
                "text": f"senator number {i} speaks at the harbour festival",
                "explanation": f"person {i} is a politician; the harbour is in the capital" if i % 3 else None,
                "id": str(i),
            }
        )
    return EntityCLIPCollator(processor)(samples)


def training_loss(model, inputs, rank):
    torch.manual_seed(1000 + rank)  # the same hard negatives for every wrapping
    output = model(**inputs, return_loss=True)
    return output.loss, output


def full_gradients(model):
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        grads[name.removeprefix("module.")] = grad.detach().reshape(-1).clone()
    return grads


def max_relative_difference(a: dict, b: dict) -> float:
    return max(relative_differences(a, b).values())


def relative_differences(a: dict, b: dict) -> dict[str, float]:
    """{name: max |a - b| / (1e-5 max |b| + 1e-8)}: at most 1 where tensor `a` equals `b` to 1e-5 of its size (the
    1e-8 floor: attention key biases, whose gradient is mathematically zero, hold float noise only); a wrong
    reduction (gradients summed instead of averaged, a missing shard) is >> 1."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return {key: float((a[key] - b[key]).abs().max() / (1e-5 * b[key].abs().max() + 1e-8)) for key in a}


def full_parameters(model):
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1).clone()
        for name, p in model.named_parameters()
    }


def main(result_path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    processor = tiny_processor()
    torch.manual_seed(0)
    config = EntityCLIPConfig(clip_config=tiny_clip_config(processor.tokenizer), gamma=0.1, beta=0.1)
    reference = EntityCLIPModel(config)
    batch = global_batch(processor)
    half = GLOBAL_BATCH // world
    local = {k: v[rank * half : (rank + 1) * half] for k, v in batch.items() if torch.is_tensor(v)}
    results = {}

    ddp = DistributedDataParallel(copy.deepcopy(reference))
    ddp_loss, _ = training_loss(ddp, local, rank)
    ddp_loss.backward()
    ddp_grads = full_gradients(ddp)

    sharded = fsdp.shard_model(copy.deepcopy(reference), torch.device("cpu"))
    results["scalars_reshaped"] = getattr(sharded, fsdp.SCALARS_ATTRIBUTE)
    results["all_parameters_sharded"] = all(type(p).__name__ == "DTensor" for p in sharded.parameters())
    results["shard_units"] = len(fsdp.shard_units(sharded))
    fsdp_loss, _ = training_loss(sharded, local, rank)
    fsdp_loss.backward()
    fsdp_grads = full_gradients(sharded)
    losses = torch.stack([ddp_loss.detach(), fsdp_loss.detach()])
    all_losses = [torch.zeros_like(losses) for _ in range(world)]
    dist.all_gather(all_losses, losses)
    results["losses"] = [x.tolist() for x in all_losses]  # per process: [ddp, fsdp]
    differences = relative_differences(fsdp_grads, ddp_grads)
    results["gradient_difference_fsdp_vs_ddp"] = dict(sorted(differences.items(), key=lambda kv: -kv[1])[:5])
    # What one process computes before any averaging: the measure must tell it from the averaged gradients.
    alone = copy.deepcopy(reference)
    alone_loss, _ = training_loss(alone, local, rank)
    alone_loss.backward()
    results["gradient_difference_process_local_vs_ddp"] = max_relative_difference(full_gradients(alone), ddp_grads)
    results["nonzero_gradients"] = sum(int(g.abs().sum() > 0) for g in ddp_grads.values())
    results["gradients"] = len(ddp_grads)

    # Activation checkpointing: the encoder layers run again in the backward; the gradients do not change.
    checkpointed = copy.deepcopy(reference)
    checkpointed.activation_checkpointing_enable({"use_reentrant": False})
    calls = []
    # transformers checkpoints a layer's `forward`, and the recompute runs no module hooks: count the MLP's forwards.
    calls = []
    mlp_class = type(checkpointed.clip.vision_model.encoder.layers[0].mlp)
    mlp_forward = mlp_class.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(1)
        return mlp_forward(self, *args, **kwargs)

    mlp_class.forward = counting_forward
    checkpointed = fsdp.shard_model(checkpointed, torch.device("cpu"))
    loss, _ = training_loss(checkpointed, local, rank)
    forward_calls = len(calls)
    loss.backward()
    mlp_class.forward = mlp_forward
    results["checkpointed_layer_calls"] = [forward_calls, len(calls)]
    results["gradient_difference_checkpointed_vs_ddp"] = max_relative_difference(
        full_gradients(checkpointed), ddp_grads
    )

    # Training state: a step, saved both ways, loaded into fresh sharded models, then one more step on each.
    def optimizer_for(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-3)

    optimizer = optimizer_for(sharded)
    optimizer.step()
    folder = tempfile.mkdtemp(prefix="fsdp-state-") if rank == 0 else None
    holder = [folder]
    dist.broadcast_object_list(holder)
    folder = holder[0]
    for kind in fsdp.STATE_DICT_KINDS:
        os.makedirs(os.path.join(folder, kind), exist_ok=True)
        fsdp.save_training_state(sharded, optimizer, os.path.join(folder, kind), kind)
    dist.barrier()
    full = fsdp.full_state_dict(sharded)
    if rank == 0:
        results["full_state_dict_logit_scale_shape"] = list(full["clip.logit_scale"].shape)
        results["full_state_dict_keys_match"] = sorted(full) == sorted(reference.state_dict())

    def next_step(model, opt):
        opt.zero_grad()
        loss, _ = training_loss(model, local, rank)
        loss.backward()
        opt.step()
        return full_parameters(model)

    loaded = {}
    for kind in fsdp.STATE_DICT_KINDS:
        fresh = fsdp.shard_model(copy.deepcopy(reference), torch.device("cpu"))
        fresh_optimizer = optimizer_for(fresh)
        results[f"{kind}_loaded_kind"] = fsdp.load_training_state(fresh, fresh_optimizer, os.path.join(folder, kind))
        results[f"{kind}_loaded_parameters_difference"] = max_relative_difference(
            full_parameters(fresh), full_parameters(sharded)
        )
        loaded[kind] = (fresh, fresh_optimizer)
    after_straight = next_step(sharded, optimizer)  # the run that was never interrupted
    for kind, (fresh, fresh_optimizer) in loaded.items():
        # Equal only if the optimizer state (Adam's moments and step) came back too.
        results[f"{kind}_next_step_difference"] = max_relative_difference(
            next_step(fresh, fresh_optimizer), after_straight
        )
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(results, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
