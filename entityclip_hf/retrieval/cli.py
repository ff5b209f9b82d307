"""The `entityclip-search` command: `encode` a gallery to an embedding file, `search` it."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed
from ..ann_index import INDEX_TYPES, ApproximateIndex
from .embeddings import load_embeddings, save_embeddings
from .encode import DatasetRows, _is_hf_dataset, encode_images, encode_texts
from .index import EmbeddingIndex
from .rerank import rerank_texts_with_itm, rerank_with_itm

logger = logging.getLogger(__name__)


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_DATASET_SOURCES = ("n24news", "visualnews", "goodnews", "jsonl", "demo")


@dataclass
class _Gallery:
    """What a command searches: embeddings with ids, plus the items themselves when known (for printing/reranking)."""

    embeddings: torch.Tensor
    ids: list
    modality: str
    images: list | None = None  # per row: something the processor reads (for reranking)
    texts: list | None = None  # per row: the item's text (a dataset's caption), for printing
    explanations: list | None = None  # per row of a text gallery: its explanation (or None), for reranking


def _gallery_items(source: str, root: str | None, split: str, max_samples: int | None, explanations=None):
    """(ids, images, texts) of a dataset split or of the image files under a folder."""
    if source in _DATASET_SOURCES:
        from ..loaders import load_split

        with distributed.main_process_first():  # launched processes: a demo split is built, a cache written, once
            data, _ = load_split(source, root, split, max_samples, explanations=explanations)
        ids = data["id"] if "id" in data.column_names else list(range(len(data)))
        return ids, data, data["text"]
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(f"--images-from {source!r} is neither a dataset ({', '.join(_DATASET_SOURCES)}) nor a folder.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if max_samples is not None:
        files = files[:max_samples]
    if not files:
        raise ValueError(f"no image files ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {folder}.")
    return [str(p.relative_to(folder)) for p in files], [str(p) for p in files], None


def _encode_gallery(model, processor, args, modality: str) -> _Gallery:
    fuse = modality == "text" and args.explanation_weight > 0
    ids, data, texts = _gallery_items(
        args.images_from, args.root, args.split, args.max_samples, explanations="auto" if fuse else None
    )
    options = {"batch_size": args.batch_size, "num_workers": args.num_workers, "skip_errors": True}
    options["progress"] = not args.no_progress
    if modality == "image":
        embeddings = encode_images(model, processor, data, **options)
    else:
        if texts is None:
            raise ValueError("a text gallery needs a dataset with texts, not a folder of images.")
        if fuse:  # explanation-aware text gallery: each text fused with its own explanation
            options.update(explanations="explanation", explanation_weight=args.explanation_weight)
        embeddings = encode_texts(model, processor, data, **options)
    keep = torch.isfinite(embeddings).all(dim=1)
    if not bool(keep.all()):
        dropped = [ids[i] for i in (~keep).nonzero().flatten().tolist()]
        if distributed.is_main_process():
            print(f"left out {len(dropped)} {modality}(s) that could not be encoded: {dropped[:10]}", file=sys.stderr)
    rows = keep.nonzero().flatten().tolist()
    is_dataset = _is_hf_dataset(data)
    images = None
    if modality == "image":
        images = DatasetRows(data, rows, "image") if is_dataset else [data[i] for i in rows]
    return _Gallery(
        embeddings[keep],
        [ids[i] for i in rows],
        modality,
        images=images,
        texts=[texts[i] for i in rows] if texts is not None else None,
        explanations=[data["explanation"][i] for i in rows] if fuse else None,
    )


def _load_gallery_file(path: str) -> _Gallery:
    stored = load_embeddings(path)
    modality = stored.metadata.get("modality", "image")
    ids = stored.ids if stored.ids is not None else list(range(stored.embeddings.shape[0]))
    return _Gallery(stored.embeddings, ids, modality)


def _command_encode(args) -> dict:
    from ..loaders import load_model_and_processor

    # Under accelerate launch / torchrun with N processes each encodes 1/N of the gallery; the main process writes.
    device = distributed.join_launched_processes(_cli_device(args.device))
    model, processor = load_model_and_processor(args.model, device, args.trust_remote_code)
    gallery = _encode_gallery(model, processor, args, args.modality)
    processes, is_main = distributed.world_size(), distributed.is_main_process()
    distributed.leave()
    if not is_main:
        return {"path": str(args.output), "num_rows": len(gallery.ids), "num_processes": processes}
    metadata = {"model": str(args.model), "modality": args.modality, "source": str(args.images_from)}
    if args.images_from in _DATASET_SOURCES:
        metadata["split"] = args.split
    path = save_embeddings(args.output, gallery.embeddings, gallery.ids, metadata)
    print(f"wrote {len(gallery.ids)} {args.modality} embeddings of dimension {gallery.embeddings.shape[1]} to {path}")
    written = {"path": str(path), "num_rows": len(gallery.ids), "num_processes": processes}
    if args.index_type != "flat":
        index = EmbeddingIndex.from_file(path, index_type=args.index_type, **_ann_options(args))
        ann_path = index.ann.save(ApproximateIndex.path_for(path, args.index_type))
        print(f"wrote the {args.index_type} index to {ann_path} ({_describe_ann(index.ann)})")
        written["index"] = str(ann_path)
    return written


def _ann_options(args) -> dict:
    names = ("nlist", "nprobe", "pq_m", "refine_factor", "hnsw_m", "ef_construction", "ef_search", "train_size")
    names += ("target_recall",)
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _describe_ann(ann: ApproximateIndex) -> str:
    options = ann.options
    knob = (
        f"ef_search={options.ef_search}"
        if options.index_type == "hnsw"
        else f"nlist={options.nlist}, nprobe={options.nprobe}"
    )
    if options.index_type == "ivf-pq":
        knob += f", refine_factor={options.refine_factor}"
    recall = {key: value for key, value in options.tuned.items() if key.startswith("sample_recall")}
    tuned = (
        f", tuned: recall@10 {next(iter(recall.values()))} on {options.tuned['sample_queries']} sample queries"
        if recall
        else ""
    )
    return f"{knob}{tuned}, built in {ann.build_seconds:.1f} s"


def _command_search(args) -> list[dict]:
    from ..loaders import load_model_and_processor

    if not args.query and not args.query_image:
        raise ValueError("give at least one --query TEXT or --query-image PATH.")
    if args.query and args.query_image:
        raise ValueError("give either text queries (--query) or image queries (--query-image), not both.")
    query_modality = "text" if args.query else "image"
    gallery_modality = "image" if query_modality == "text" else "text"
    model, processor = load_model_and_processor(args.model, _cli_device(args.device), args.trust_remote_code)
    if args.index:
        gallery = _load_gallery_file(args.index)
        if gallery.modality != gallery_modality:
            raise ValueError(
                f"{args.index} holds {gallery.modality} embeddings; {query_modality} queries search images."
            )
    elif args.images_from:
        gallery = _encode_gallery(model, processor, args, gallery_modality)
    else:
        raise ValueError("give the gallery: --images-from (a dataset or a folder of images) or --index FILE.")
    ann = _ann_options(args)
    if args.index_type != "flat" and args.index:
        saved = ApproximateIndex.path_for(args.index, args.index_type)
        ann["_saved_ann"] = saved if saved.is_file() else None
        if not saved.is_file():  # a build of minutes at a million items, lost when the command ends: say so
            print(
                f"no {args.index_type} index beside {args.index} ({saved.name}): building one for this search only; "
                f"`entityclip-search encode ... --index-type {args.index_type}` saves it",
                file=sys.stderr,
                flush=True,
            )
    elif args.index_type == "flat" and ann:
        raise ValueError(
            f"{', '.join('--' + name.replace('_', '-') for name in ann)} need --index-type ivf-flat, ivf-pq or hnsw."
        )
    index = EmbeddingIndex(gallery.embeddings, gallery.ids, backend="auto", index_type=args.index_type, **ann)
    queries = args.query or args.query_image
    explanations = _query_explanations(args)
    if query_modality == "text":
        query_embeddings = encode_texts(
            model, processor, queries, progress=False, explanations=explanations,
            explanation_weight=args.explanation_weight,
        )  # fmt: skip
    else:
        query_embeddings = encode_images(model, processor, queries, progress=False)
    depth = min(max(args.k, args.rerank or 0), len(index))
    hits = index.search(query_embeddings, k=depth)
    if args.rerank and gallery.images is None and gallery_modality == "image":
        raise ValueError("--rerank needs the images: give --images-from (an --index file holds only embeddings).")
    results = []
    for q, query in enumerate(queries):
        rows = hits.indices[q].tolist()
        scores = hits.scores[q].tolist()
        entries = [
            {"row": row, "id": gallery.ids[row], "score": score} for row, score in zip(rows, scores, strict=True)
        ]
        if args.rerank:
            top = entries[: args.rerank]
            if gallery_modality == "image":
                explanation = explanations[q] if explanations is not None else None
                images = [gallery.images[e["row"]] for e in top]
                ranked = rerank_with_itm(
                    model, processor, query, images, explanation=explanation,
                    first_stage_scores=[e["score"] for e in top], clip_weight=args.rerank_clip_weight,
                )  # fmt: skip
            else:
                texts = [gallery.texts[e["row"]] for e in top]
                candidate_explanations = (
                    [gallery.explanations[e["row"]] for e in top] if gallery.explanations is not None else None
                )
                ranked = rerank_texts_with_itm(
                    model, processor, query, texts, candidate_explanations,
                    first_stage_scores=[e["score"] for e in top], clip_weight=args.rerank_clip_weight,
                )  # fmt: skip
            top = [{**top[c.index], "match_probability": c.match_probability, "rerank_score": c.score} for c in ranked]
            entries = top + entries[args.rerank :]
        entries = entries[: args.k]
        for entry in entries:
            if gallery.texts is not None:
                entry["text"] = gallery.texts[entry["row"]]
        results.append({"query": str(query), "hits": entries})
        _print_hits(str(query), entries)
    return results


def _query_explanations(args) -> list | None:
    """The --explanation of each --query (in order), or None when none is given."""
    if not args.explanation:
        return None
    if not args.query or len(args.explanation) != len(args.query):
        raise ValueError("give one --explanation per --query (in the same order), or none.")
    if args.explanation_weight <= 0:
        raise ValueError("--explanation needs --explanation-weight W > 0 (how much the explanation counts).")
    return [text if text.strip() else None for text in args.explanation]


def _print_hits(query: str, entries: list[dict]) -> None:
    print(f'\nquery: "{query}"')
    for rank, entry in enumerate(entries, start=1):
        itm = f"  itm {entry['match_probability']:.3f}" if "match_probability" in entry else ""
        text = f"  {entry['text']}" if entry.get("text") is not None else ""
        print(f"  {rank:>3}. {entry['score']:.4f}{itm}  {entry['id']}{text}")


def _cli_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="entityclip-search",
        description="Encode a gallery to an embedding file, or search one with text (or image) queries.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub, gallery_required: bool):
        sub.add_argument("--model", required=True, help="a save_pretrained folder or a Hub repository id")
        sub.add_argument(
            "--images-from",
            required=gallery_required,
            help=f"a dataset ({', '.join(_DATASET_SOURCES)}, with --root and --split) or a folder of image files",
        )
        sub.add_argument("--root", help="the dataset's folder (for demo: where it is, or will be, generated)")
        sub.add_argument("--split", default="test")
        sub.add_argument("--max-samples", type=int, help="only the first N items of the gallery")
        sub.add_argument("--batch-size", type=int, default=64)
        sub.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
        sub.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
        sub.add_argument("--trust-remote-code", action="store_true", help="allow other architectures' Hub code")
        sub.add_argument("--no-progress", action="store_true")
        # Approximate search (FAISS): built with `encode`, saved beside the file; `search --index` loads it.
        sub.add_argument("--index-type", choices=INDEX_TYPES, default="flat", help="flat = exact search")
        sub.add_argument("--nlist", type=int, help="IVF lists (default ~4 sqrt(N))")
        sub.add_argument("--nprobe", type=int, help="IVF lists searched per query (default: tuned to recall@10 0.95)")
        sub.add_argument("--pq-m", type=int, help="IVF-PQ sub-quantisers (default D/4)")
        sub.add_argument(
            "--refine-factor",
            type=int,
            help="IVF-PQ: refine_factor x k candidates re-ranked exactly (default 4, raised by tuning)",
        )
        sub.add_argument("--hnsw-m", type=int, help="HNSW neighbours per node (default 32)")
        sub.add_argument("--ef-construction", type=int, help="HNSW build effort (default 80)")
        sub.add_argument("--ef-search", type=int, help="HNSW search effort (default: tuned to recall@10 0.95)")
        sub.add_argument("--train-size", type=int, help="IVF training sample (default min(N, 32 nlist))")
        sub.add_argument(
            "--target-recall", type=float, help="recall@10 the search knob is tuned to at build time (default 0.95)"
        )
        sub.add_argument(
            "--explanation-weight", type=float, default=0.0,
            help="explanation-aware retrieval (opt-in): a text becomes normalize((1-w) text + w explanation); applies "
            "to --explanation of text queries and to a text gallery's explanations. 0 (default): the paper's texts alone",
        )  # fmt: skip

    encode = commands.add_parser("encode", help="encode a gallery into a safetensors embedding file")
    common(encode, gallery_required=True)
    encode.add_argument("--modality", choices=("image", "text"), default="image", help="encode images or texts")
    encode.add_argument("--output", required=True, help="the .safetensors file to write")

    search = commands.add_parser("search", help="print the top results of text (or image) queries")
    common(search, gallery_required=False)
    search.add_argument("--index", help="an embedding file from `encode` (instead of encoding --images-from)")
    search.add_argument("--query", action="append", help="a text query (repeatable): searches images")
    search.add_argument("--query-image", action="append", help="an image file as query (repeatable): searches texts")
    search.add_argument("--k", type=int, default=5, help="results per query")
    search.add_argument(
        "--explanation", action="append",
        help="the explanation of each --query (repeatable, same order; '' for none); needs --explanation-weight",
    )  # fmt: skip
    search.add_argument(
        "--rerank", type=int, default=0,
        help="rerank the first N hits with GI-ITM (EntityCLIP). By GI-ITM alone it LOWERS R@1 against the CLIP order "
        "for every configuration measured (bench/README.md, efficacy); with --rerank-clip-weight and a GI-ITM trained "
        "for it (ablate.py's itm_reranker_fused_negatives) it raises it a little: check on your validation data first "
        "(entityclip-eval --rerank_top_k N --rerank_clip_weight W ...)",
    )  # fmt: skip
    search.add_argument(
        "--rerank-clip-weight", type=float, default=None,
        help="rerank by GI-ITM's log-odds + this weight x the CLIP logit instead of GI-ITM's probability alone "
        "(choose it on validation data)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The `entityclip-search {encode,search} ...` command; exit status 0 (2 on bad input)."""
    run(argv)
    distributed.end_launched_process(0)  # launched among several: exit here (a hang at exit was seen otherwise)
    return 0


def run(argv: Sequence[str] | None = None):
    """The retrieval command as a function: returns what it printed, as data (hits per query, or the file written)."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "k"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "rerank", 0) < 0:
        parser.error("--rerank must be >= 0")
    clip_weight = getattr(args, "rerank_clip_weight", None)
    if clip_weight is not None and not (clip_weight >= 0 and math.isfinite(clip_weight)):
        parser.error(f"--rerank-clip-weight must be a finite number >= 0, got {clip_weight}")
    if not 0 <= args.explanation_weight <= 1:
        parser.error("--explanation-weight must be in [0, 1]")
    try:
        _cli_device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _command_encode(args) if args.command == "encode" else _command_search(args)
    except (ValueError, OSError, ImportError) as error:  # a user error (a folder, a file, an argument): one line
        from ..data.report import one_line

        print(f"{parser.prog} {args.command}: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    sys.exit(main())
