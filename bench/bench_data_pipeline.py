"""Benchmark: samples/s of the data pipeline (dataset + EntityCLIPCollator) against the training step's samples/s.

The pipeline is the one training uses: `load_entity_dataset` over JSON lines, `lazy_images`, a `DataLoader` with
`EntityCLIPCollator(processor)`: JPEG decode, CLIP preprocessing (resize the shortest edge to 224 px bicubic,
centre crop, normalise: `CLIPImageProcessorPil`'s defaults) and tokenizing text and explanation (padding to the
longest of the batch). The data: photo-like 400x300 JPEGs (quality 85, ~40-60 KB, like news photos) written into a
temporary folder, with captions and explanations from the demo dataset's generator (joined to news-like lengths).

The loader must not be what limits training: its samples/s with 0 and 2 DataLoader workers is compared with the
EntityCLIP training step's samples/s at the same batch size (measured here, or passed in by bench/run_all.py from
the training bench of the same run), and the samples/s of one worker says how many workers that rate needs.

`--decoders pil torchvision` also measures torchvision's JPEG decoder (`torchvision.io.decode_jpeg`) with
transformers' torchvision-backend `CLIPImageProcessor` on the decoded tensors, the same texts tokenized by the same
processor. That path is the benchmark's own (`TorchvisionCollator` below): `EntityCLIPCollator` decodes with PIL.

    python bench/bench_data_pipeline.py
    python bench/bench_data_pipeline.py --training-samples-per-second 2.5   # skip the training-step measurement
    python bench/bench_data_pipeline.py --workers 0 1 2 4 --decoders pil torchvision   # needs torchvision
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import Worker, format_table, machine_summary, median, report
from PIL import Image
from transformers import CLIPImageProcessorPil

from entityclip_hf import EntityCLIPProcessor
from entityclip_hf.data import EntityCLIPCollator, lazy_images, load_entity_dataset, make_demo_dataset
from entityclip_hf.tiny_models import train_bpe_tokenizer


def photo_like_jpeg(path: Path, width: int, height: int, rng: np.random.Generator) -> None:
    """A JPEG whose content compresses like a photograph: smooth shapes of colour plus fine grain."""
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 10, size=(height, width, 3))
    pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=85)


def write_dataset(folder: Path, num_samples: int, width: int, height: int, seed: int) -> list[str]:
    """A JSON-lines dataset of `num_samples` rows (train split); returns the texts (to train the tokenizer on)."""
    demo = make_demo_dataset(folder / "demo", image_size=16, seed=seed)
    captions = [json.loads(line)["text"] for line in (demo / "train.jsonl").read_text().splitlines()]
    explanations = list(json.loads((demo / "CapDsc_mistral_train.json").read_text()).values())
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir()
    rows = []
    for index in range(num_samples):
        image = folder / "images" / f"{index:05d}.jpg"
        photo_like_jpeg(image, width, height, rng)
        # News captions run to a sentence or two; LLM explanations to several sentences (the processor truncates).
        text = " ".join(captions[(index + k) % len(captions)] for k in range(2))
        explanation = " ".join(explanations[(index + k) % len(explanations)] for k in range(4))
        rows.append({"id": f"bench-{index}", "image": str(image), "text": text, "explanation": explanation})
    with (folder / "train.jsonl").open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return [row["text"] for row in rows] + [row["explanation"] for row in rows]


class TorchvisionCollator:
    """Rows -> model inputs with torchvision's JPEG decoder and the torchvision-backend `CLIPImageProcessor` (tensors
    all the way), texts and explanations tokenized by `processor` as `EntityCLIPCollator` does. No bad-row handling:
    a benchmark of the decoder, not a training collator."""

    def __init__(self, processor):
        from transformers import CLIPImageProcessor

        self.processor = processor
        self.image_processor = CLIPImageProcessor()  # the torchvision backend when torchvision is installed

    def __call__(self, rows):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        images = [
            decode_jpeg(
                torch.frombuffer(row["image"]["bytes"], dtype=torch.uint8) if row["image"].get("bytes")
                else read_file(row["image"]["path"]),
                mode=ImageReadMode.RGB,
            )
            for row in rows
        ]  # fmt: skip
        batch = self.processor(
            text=[row["text"] for row in rows], explanations=[row["explanation"] for row in rows], return_tensors="pt"
        )
        batch["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return batch


def times_training(samples_per_second: float, training: float) -> str:
    """How many times the training step's rate the loader delivers, e.g. "167x" or "2.5x"."""
    ratio = samples_per_second / training
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def torchvision_available() -> bool:
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # noqa: BLE001 - a torchvision without its C++ ops raises RuntimeError at import
        return False
    return True


