"""`entityclip-eval`: evaluate any saved model on any supported dataset split and print the paper's retrieval table.

    entityclip-eval --model outputs/run/best --dataset n24news --root data/N24News --split test --output metrics.json
    python -m entityclip_hf.evaluation --model openai/clip-vit-base-patch32 --dataset jsonl --root my_data

The protocol is the paper's: the whole split is one gallery, each image's only positive is its own text (and back);
R@1/5/10/50/100, median and mean rank in both directions, and rsum. Only the CLIP embeddings are used (EntityCLIP's
inference), so plain CLIP checkpoints are evaluated the same way, for baselines. Encoding runs under bf16 autocast on
GPUs that support it and in float32 on CPU; an image that cannot be read drops its pair (reported) instead of
ending the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .data.report import one_line
from .loaders import load_model_and_processor, load_split
from .metrics import retrieval_metrics
from .retrieval import encode_explanations, encode_images, encode_texts, fuse_explanation_embeddings
from .retrieval.embeddings import _atomic_write

__all__ = [
    "EvaluationResult",
    "evaluate_split",
    "format_metrics_table",
    "load_model_and_processor",
    "load_split",
    "main",
    "run",
    "small_gallery_warning",
]

logger = logging.getLogger(__name__)

DATASET_CHOICES = ("n24news", "visualnews", "goodnews", "jsonl", "demo")
_DIRECTIONS = (("i2t", "image → text"), ("t2i", "text → image"))
_RECALL_KS = (1, 5, 10, 50, 100)


@dataclass
class EvaluationResult:
    """Metrics of one split, with what was left out."""

    metrics: dict[str, float]
    num_pairs: int
    """Pairs in the gallery (after dropping those that could not be encoded)."""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """`{"index", "id", "reason"}` of each pair left out."""
    seconds: float = 0.0
    image_embeds: torch.Tensor | None = None
    """[num_pairs, D] the gallery's image embeddings (the pairs kept), for reranking."""
    text_embeds: torch.Tensor | None = None
    """[num_pairs, D] its text embeddings (explanation-fused when asked)."""
    kept_rows: list[int] | None = None
    """Row of the split of each kept pair."""


def evaluate_split(
    model,
    processor,
    dataset,
    batch_size: int = 64,
    chunk_size: int = 4096,
    num_workers: int = 0,
    progress: bool = True,
    id_column: str = "id",
    explanation_weight: float = 0.0,
) -> EvaluationResult:
    """Encode a split (a `datasets.Dataset` with `image` and `text` columns) and compute the retrieval metrics.

    Texts and images are encoded in separate passes (the text pass decodes no image). Pairs whose image or text
    cannot be encoded are dropped from the gallery and listed in `skipped`. With `explanation_weight` > 0 (opt-in;
    the paper uses 0), each text is fused with its `explanation` column's embedding (explanation-aware retrieval,
    both directions; texts without one keep their own embedding).

    Under `accelerate launch` / `torchrun` with N processes (the process group joined), each process encodes 1/N of
    the split, every process gets all embeddings in split order, and the main process computes the metrics.
    """
    for column in ("image", "text"):
        if column not in dataset.column_names:
            raise ValueError(f"the split has no {column!r} column (columns: {dataset.column_names}).")
    if len(dataset) == 0:
        raise ValueError("the split is empty: nothing to evaluate.")
    started = time.time()
    common = {"num_workers": num_workers, "progress": progress, "skip_errors": True, "id_column": id_column}
    text_embeds = encode_texts(model, processor, dataset, batch_size=batch_size, **common)
    if explanation_weight:
        explanations = dataset["explanation"] if "explanation" in dataset.column_names else []
        if not any(isinstance(e, str) and e.strip() for e in explanations):
            logger.warning("explanation_weight=%s but the split has no explanation: texts alone", explanation_weight)
        else:
            explanation_embeds = encode_explanations(model, processor, explanations, batch_size, progress=progress)
            text_embeds = fuse_explanation_embeddings(text_embeds, explanation_embeds, explanation_weight)
    image_embeds = encode_images(model, processor, dataset, batch_size=batch_size, **common)
    image_ok = torch.isfinite(image_embeds).all(dim=1)
    text_ok = torch.isfinite(text_embeds).all(dim=1)
    keep = image_ok & text_ok
    skipped = []
    if not bool(keep.all()):
        ids = dataset[id_column] if id_column in dataset.column_names else None
        for index in (~keep).nonzero().flatten().tolist():
            reason = "image could not be read" if not image_ok[index] else "text could not be encoded"
            skipped.append({"index": index, "id": ids[index] if ids is not None else None, "reason": reason})
    num_pairs = int(keep.sum())
    if num_pairs == 0:
        raise ValueError("no pair of the split could be encoded.")
    metrics = None
    if distributed.is_main_process():  # launched with several processes: every one holds all embeddings; one metric
        metrics = retrieval_metrics(
            image_embeds[keep], text_embeds[keep], chunk_size=chunk_size, device=_device_of(model), progress=progress
        )
    metrics = distributed.from_main_process(metrics)
    kept_rows = keep.nonzero().flatten().tolist()
    return EvaluationResult(
        metrics, num_pairs, skipped, time.time() - started, image_embeds[keep], text_embeds[keep], kept_rows
    )


