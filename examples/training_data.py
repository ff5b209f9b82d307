"""What `finetune.py` trains and evaluates on, from its flags: the dataset (a file layout, the demo or any `datasets`
source, map-style or streamed) and its DataLoaders. The data logic itself is `entityclip_hf.data`'s.

- map-style (the default): every split loaded and checked (`load_entity_dataset`), a seeded shuffling DataLoader
  that `accelerator.prepare` splits across processes and `skip_first_batches` resumes;
- `--streaming`: the train split is a row stream (`load_for_streaming`), batched by a `StreamingLoader` that splits
  shards across processes and workers itself and resumes from the position kept in the checkpoint's state file.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.utils.data import DataLoader
from training_guards import UsageError

from entityclip_hf.data import KNOWN_DATASETS, EntityCLIPCollator, lazy_images, load_entity_dataset, make_demo_dataset
from entityclip_hf.data.loading import is_file_layout
from entityclip_hf.data.report import one_line
from entityclip_hf.data.sources import ColumnMapping, looks_like_hub_id
from entityclip_hf.data.streaming import StreamingLoader, load_for_streaming

logger = logging.getLogger("entityclip_hf.finetune")
# Rows of the stream's start whose texts train --model tiny's tokenizer under --streaming (the map-style path uses
# every training text).
TOKENIZER_ROWS = 20000
COLUMN_FLAGS = ("image_column", "text_column", "explanation_column", "id_column")


def column_mapping(args) -> ColumnMapping | None:
    """The --*_column flags for a `datasets` source; None for the demo and the file layouts (fixed fields)."""
    if args.dataset == "demo" or is_file_layout(args.dataset):
        return None
    return ColumnMapping(**{flag.removesuffix("_column"): getattr(args, flag) for flag in COLUMN_FLAGS})


def check_dataset_flags(args) -> None:
    """--dataset names the demo, a file layout with --dataset_root, or a source that is there (a `UsageError`)."""
    source = args.dataset != "demo" and not is_file_layout(args.dataset)
    given = [flag for flag in COLUMN_FLAGS if getattr(args, flag) is not None]
    if not source and given:
        raise UsageError(f"--{given[0]}: only for a datasets source; --dataset {args.dataset} has fixed fields")
    if source:
        if not os.path.exists(os.path.expanduser(args.dataset)) and not looks_like_hub_id(args.dataset):
            raise UsageError(
                f"--dataset {args.dataset}: not demo or a layout ({', '.join(KNOWN_DATASETS)}), no such file or "
                "folder, and not a Hub dataset id (user/name)"
            )
        return
    if args.dataset != "demo":
        if args.dataset_root is None:
            raise UsageError(f"--dataset {args.dataset} needs --dataset_root (the folder holding its files)")
        if not os.path.isdir(args.dataset_root):
            raise UsageError(f"--dataset_root {args.dataset_root}: no such folder")


def _without_explanation(row: dict) -> dict:
    return {"explanation": None}


def load_datasets(args, accelerator):
    """The splits to train and evaluate on (images left undecoded until the collator: a damaged file is its business).

    With --streaming, "train" is a row stream and `args.train_rows` / `args.train_rows_counted` its row count.
    """
    name, root = args.dataset, args.dataset_root
    if name == "demo":
        root = root or os.path.join(args.output_dir, "data")
        with accelerator.main_process_first():  # the main process builds it, the others then find it complete
            make_demo_dataset(root, num_entities=args.demo_entities, captions_per_entity=args.demo_captions)
        name = "jsonl"  # the demo is written in the plain JSON-lines format
    explanations = args.explanations.split(",") if args.explanations else "auto"
    columns = column_mapping(args)
    where = f"--dataset {args.dataset}" + (f" --dataset_root {root}" if root else "")
    with accelerator.main_process_first():  # datasets' cache is written once
        try:
            if args.streaming:
                others = [split for split in (args.eval_split, args.test_split) if split]
                stream, rows, counted, loaded = load_for_streaming(
                    name, root, columns=columns, explanations=explanations, check_images=args.check_images,
                    other_splits=others,
                )  # fmt: skip
                datasets = lazy_images(loaded) if len(loaded) else loaded
            else:
                datasets = lazy_images(
                    load_entity_dataset(
                        name, root, explanations=explanations, check_images=args.check_images, columns=columns
                    )  # fmt: skip
                )
        except (OSError, ValueError) as error:  # the folder's layout, a file that cannot be read, a column not there
            raise UsageError(f"{where}: {one_line(error)}") from error
    if not args.use_explanations:  # the ablation "without explanations": every row has none
        datasets = datasets.map(lambda row: {"explanation": None}, desc="dropping explanations")
    if args.streaming:
        if not args.use_explanations:
            stream = stream.map(_without_explanation)
        if args.max_train_samples:
            stream = stream.take(args.max_train_samples)
            rows = min(rows, args.max_train_samples) if rows is not None else args.max_train_samples
        datasets["train"] = stream
        args.train_rows, args.train_rows_counted = rows, counted
    elif args.max_train_samples:
        datasets["train"] = datasets["train"].select(range(min(args.max_train_samples, len(datasets["train"]))))
    for split in (args.eval_split, args.test_split):
        if split in datasets and args.max_eval_samples:
            datasets[split] = datasets[split].select(range(min(args.max_eval_samples, len(datasets[split]))))
    return datasets


def tokenizer_corpus(args, datasets) -> list[str]:
    """--model tiny trains its tokenizer on the training texts and explanations (or their words split into
    characters); streamed, on the first `TOKENIZER_ROWS` rows of the stream."""
    if args.streaming:
        head = list(datasets["train"].select_columns(["text", "explanation"]).take(TOKENIZER_ROWS))
        return [row["text"] for row in head] + [row["explanation"] for row in head if row["explanation"]]
    return list(datasets["train"]["text"]) + [e for e in datasets["train"]["explanation"] if e]


def make_dataloaders(args, datasets, processor, accelerator):
    """Training loader, then evaluation loaders for --eval_split and --test_split (None where the split is absent)."""
    collator = EntityCLIPCollator(processor, return_ids=True)  # ids name the samples of a skipped batch
    if args.streaming:
        if args.train_rows is None and not args.max_steps:
            raise UsageError(f"--streaming: the number of training rows of {args.dataset} is unknown; pass --max_steps")
        if args.train_rows_counted == "estimated" and not args.max_steps:
            logger.warning(
                "--streaming: %s has about %d training rows (estimated, not counted): the learning-rate schedule, the "
                "progress bar and the end of training use that estimate; pass --max_steps for an exact schedule",
                args.dataset, args.train_rows,
            )  # fmt: skip
        train = StreamingLoader(
            datasets["train"], args.batch_size, collator, num_workers=args.num_workers, seed=args.seed,
            shuffle_buffer=args.shuffle_buffer, accelerator=accelerator, num_rows=args.train_rows,
        )  # fmt: skip
    else:
        # Seeded generators: the shuffle order (Accelerate's seedable sampler reseeds it per epoch) and the
        # DataLoader's own draw of worker seeds never touch the global torch RNG, whose state `save_state` restores.
        train = DataLoader(
            datasets["train"],
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,  # every process needs the same number of rows for the all-gathered contrastive loss
            collate_fn=collator,
            num_workers=args.num_workers,
            generator=torch.Generator().manual_seed(args.seed),
        )
    evaluation = [
        DataLoader(
            datasets[split],
            batch_size=args.eval_batch_size,
            collate_fn=collator,
            num_workers=args.num_workers,
            generator=torch.Generator().manual_seed(args.seed),
        )
        if split and split in datasets
        else None
        for split in (args.eval_split, args.test_split)
    ]
    return train, *evaluation


def epoch_batches(args, accelerator, train_loader, epoch: int, skip: int, state: dict):
    """The batches of `epoch` from batch `skip` on: the same order as a straight run (map-style: it depends only on
    seed and epoch, the consumed batches skipped; streamed: from the stream position in `state`)."""
    if args.streaming:
        return train_loader.epoch_batches(epoch, state.get("stream_position"))
    loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
    loader.set_epoch(epoch)
    return loader


__all__ = [
    "check_dataset_flags",
    "column_mapping",
    "epoch_batches",
    "load_datasets",
    "make_dataloaders",
    "tokenizer_corpus",
]
