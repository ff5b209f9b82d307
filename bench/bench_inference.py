"""Benchmark: EntityCLIP's retrieval features against CLIPModel's, on the same weights and the same batch.

Retrieval uses `get_image_features` / `get_text_features`, which must cost what CLIP's cost (target ratio <= 1.02): it
is the same computation. Both models live in this process (no memory is compared) and are called alternately, in
A B B A order so that a drift of the machine's speed cancels out. The ratio compares the fastest call of each: for
one computation run twice, other processes on the machine only ever add time, so the minimum is the estimate of
its own cost (timeit's convention); the median of the per-pair ratios is printed beside it.

    python bench/bench_inference.py
    python bench/bench_inference.py --precision bf16 --batch-size 64
"""

import argparse
import sys
from pathlib import Path

import torch
from common import format_table, machine_summary, median, random_batch, timed, vit_b32_clip_config
from transformers import CLIPModel

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

MAX_RATIO = 1.02


def build_models(seed: int, attn_implementation: str) -> tuple[CLIPModel, EntityCLIPModel]:
    """A CLIPModel and an EntityCLIPModel whose CLIP weights are a copy of it (separate tensors, equal values)."""
    config = vit_b32_clip_config(attn_implementation)
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    entity = EntityCLIPModel(EntityCLIPConfig(clip_config=config)).eval()
    entity.clip.load_state_dict(clip.state_dict())
    return clip, entity


def compare(name: str, clip_call, entity_call, iterations: int, autocast: bool) -> dict:
    """Time both calls alternately (A B B A ...) after one warm-up each; check they return the same tensor."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        clip_out, entity_out = clip_call(), entity_call()
        if not torch.equal(clip_out, entity_out):
            raise RuntimeError(f"{name}: EntityCLIP's features differ from CLIPModel's on the same weights")
        clip_times, entity_times = [], []
        for iteration in range(iterations):
            if iteration % 2 == 0:
                clip_times.append(timed(clip_call))
                entity_times.append(timed(entity_call))
            else:
                entity_times.append(timed(entity_call))
                clip_times.append(timed(clip_call))
    pair_ratios = [e / c for e, c in zip(entity_times, clip_times, strict=True)]
    return {
        "clip": min(clip_times),
        "entity": min(entity_times),
        "ratio": min(entity_times) / min(clip_times),
        "median_pair_ratio": median(pair_ratios),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text-length", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=10, help="timed calls per model and feature (after warm-up)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = bf16 autocast")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown-out", type=Path, help="also write the report to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"Machine: {machine_summary()}", flush=True)
    clip, entity = build_models(args.seed, args.attn)
    batch = random_batch(args.batch_size, args.text_length, None, seed=args.seed)
    pixel_values, input_ids, attention_mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    autocast = args.precision == "bf16"
    results = {
        "get_image_features": compare(
            "get_image_features",
            lambda: clip.get_image_features(pixel_values=pixel_values).pooler_output,
            lambda: entity.get_image_features(pixel_values),
            args.iterations,
            autocast,
        ),
        "get_text_features": compare(
            "get_text_features",
            lambda: clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output,
            lambda: entity.get_text_features(input_ids, attention_mask),
            args.iterations,
            autocast,
        ),
    }
    rows = [
        [
            name,
            figures["clip"] * 1000,
            figures["entity"] * 1000,
            args.batch_size / figures["entity"],
            f"{figures['ratio']:.3f}",
            f"{figures['median_pair_ratio']:.3f}",
            "yes" if figures["ratio"] <= MAX_RATIO else "NO",
        ]
        for name, figures in results.items()
    ]
    table = format_table(
        [
            "features",
            "CLIPModel (ms)",
            "EntityCLIP (ms)",
            "EntityCLIP samples/s",
            "ratio",
            "median pair ratio",
            f"ratio <= {MAX_RATIO}",
        ],
        rows,
    )
    text = (
        f"Inference, ViT-B/32 shapes, batch {args.batch_size}, texts {args.text_length} tokens, {args.precision}, "
        f"attention {args.attn}; best of {args.iterations} alternated calls after 1 warm-up each; ratio = EntityCLIP's "
        f"best / CLIP's best; outputs identical (torch.equal).\n\n{table}\n\nMachine: {machine_summary()}"
    )
    print("\n" + text)
    if args.markdown_out:
        args.markdown_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