def loader_throughput(dataset, collate_fn, batch_size: int, num_workers: int, epochs: int) -> dict:
    """Samples/s of iterating a DataLoader over `dataset`; the first batch (worker start-up) is timed apart."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    epoch_rates, first_batch, lengths = [], None, {"input_ids": [], "explanation_input_ids": []}
    for _ in range(epochs):
        start = time.perf_counter()
        samples, steady_start = 0, None
        for batch in loader:
            if steady_start is None:
                # From the first batch on: worker start-up and the first batch's latency are not throughput.
                steady_start = time.perf_counter()
                if first_batch is None:
                    first_batch = steady_start - start
                continue
            samples += batch["pixel_values"].shape[0]
            for name in lengths:
                lengths[name].append(batch[name].shape[1])
        epoch_rates.append(samples / (time.perf_counter() - steady_start))
    del loader
    return {
        "samples_per_second": median(epoch_rates),
        "first_batch": first_batch,
        "text_length": float(np.mean(lengths["input_ids"])),
        "explanation_length": float(np.mean(lengths["explanation_input_ids"])),
    }


def training_samples_per_second(batch_size: int, iterations: int) -> float:
    """EntityCLIP training-step samples/s (fp32, ViT-B/32 shapes, texts 40 and explanations 77 tokens)."""
    from training_steps import Setup, TrainingStep

    with Worker("entityclip", TrainingStep, "entityclip", batch_size, 40, 77, Setup(), seed=0) as worker:
        worker.call("timed_step")  # warm-up
        times = [worker.call("timed_step")[0] for _ in range(iterations)]
    return batch_size / median(times)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=544, help="rows of the dataset (one epoch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers to measure")
    parser.add_argument(
        "--decoders", nargs="+", choices=["pil", "torchvision"], default=["pil"],
        help="JPEG decoders: pil (EntityCLIPCollator's) and torchvision (decode_jpeg + torchvision image processor)",
    )  # fmt: skip
    parser.add_argument("--training-source", help="where --training-samples-per-second comes from (printed)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per worker count (median)")
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--height", type=int, default=300)
    parser.add_argument("--training-samples-per-second", type=float, help="skip measuring the training step")
    parser.add_argument("--training-iterations", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown-out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.num_samples < 2 * args.batch_size:
        # The rate is counted from the second batch on (worker start-up excluded): one batch measures nothing.
        parser.error(f"--num-samples must be at least 2 x --batch-size ({2 * args.batch_size})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"Machine: {machine_summary()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        corpus = write_dataset(folder, args.num_samples, args.width, args.height, args.seed)
        jpeg_kib = np.mean([path.stat().st_size for path in (folder / "images").glob("*.jpg")]) / 1024
        processor = EntityCLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=train_bpe_tokenizer(corpus))
        dataset = lazy_images(load_entity_dataset("jsonl", folder, splits=["train"])["train"])
        collators = {"pil": EntityCLIPCollator(processor)}
        if "torchvision" in args.decoders:
            if torchvision_available():
                collators["torchvision"] = TorchvisionCollator(processor)
            else:
                print("torchvision cannot be imported here: its decoder is not measured", flush=True)
        collators = {name: collator for name, collator in collators.items() if name in args.decoders}
        results = {}
        for decoder, collator in collators.items():
            for num_workers in args.workers:
                print(f"{decoder} decoder, DataLoader with {num_workers} workers ...", flush=True)
                results[decoder, num_workers] = loader_throughput(
                    dataset, collator, args.batch_size, num_workers, args.epochs
                )
    if args.training_samples_per_second is None:
        print(f"EntityCLIP training step at batch {args.batch_size} ...", flush=True)
        training = training_samples_per_second(args.batch_size, args.training_iterations)
        training_source = f"measured here: median of {args.training_iterations} steps after 1 warm-up"
    else:
        training = args.training_samples_per_second
        training_source = args.training_source or "from the training-step benchmark of the same run"
    rows = [
        [
            decoder,
            num_workers,
            figures["samples_per_second"],
            figures["samples_per_second"] / max(num_workers, 1),
            figures["first_batch"],
            times_training(figures["samples_per_second"], training),
            "no" if figures["samples_per_second"] > training else "YES",
        ]
        for (decoder, num_workers), figures in results.items()
    ]
    table = format_table(
        [
            "decoder",
            "DataLoader workers",
            "samples/s",
            "per worker",
            "first batch (s)",
            "x training samples/s",
            "limits training",
        ],
        rows,
    )
    # Workers needed to feed the training step: from one worker's measured rate (a worker is one process doing
    # everything for its batches; several scale with the cores until the cores run out).
    needed = []
    for decoder in collators:
        if (decoder, 1) in results:
            per_worker = results[decoder, 1]["samples_per_second"]
            needed.append(f"{decoder}: {math.ceil(training / per_worker)} worker(s) at {per_worker:.0f} samples/s each")
    needed_text = ""
    if needed:
        needed_text = (
            f"\nDataLoader workers needed to feed {training:.1f} samples/s (one worker's measured rate; this machine "
            f"has {os.cpu_count()} cores): " + "; ".join(needed) + "."
        )
    inline = ""
    if ("pil", 0) in results:
        # Without workers the training process itself loads each batch between steps: this much longer a step.
        inline = (
            f" Loading in the training process (0 workers) would add "
            f"{100 * training / results['pil', 0]['samples_per_second']:.1f}% to each step; with workers it overlaps."
        )
    any_result = next(iter(results.values()))
    text = (
        f"Data pipeline: {args.num_samples} rows, {args.width}x{args.height} JPEGs (mean {jpeg_kib:.0f} KiB), "
        f"batch {args.batch_size}, padded lengths text {any_result['text_length']:.0f} / explanation "
        f"{any_result['explanation_length']:.0f} tokens on average; samples/s after the first batch, median of "
        f"{args.epochs} epochs.\nEntityCLIP training step (batch {args.batch_size}): "
        f"{training:.2f} samples/s ({training_source}).{inline}{needed_text}\n\n{table}"
    )
    report(text, args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
