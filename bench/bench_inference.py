"""Benchmark: EntityCLIP's retrieval features against CLIPModel's, on the same weights and the same batch.

Retrieval uses `get_image_features` / `get_text_features`, which must cost what CLIP's cost (target ratio <= 1.02): it
is the same computation. The models live in this process (no memory is compared) and are called in turn, in
A B C C B A order so that a drift of the machine's speed cancels out. The ratio compares the fastest call of each:
for one computation run twice, other processes on the machine only ever add time, so the minimum is the estimate of
its own cost (timeit's convention); the median of the per-round ratios is printed beside it, and a second CLIPModel
with the same weights is timed as a control: its ratio to the first is the noise floor of the measurement.

    python bench/bench_inference.py
    python bench/bench_inference.py --precision bf16 --batch-size 64 --iterations 30
"""

import argparse
import sys
from pathlib import Path

import torch
from common import format_table, machine_summary, median, random_batch, report, timed, vit_b32_clip_config
from transformers import CLIPModel

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

MAX_RATIO = 1.02


def build_models(seed: int, attn_implementation: str, device: str = "cpu") -> dict[str, torch.nn.Module]:
    """CLIPModel, a second CLIPModel and an EntityCLIPModel, all with the same CLIP weights (separate tensors).

    The second CLIPModel is the control: the same computation on another copy of the weights shows how far apart
    two identical runs are timed on this machine (the noise floor of the ratio).
    """
    config = vit_b32_clip_config(attn_implementation)
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    clip_copy = CLIPModel(config).eval()
    clip_copy.load_state_dict(clip.state_dict())
    entity = EntityCLIPModel(EntityCLIPConfig(clip_config=config)).eval()
    entity.clip.load_state_dict(clip.state_dict())
    return {"clip": clip.to(device), "clip_copy": clip_copy.to(device), "entity": entity.to(device)}


def compare(name: str, calls: dict, iterations: int, autocast: bool, device: str = "cpu") -> dict[str, dict]:
    """Time the calls in turn (A B C, then C B A, ...) after one warm-up each; check they return the same tensor.

    Returns, per call, its fastest time and its ratio to the first call's (fastest over fastest, and the median of
    the ratios of calls timed in the same round).
    """
    names = list(calls)
    times: dict[str, list[float]] = {key: [] for key in names}
    if torch.device(device).type == "cuda":
        # Timed from an idle device to the call's last kernel.
        calls = {key: _synchronised(call) for key, call in calls.items()}
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        outputs = {key: call() for key, call in calls.items()}
        for key in names[1:]:
            # On the CPU the same computation gives the same bits; cuBLAS/cuDNN may pick other kernels per call.
            same = (
                torch.equal(outputs[key], outputs[names[0]])
                if torch.device(device).type == "cpu"
                else torch.allclose(outputs[key].float(), outputs[names[0]].float(), rtol=1e-2, atol=1e-2)
            )
            if not same:
                raise RuntimeError(f"{name}: {key} returns other features than {names[0]} on the same weights")
        for iteration in range(iterations):
            for key in names if iteration % 2 == 0 else names[::-1]:
                times[key].append(timed(calls[key]))
    reference = times[names[0]]
    return {
        key: {
            "best": min(values),
            "ratio": min(values) / min(reference),
            "median_round_ratio": median([value / ref for value, ref in zip(values, reference, strict=True)]),
        }
        for key, values in times.items()
    }


def _synchronised(call):
    def run():
        torch.cuda.synchronize()
        output = call()
        torch.cuda.synchronize()
        return output

    return run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text-length", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=20, help="timed calls per model and feature (after warm-up)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = bf16 autocast")
    parser.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown-out", type=Path, help="also write the report to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"Machine: {machine_summary()}", flush=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    models = build_models(args.seed, args.attn, args.device)
    clip, clip_copy, entity = models["clip"], models["clip_copy"], models["entity"]
    batch = {
        key: value.to(args.device)
        for key, value in random_batch(args.batch_size, args.text_length, None, seed=args.seed).items()
    }
    pixel_values, input_ids, attention_mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    autocast = args.precision == "bf16"
    results = {
        "get_image_features": compare(
            "get_image_features",
            {
                "clip": lambda: clip.get_image_features(pixel_values=pixel_values).pooler_output,
                "clip_copy": lambda: clip_copy.get_image_features(pixel_values=pixel_values).pooler_output,
                "entity": lambda: entity.get_image_features(pixel_values).pooler_output,
            },
            args.iterations,
            autocast,
            args.device,
        ),
        "get_text_features": compare(
            "get_text_features",
            {
                "clip": lambda: (
                    clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
                ),
                "clip_copy": lambda: (
                    clip_copy.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
                ),
                "entity": lambda: entity.get_text_features(input_ids, attention_mask).pooler_output,
            },
            args.iterations,
            autocast,
            args.device,
        ),
    }
    rows = [
        [
            name,
            figures["clip"]["best"] * 1000,
            figures["entity"]["best"] * 1000,
            args.batch_size / figures["entity"]["best"],
            f"{figures['entity']['ratio']:.3f}",
            f"{figures['entity']['median_round_ratio']:.3f}",
            f"{figures['clip_copy']['ratio']:.3f}",
            "yes" if figures["entity"]["ratio"] <= MAX_RATIO else "NO",
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
            "median round ratio",
            "noise floor: CLIP copy ratio",
            f"ratio <= {MAX_RATIO}",
        ],
        rows,
    )
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device != "cpu" else "CPU"
    text = (
        f"Inference on {device_name}, ViT-B/32 shapes, batch {args.batch_size}, texts {args.text_length} tokens, "
        f"{args.precision}, attention {args.attn}; {args.iterations} rounds of alternated calls after 1 warm-up each; "
        f"ratio = EntityCLIP's fastest / CLIPModel's fastest; outputs identical (torch.equal; on CUDA equal within "
        f"1e-2). The control, a second CLIPModel with the same weights, shows how far apart two runs of one computation are timed here.\n\n"
        f"{table}"
    )
    report(text, args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
