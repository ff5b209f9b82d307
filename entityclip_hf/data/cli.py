"""`entityclip-data` / `python -m entityclip_hf.data`: load a dataset folder and print what the loader found."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections.abc import Sequence

import PIL.Image

from .collator import lazy_images
from .formats import FORMATS
from .loading import IMAGE_CHECKS, load_entity_dataset
from .report import DataError, one_line
from .sources import ColumnMapping


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entityclip-data",
        description="Load an entity-centric image-text dataset folder, check it, and print the bad-data report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "name",
        help=f"dataset format: {', '.join(sorted(FORMATS))} (any case), or a datasets source: a Hub id, a folder "
        "of parquet/arrow/csv/json files or webdataset shards, a save_to_disk folder, a data file",
    )
    for column in ("image", "text", "explanation", "id"):
        parser.add_argument(f"--{column}-column", help=f"datasets source: the column holding the {column}")
    parser.add_argument("--root", help="dataset folder (for demo: where to build it; default: the datasets cache)")
    parser.add_argument(
        "--explanations",
        nargs="+",
        default=["auto"],
        help="'auto', 'none', or explanation files / folders (released JSON or entityclip-explain caches)",
    )
    parser.add_argument("--splits", nargs="+", help="splits to load (default: all present)")
    parser.add_argument("--strict", action="store_true", help="fail on missing/unreadable images, empty texts, ...")
    parser.add_argument("--check-images", choices=IMAGE_CHECKS, default="header", help="how deeply to check images")
    parser.add_argument("--num-proc", type=int, help="processes for the image check (default: all cores)")
    parser.add_argument("--explanation-model", help="use only cache entries of this generator")
    parser.add_argument("--explanation-prompt-version", help="use only cache entries of this prompt version")
    parser.add_argument("--report-json", help="also write the report to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Load, print the report and one row per split. Exit 1 on a strict-mode data error, 2 on a user error (a layout,
    an unreadable file, a bad argument: one line, argparse style)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_proc is not None and args.num_proc < 1:
        parser.error("--num-proc must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    explanations = args.explanations
    if explanations == ["auto"]:
        explanations = "auto"
    elif explanations == ["none"]:
        explanations = None
    given = {name: getattr(args, f"{name}_column") for name in ("image", "text", "explanation", "id")}
    columns = ColumnMapping(**given) if any(value is not None for value in given.values()) else None
    try:
        dataset, report = load_entity_dataset(
            args.name,
            args.root,
            explanations,
            columns=columns,
            splits=args.splits,
            strict=args.strict,
            check_images=args.check_images,
            num_proc=args.num_proc,
            explanation_model=args.explanation_model,
            explanation_prompt_version=args.explanation_prompt_version,
            return_report=True,
        )
    except DataError as error:  # --strict: the report is the message
        _write_report(args.report_json, error.report)
        print(f"entityclip-data: error: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:  # a layout, a file that cannot be read, a bad argument: one line
        print(f"entityclip-data: error: {one_line(error)}", file=sys.stderr)
        return 2
    _write_report(args.report_json, report)
    print(dataset)
    for split, rows in lazy_images(dataset).items():
        if len(rows):
            row = rows[0]
            shown = {key: value for key, value in row.items() if key != "image"}
            shown["image"] = _describe_image(row["image"])
            print(f"{split}[0]: {json.dumps(shown, ensure_ascii=False)}")
    return 0


def _describe_image(image: dict) -> str:
    """Size and mode from the file's header (no pixels decoded): an image damaged since the check cannot crash this."""
    source = image["path"] if image.get("bytes") is None else io.BytesIO(image["bytes"])
    try:
        with PIL.Image.open(source) as opened:
            return f"{opened.size[0]}x{opened.size[1]} {opened.mode}"
    except Exception as error:  # noqa: BLE001 - PIL raises many types; this line is information only
        return f"unreadable ({type(error).__name__}: {error})"


def _write_report(path: str | None, report) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(report.to_dict(), handle, ensure_ascii=False, indent=1)


__all__ = ["build_parser", "main"]
