"""Peak memory per process of one EntityCLIP ViT-B/32 training step: DDP against FSDP2, N CPU processes (gloo).

    python bench/bench_fsdp_memory.py                          # DDP and FSDP2, 2 processes, batch 8 per process
    python bench/bench_fsdp_memory.py --processes 2 --batch-size 8 --checkpointing   # + activation checkpointing rows

For each wrapping, N processes are launched with torchrun (`--standalone`); each builds EntityCLIP on ViT-B/32's
shapes (bench/common.py, random init, nothing downloaded), wraps it (DDP, or `entityclip_hf.fsdp.shard_model`, what
`finetune.py --fsdp` runs), builds AdamW on what it holds and takes `--steps` full training steps (forward with
explanations and the three losses, backward, AdamW step, zero_grad) on its own random batch. Reported per process:
- peak resident memory (`VmHWM`) over the steps, minus the process's resident memory before the model was built
  (torch and Python themselves excluded): weights, gradients, DDP's gradient buckets, AdamW state, activations and
  allocator slack;
- the bytes of the parameters, gradients and AdamW state this process holds (its shards under FSDP2), counted from
  the tensors: the part that sharding divides by N.
The worst process is reported (they differ by a few MiB). Nothing is asserted: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from common import (
        peak_resident_memory_bytes,
        random_batch,
        reset_peak_resident_memory,
        resident_memory_bytes,
        vit_b32_clip_config,
    )
    from torch.nn.parallel import DistributedDataParallel

    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel, fsdp
    from entityclip_hf.fsdp import local_state_bytes

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(args.threads)

    batch = random_batch(args.batch_size, args.text_length, 77, seed=rank)
    reset_peak_resident_memory()
    before_model = resident_memory_bytes()
    torch.manual_seed(0)
    model = EntityCLIPModel(EntityCLIPConfig(clip_config=vit_b32_clip_config()))
    if args.checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    if args.mode == "fsdp":
        model = fsdp.shard_model(model, torch.device("cpu"))
    else:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    seconds = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    # Gradients are the parameters' size (and layout); they are freed by zero_grad, so counted from the parameters.
    gradients = local_state_bytes(model)
    result = {
        "rank": rank,
        "peak_above_start": peak_resident_memory_bytes() - before_model,
        "parameters_and_optimizer": local_state_bytes(model, optimizer),
        "parameters_gradients_optimizer": local_state_bytes(model, optimizer) + gradients,
        "step_seconds": seconds,
        "loss": float(loss.detach()),
    }
    Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# Larger CLIP backbones (their Hub configs' shapes): (text width, text MLP, text layers, text heads,
# vision width, vision MLP, vision layers, vision heads, patch, projection).
BACKBONES = {
    "ViT-L/14": (768, 3072, 12, 12, 1024, 4096, 24, 16, 14, 768),
    "ViT-H/14": (1024, 4096, 24, 16, 1280, 5120, 32, 16, 14, 1024),
    "ViT-bigG/14": (1280, 5120, 32, 20, 1664, 8192, 48, 16, 14, 1280),
}


def backbone_config(name: str):
    from common import vit_b32_clip_config

    config = vit_b32_clip_config()
    if name == "ViT-B/32":
        return config
    text, text_mlp, text_layers, text_heads, vision, vision_mlp, vision_layers, vision_heads, patch, projection = (
        BACKBONES[name]
    )
    text_config, vision_config = config.text_config.to_dict(), config.vision_config.to_dict()
    text_config.update(hidden_size=text, intermediate_size=text_mlp, num_hidden_layers=text_layers,
                       num_attention_heads=text_heads, projection_dim=projection)  # fmt: skip
    vision_config.update(hidden_size=vision, intermediate_size=vision_mlp, num_hidden_layers=vision_layers,
                         num_attention_heads=vision_heads, patch_size=patch, projection_dim=projection)  # fmt: skip
    return type(config)(text_config=text_config, vision_config=vision_config, projection_dim=projection)


def state_table() -> str:
    """Parameters of EntityCLIP (4/4/4 experts) per backbone, counted on the meta device, and the bytes of weights,
    gradients and AdamW moments (fp32) each process holds: all of them with DDP (+ its gradient buckets), 1/N with
    FSDP2."""
    import torch
    from common import format_table

    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

    rows = []
    for name in ("ViT-B/32", *BACKBONES):
        with torch.device("meta"):
            model = EntityCLIPModel(EntityCLIPConfig(clip_config=backbone_config(name)))
        count = sum(p.numel() for p in model.parameters())
        clip = sum(p.numel() for p in model.clip.parameters())
        state = 16 * count  # fp32 weights 4 + gradients 4 + AdamW moments 8 bytes per parameter
        rows.append([name, clip / 1e6, count / 1e6, (state + 4 * count) / 2**30, state / 8 / 2**30, state / 32 / 2**30])
    headers = ["backbone", "CLIP parameters (M)", "EntityCLIP parameters (M)", "DDP, per process (GiB)",
               "FSDP2, 8 processes (GiB each)", "FSDP2, 32 processes (GiB each)"]  # fmt: skip
    return format_table(headers, rows)


def launch(mode: str, checkpointing: bool, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-fsdp-{mode}-") as result_dir:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
            __file__, "--worker", "--mode", mode, "--result-dir", result_dir, "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--threads", str(args.threads), "--text-length", str(args.text_length),
        ] + (["--checkpointing"] if checkpointing else [])  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode != 0:
            raise SystemExit(f"{mode} run failed:\n{completed.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(result_dir).glob("rank*.json"))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per process")
    parser.add_argument("--steps", type=int, default=2, help="training steps (the first allocates AdamW's state)")
    parser.add_argument("--text-length", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--checkpointing", action="store_true", help="also rows with activation checkpointing")
    parser.add_argument("--state-table", action="store_true", help="only print the training state per backbone")
    parser.add_argument("--markdown-out", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    from common import format_table, report

    if args.state_table:
        print(state_table())
        return
    rows = []
    runs = [("ddp", False), ("fsdp", False)] + ([("ddp", True), ("fsdp", True)] if args.checkpointing else [])
    for mode, checkpointing in runs:
        results = launch(mode, checkpointing, args)
        worst = max(results, key=lambda r: r["peak_above_start"])
        label = {"ddp": "DDP", "fsdp": "FSDP2 (fully_shard)"}[mode] + (" + activation checkpointing" * checkpointing)
        rows.append(
            [
                label,
                worst["peak_above_start"] / 2**20,
                worst["parameters_gradients_optimizer"] / 2**20,
                max(s for r in results for s in r["step_seconds"][1:] or r["step_seconds"]),
            ]
        )
    headers = [
        f"ViT-B/32 EntityCLIP step, {args.processes} CPU processes x batch {args.batch_size}",
        "peak memory per process above start (MiB)",
        "parameters + gradients + AdamW state held (MiB)",
        "slowest step (s)",
    ]
    report(format_table(headers, rows), args.markdown_out)


if __name__ == "__main__":
    main()