def small_gallery_warning(num_pairs: int, min_gallery_size: int) -> str | None:
    """Why R@K on a gallery of `num_pairs` items means little, or None when it has at least `min_gallery_size`.

    A random ranking finds the positive in its first K of N items with probability min(K, N) / N: on 10 items R@1 is
    already 10 by chance and R@10 is 100 by construction.
    """
    if num_pairs >= min_gallery_size:
        return None
    chance = ", ".join(f"R@{k} {100 * min(k, num_pairs) / num_pairs:.0f}" for k in _RECALL_KS)
    return (
        f"the gallery has only {num_pairs} pair(s), below --min-gallery-size {min_gallery_size}: R@K on "
        f"{num_pairs} items is not meaningful (a random ranking scores {chance}; every R@K with K >= {num_pairs} "
        f"is 100 by construction). Evaluate on a larger split."
    )


def format_metrics_table(metrics: dict[str, float], title: str | None = None) -> str:
    """The retrieval metrics as a fixed-width text table: one row per direction, then rsum."""
    header = f"{'direction':<14}" + "".join(f"{f'R@{k}':>8}" for k in _RECALL_KS) + f"{'MedR':>8}{'MeanR':>9}"
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for direction, name in _DIRECTIONS:
        cells = [metrics.get(f"{direction}_R@{k}") for k in _RECALL_KS]
        row = f"{name:<14}" + "".join(f"{value:>8.2f}" if value is not None else f"{'-':>8}" for value in cells)
        median, mean = metrics.get(f"{direction}_median_rank"), metrics.get(f"{direction}_mean_rank")
        row += f"{median:>8.0f}" if median is not None else f"{'-':>8}"
        row += f"{mean:>9.2f}" if mean is not None else f"{'-':>9}"
        lines.append(row)
    if "rsum" in metrics:
        lines.append(f"rsum (R@1+R@5+R@10, both directions): {metrics['rsum']:.2f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="entityclip-eval",
        description="Evaluate a saved EntityCLIP (or CLIP) model on a dataset split: R@K, median/mean rank, rsum.",
    )
    parser.add_argument("--model", required=True, help="a save_pretrained folder or a Hub repository id")
    parser.add_argument("--dataset", required=True, choices=DATASET_CHOICES)
    parser.add_argument("--root", help="the dataset's folder (demo: where it is built on first use; default: a cache)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--batch-size", type=int, default=64, help="images or texts per forward pass")
    parser.add_argument("--chunk-size", type=int, default=4096, help="gallery rows per block of the metric")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--max-samples", type=int, help="evaluate only the first N pairs of the split")
    parser.add_argument(
        "--check-images",
        choices=("none", "header", "decode"),
        default="header",
        help="how the loader checks image files before evaluation (unreadable ones are left out and reported)",
    )
    parser.add_argument(
        "--explanation_weight", "--explanation-weight", type=float, default=0.0,
        help="explanation-aware retrieval: fuse each text with its explanation, normalize((1-w) t + w e); "
        "0 (default): the text alone, as the paper",
    )  # fmt: skip
    parser.add_argument(
        "--rerank_top_k", "--rerank-top-k", type=int, default=0,
        help="also report R@K after GI-ITM (EntityCLIP) reranks each query's top K of the CLIP order",
    )  # fmt: skip
    parser.add_argument(
        "--rerank_clip_weight", "--rerank-clip-weight", type=float, nargs="+", metavar="W",
        help="with --rerank_top_k: also rerank by GI-ITM's log-odds + W x the CLIP logit, for each W given (pick W "
        "on a validation split, then use it with entityclip-search --rerank-clip-weight)",
    )  # fmt: skip
    parser.add_argument(
        "--min-gallery-size",
        type=int,
        default=100,
        help="warn when the gallery has fewer pairs: R@K on a few items is mostly chance (default: 100)",
    )
    parser.add_argument("--output", help="write the metrics (and what was skipped) to this JSON file")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow other architectures' Hub code")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_workers < 0:
        parser.error("--num-workers must be >= 0")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error("--max-samples must be >= 1")
    if not 0 <= args.explanation_weight <= 1:
        parser.error("--explanation_weight must be in [0, 1]")
    if args.rerank_top_k < 0:
        parser.error("--rerank_top_k must be >= 0")
    for weight in args.rerank_clip_weight or ():
        if not (math.isfinite(weight) and weight >= 0):
            parser.error(f"--rerank_clip_weight must be finite numbers >= 0, got {weight}")
    if args.rerank_clip_weight and not args.rerank_top_k:
        parser.error("--rerank_clip_weight needs --rerank_top_k")
    if args.min_gallery_size < 1:
        parser.error("--min-gallery-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The `entityclip-eval` command: evaluate, print the table, write `--output`; exit status 0 (2 on bad input)."""
    run(argv)
    distributed.end_launched_process(0)  # launched among several: exit here (a hang at exit was seen otherwise)
    return 0


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`entityclip-eval` as a function: returns the report that `--output` writes."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = distributed.join_launched_processes(_resolve_device(args.device))
    try:
        explanations = "auto" if args.explanation_weight or args.rerank_top_k else None
        with distributed.main_process_first():  # a demo split is built, a dataset cache written, once
            data, data_report = load_split(
                args.dataset, args.root, args.split, args.max_samples, args.check_images, explanations=explanations
            )
        try:
            model, processor = load_model_and_processor(args.model, device, args.trust_remote_code)
        except (OSError, ValueError) as error:
            raise ValueError(f"--model: {error}") from error
        result = evaluate_split(
            model,
            processor,
            data,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            explanation_weight=args.explanation_weight,
        )
        clip_weights = [None, *(args.rerank_clip_weight or [])]
        reranks = None
        if args.rerank_top_k and distributed.is_main_process():
            reranks = _rerank(model, processor, data, result, args.rerank_top_k, clip_weights)
        rerank = reranks[None] if reranks else None
    except (ValueError, OSError, TypeError) as error:  # a user error (a folder, a file, an argument): one line, exit 2
        print(f"entityclip-eval: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error

    processes, is_main = distributed.world_size(), distributed.is_main_process()
    distributed.leave()  # every process has its embeddings and the metrics; the main process prints and writes
    if not is_main:
        return {"num_processes": processes, "num_pairs": result.num_pairs, "metrics": result.metrics}
    on = f"{device} x {processes} processes" if processes > 1 else str(device)
    title = f"{args.model} on {args.dataset}/{args.split}: {result.num_pairs} pairs, {result.seconds:.1f} s on {on}"
    print(format_metrics_table(result.metrics, title))
    for clip_weight, block in (reranks or {}).items():
        print(_format_rerank(block, clip_weight))
    if result.skipped:
        shown = ", ".join(str(item["id"] if item["id"] is not None else item["index"]) for item in result.skipped[:10])
        more = " ..." if len(result.skipped) > 10 else ""
        print(f"skipped {len(result.skipped)} pair(s) that could not be encoded: {shown}{more}")
    excluded = sum(split.rows_excluded for split in data_report.splits.values())
    if excluded:
        print(f"the loader left out {excluded} row(s) of the split (missing or unreadable image, empty text, ...)")
    warnings = [warning for warning in (small_gallery_warning(result.num_pairs, args.min_gallery_size),) if warning]
    for warning in warnings:
        # Under the table, on stderr: seen even when stdout goes to a file.
        print(f"entityclip-eval: warning: {warning}", file=sys.stderr)
    report = {
        "model": str(args.model),
        "dataset": args.dataset,
        "root": str(args.root) if args.root is not None else None,
        "split": args.split,
        "num_pairs": result.num_pairs,
        "skipped": result.skipped,
        "rows_excluded_by_loader": excluded,
        "data_report": data_report.to_dict(),
        "seconds": round(result.seconds, 3),
        "device": str(device),
        "metrics": result.metrics,
        "explanation_weight": args.explanation_weight,
        "warnings": warnings,
    }
    if processes > 1:
        report["num_processes"] = processes
    if rerank is not None:
        report["rerank"] = rerank
        if len(reranks) > 1:
            report["rerank_by_clip_weight"] = {str(w): block for w, block in reranks.items() if w is not None}
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
        _atomic_write(output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"wrote {output}")
    return report


def _rerank(model, processor, data, result: EvaluationResult, top_k: int, clip_weights) -> dict:
    """{clip weight: R@K of the CLIP order and after GI-ITM reranks each query's top `top_k`} (texts with their
    explanations; clip weight None: by GI-ITM's probability alone)."""
    from .itm_evaluation import PairScorer, rerank_recalls_by_clip_weight

    kept = data.select(result.kept_rows) if len(result.kept_rows) != len(data) else data
    scorer = PairScorer.from_dataset(model, processor, kept)
    return rerank_recalls_by_clip_weight(
        scorer, result.image_embeds, result.text_embeds, clip_weights, top_k=min(top_k, len(kept))
    )


def _format_rerank(rerank: dict[str, float], clip_weight: float | None = None) -> str:
    how = "GI-ITM's probability" if clip_weight is None else f"GI-ITM's log-odds + {clip_weight:g} x the CLIP logit"
    lines = [
        f"GI-ITM reranking of the top {rerank['rerank_top_k']}, by {how}:",
        f"{'':<24}{'R@1':>8}{'R@5':>8}{'R@10':>8}",
    ]
    for direction, name in _DIRECTIONS:
        for prefix, label in (("clip", "CLIP order"), ("rerank", "reranked")):
            cells = "".join(f"{rerank[f'{prefix}_{direction}_R@{k}']:>8.2f}" for k in (1, 5, 10))
            lines.append(f"{name + ', ' + label:<24}{cells}")
    return "\n".join(lines)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        _exit_with_error(f"--device {name!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        _exit_with_error("--device cuda but no CUDA device is available")
    return device


def _exit_with_error(message: str):
    """argparse's way: one "error:" line on stderr, exit status 2."""
    print(f"entityclip-eval: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


if __name__ == "__main__":
    sys.exit(main())
