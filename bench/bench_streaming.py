"""Benchmark: samples/s of the streaming training loader against the map-style one, and the DataLoader workers that a
GPU step rate of 2,000 samples/s needs, from the measured throughput of one worker.

Both loaders are the ones `examples/finetune.py` builds, with `EntityCLIPCollator(processor)` (JPEG decode, CLIP
preprocessing to 224 px, tokenizing text and explanation) in the workers:

- map-style: `load_entity_dataset("jsonl", ...)` over JPEG files + a shuffling `DataLoader` (the default path);
- streaming: the same rows as webdataset tar shards (`<key>.jpg`, `<key>.txt`, `<key>.explanation.txt`), read by
  `StreamingLoader` (datasets streaming, shuffle buffer 1000, shards split across the workers) (`--streaming`).

The data: photo-like 400x300 JPEGs (bench_data_pipeline's), news-like captions and explanations. Samples/s are
counted from the second batch on (worker start-up apart), median of the epochs. Workers needed for a target rate:
ceil(target / samples/s of 1 worker): one worker process is one core's worth of decoding; on a machine with fewer
free cores than that, the loader limits the GPU.

    python bench/bench_streaming.py
    python bench/bench_streaming.py --workers 0 1 2 --target 2000
"""

import argparse
import io
import json
import math
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench_data_pipeline import write_dataset
from common import format_table, machine_summary, median, report
from transformers import CLIPImageProcessorPil

from entityclip_hf import EntityCLIPProcessor
from entityclip_hf.data import EntityCLIPCollator, lazy_images, load_entity_dataset
from entityclip_hf.data.sources import ColumnMapping, open_source_stream
from entityclip_hf.data.streaming import StreamingLoader
from entityclip_hf.tiny_models import train_bpe_tokenizer


def write_shards(folder: Path, rows: list[dict], num_shards: int) -> Path:
    """The rows as webdataset tar shards (images as their JPEG bytes inside the tars)."""
    shards = folder / "shards"
    shards.mkdir()
    per_shard = math.ceil(len(rows) / num_shards)
    for shard in range(num_shards):
        with tarfile.open(shards / f"train-{shard:05d}.tar", "w") as tar:
            for row in rows[shard * per_shard : (shard + 1) * per_shard]:
                members = {
                    "jpg": Path(row["image"]).read_bytes(),
                    "txt": row["text"].encode(),
                    "explanation.txt": row["explanation"].encode(),
                }
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{row['id']}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return shards


def timed_epochs(make_batches, epochs: int) -> dict:
    """Samples/s of `make_batches(epoch)` after its first batch, median of `epochs`; the first batch's latency."""
    rates, first_batch = [], None
    for epoch in range(epochs):
        start = time.perf_counter()
        samples, steady_start = 0, None
        for batch in make_batches(epoch):
            if steady_start is None:
                steady_start = time.perf_counter()
                first_batch = first_batch if first_batch is not None else steady_start - start
                continue
            samples += batch["pixel_values"].shape[0]
        rates.append(samples / (time.perf_counter() - steady_start))
    return {"samples_per_second": median(rates), "first_batch": first_batch}


def map_style(dataset, collator, batch_size: int, num_workers: int, seed: int):
    import torch

    def batches(epoch):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collator,
            num_workers=num_workers, generator=torch.Generator().manual_seed(seed + epoch),
        )  # fmt: skip
        return iter(loader)

    return batches


def streaming(shards: Path, collator, batch_size: int, num_workers: int, seed: int, num_rows: int):
    stream = open_source_stream(str(shards), columns=ColumnMapping(explanation="explanation.txt"))
    loader = StreamingLoader(stream, batch_size, collator, num_workers=num_workers, seed=seed, num_rows=num_rows)
    return loader.epoch_batches


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=544, help="rows (one epoch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to measure")
    parser.add_argument("--shards", type=int, default=8, help="webdataset tar shards of the streamed copy")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--target", type=float, default=2000.0, help="GPU step rate to feed, samples/s")
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--height", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown-out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    if 1 not in args.workers:
        parser.error("--workers must include 1: the per-worker throughput is measured with one worker")
    if args.num_samples < 2 * args.batch_size * max(1, max(args.workers)):
        parser.error("--num-samples must give every worker at least 2 batches")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"Machine: {machine_summary()}", flush=True)
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        corpus = write_dataset(folder, args.num_samples, args.width, args.height, args.seed)
        rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
        shards = write_shards(folder, rows, args.shards)
        processor = EntityCLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=train_bpe_tokenizer(corpus))
        collator = EntityCLIPCollator(processor, return_ids=True)
        dataset = lazy_images(load_entity_dataset("jsonl", folder, splits=["train"])["train"])
        for num_workers in args.workers:
            print(f"{num_workers} workers: map-style ...", flush=True)
            batches = map_style(dataset, collator, args.batch_size, num_workers, args.seed)
            results["map-style", num_workers] = timed_epochs(batches, args.epochs)
            print(f"{num_workers} workers: streaming ...", flush=True)
            batches = streaming(shards, collator, args.batch_size, num_workers, args.seed, len(rows))
            results["streaming", num_workers] = timed_epochs(batches, args.epochs)
    table_rows = []
    for (kind, num_workers), figures in results.items():
        table_rows.append([kind, num_workers, figures["samples_per_second"], figures["first_batch"]])
    table = format_table(["loader", "DataLoader workers", "samples/s", "first batch (s)"], table_rows)
    needs = []
    for kind in ("map-style", "streaming"):
        per_worker = results[kind, 1]["samples_per_second"]
        needs.append([kind, per_worker, math.ceil(args.target / per_worker)])
    needs_table = format_table(["loader", "samples/s of 1 worker", f"workers for {args.target:,.0f} samples/s"], needs)
    ratio = {w: results["streaming", w]["samples_per_second"] / results["map-style", w]["samples_per_second"]
             for w in args.workers}  # fmt: skip
    text = (
        f"Streaming vs map-style training loader: {args.num_samples} rows, {args.width}x{args.height} JPEGs, batch "
        f"{args.batch_size}, streamed from {args.shards} webdataset shards (shuffle buffer 1000); samples/s after "
        f"the first batch, median of {args.epochs} epochs. Streaming / map-style: "
        + ", ".join(f"{ratio[w]:.2f}x at {w} workers" for w in args.workers)
        + f".\n\n{table}\n\nDataLoader workers a GPU step of {args.target:,.0f} samples/s needs (ceil(target / one "
        f"worker's samples/s); one worker is about one core):\n\n{needs_table}"
    )
    report(text, args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
