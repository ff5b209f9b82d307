"""Fine-tune EntityCLIP with Accelerate: train, evaluate retrieval, keep the best model, optionally push it to the Hub.

Every flag defaults to something that runs on a laptop CPU (a tiny model trained from scratch on the built-in demo
dataset). A JSON config file gives a whole recipe and `--key=value` flags override it (nanoGPT style):

    python examples/finetune.py --config examples/configs/demo.json
    accelerate launch examples/finetune.py --config examples/configs/paper_vitb32.json --dataset_root /data/n24news
    accelerate launch --multi_gpu --num_processes 2 examples/finetune.py --cpu ...   # 2 CPU processes (gloo)
    accelerate launch --multi_gpu --num_processes 8 examples/finetune.py --fsdp ...  # FSDP2 (training_fsdp.py)

Bad batches (NaN/inf inputs or loss) are skipped and named, a full disk is said as such: `training_guards.py`, beside
this script.

Outputs in --output_dir: `checkpoints/step_N` (Accelerate state: resume with --resume), `best/` and `final/`
(`save_pretrained` folders that `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads), `train_log.jsonl`
(one line per step and per evaluation) and the trackers' logs (--report_to).
"""

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time

import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from datasets.utils import logging as datasets_logging
from model_flags import MODEL_FIELDS, add_model_field_flags, str2bool
from tqdm.auto import tqdm
from training_checkpoints import (  # noqa: F401 (checkpoint_steps, room_needed: used by the tests)
    STATE_FILE,
    checkpoint_steps,
    find_checkpoint,
    load_model_folder,
    room_needed,
    save_checkpoint,
    save_model_folder,
)
from training_data import check_dataset_flags, epoch_batches, load_datasets, make_dataloaders, tokenizer_corpus
from training_fsdp import Sharding, check_sharding_setup
from training_guards import (
    BadStepCounter,
    TrainingStopped,
    UsageError,
    describe_bad_batch,
    guarded_forward,
    nonfinite_inputs,
    on_any_process,
)
from transformers import AutoConfig, CLIPImageProcessorPil, CLIPTokenizer, get_scheduler

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel
from entityclip_hf.allocator import keep_freed_memory
from entityclip_hf.data.loading import IMAGE_CHECKS
from entityclip_hf.data.report import one_line
from entityclip_hf.distributed import end_launched_process
from entityclip_hf.evaluation import format_metrics_table
from entityclip_hf.losses import contrastive_loss, local_losses
from entityclip_hf.metrics import retrieval_metrics
from entityclip_hf.processing_entityclip import EntityCLIPProcessor
from entityclip_hf.tiny_models import tiny_clip_config, tiny_image_processor, train_bpe_tokenizer

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "explanation_input_ids", "explanation_attention_mask")
LOSS_NAMES = ("loss", "contrastive_loss", "expert_contrastive_loss", "itm_loss")
TRACKER_PROJECT = "entityclip"  # accelerator.init_trackers' project: TensorBoard writes to <output_dir>/entityclip
# What a run writes into --output_dir, and what --overwrite_output_dir deletes.
RUN_OUTPUTS = ("checkpoints", "best", "final", "train_log.jsonl", "results.json", TRACKER_PROJECT)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    flag = dict(type=str2bool, nargs="?", const=True)  # `--x`, `--x=true`, `--x=false`
    p.add_argument("--config", help="JSON file of flag values; command-line flags override it")
    # model
    p.add_argument("--model", default="tiny", help="'tiny' (from scratch), a CLIP checkpoint, or an EntityCLIP one")
    add_model_field_flags(p)
    p.add_argument("--tiny_hidden_size", type=int, default=64, help="--model tiny: width of both towers")
    p.add_argument("--tiny_num_layers", type=int, default=2, help="--model tiny: layers of both towers")
    p.add_argument("--tiny_image_size", type=int, default=32, help="--model tiny: image side in pixels")
    p.add_argument("--tiny_patch_size", type=int, default=8, help="--model tiny: ViT patch side in pixels")
    p.add_argument("--tiny_vocab_size", type=int, default=1000, help="--model tiny: BPE trained on the train texts")
    # data
    p.add_argument(
        "--dataset", default="demo",
        help="'demo' (built-in, generated), a layout (n24news, visualnews, goodnews, jsonl) with --dataset_root, or\n"
        "a datasets source: a Hub id, a parquet/arrow/csv/json or webdataset-shard folder, a save_to_disk folder",
    )  # fmt: skip
    p.add_argument("--dataset_root", help="dataset folder (for 'demo': where it is generated; default output_dir/data)")
    for column, usual in (("image", "image, img, jpg, png"), ("text", "text, caption, txt"),
                          ("explanation", "explanation"), ("id", "id, image_id, __key__")):  # fmt: skip
        p.add_argument(f"--{column}_column", help=f"datasets source: the column holding the {column} (default: {usual})")
    p.add_argument(
        "--streaming", default=False, **flag,
        help="train from a stream of the train split (never loaded whole), split across processes and workers;\n"
        "exact mid-epoch resume (same processes, workers, batch size)",
    )  # fmt: skip
    p.add_argument("--shuffle_buffer", type=int, default=1000, help="--streaming: rows in the shuffle buffer (0: none)")
    p.add_argument("--demo_entities", type=int, default=24, help="--dataset demo: number of made-up entities")
    p.add_argument("--demo_captions", type=int, default=8, help="--dataset demo: captions (pairs) per entity")
    p.add_argument("--explanations", help="explanation files or cache folders, comma-separated (default: auto)")
    p.add_argument(
        "--use_explanations", default=True, help="false: train and evaluate without any explanation (ablation)", **flag
    )
    p.add_argument(
        "--check_images", default="header", choices=IMAGE_CHECKS, help="loader's image check: decode is thorough"
    )
    p.add_argument("--eval_split", default="validation", help="split used for evaluation and the best checkpoint")
    p.add_argument("--test_split", default="test", help="split on which best/ is finally evaluated ('': none)")
    p.add_argument("--max_train_samples", type=int, help="use only the first N training pairs")
    p.add_argument("--max_eval_samples", type=int, help="evaluate on the first N pairs of --eval_split")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    # optimisation
    p.add_argument("--batch_size", type=int, default=32, help="pairs per process per step (global = x processes)")
    p.add_argument("--eval_batch_size", type=int, default=64, help="pairs per process per evaluation batch")
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument(
        "--head_learning_rate", type=float,
        help="learning rate of EntityCLIP's new layers (experts, gates, GI-ITM), which start from scratch while CLIP "
        "starts trained (default: --learning_rate, as the paper)",
    )  # fmt: skip
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decay (never on biases, norms, scales)")
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--lr_scheduler", default="cosine", help="transformers scheduler name (cosine, linear, constant)")
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--max_grad_norm", type=float, default=0.0, help="clip gradients to this norm (0: no clipping)")
    p.add_argument("--num_epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: num_epochs)")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument(
        "--max_bad_steps",
        type=int,
        default=10,
        help="stop after this many optimizer steps in a row skipped for NaN/inf inputs or loss (0: never stop)",
    )
    p.add_argument("--mixed_precision", default=None, choices=["no", "bf16", "fp16"], help="default: accelerate's")
    p.add_argument("--gradient_checkpointing", default=False, **flag)
    p.add_argument(
        "--fsdp", default=False,
        help="shard every parameter over the processes with FSDP2 (torch's fully_shard; also on CPU/gloo); GPUs can "
        "also use accelerate's FSDP plugin: examples/configs/accelerate_fsdp2.yaml", **flag,
    )  # fmt: skip
    p.add_argument(
        "--fsdp_state_dict", default="sharded", choices=["sharded", "full"],
        help="--fsdp checkpoints: every process writes its shards (torch.distributed.checkpoint), or the main "
        "process the whole model and optimizer (safetensors); --resume reads either",
    )  # fmt: skip
    p.add_argument("--compile", default=False, help="torch.compile CLIP's vision and text encoders (inductor)", **flag)
    p.add_argument(
        "--malloc_keep_freed", default=True, **flag,
        help="glibc's malloc keeps freed memory (entityclip_hf.allocator): CPU steps stop page-faulting activations",
    )  # fmt: skip
    p.add_argument(
        "--cpu", default=False, help="train on CPU even if a GPU is there (also: several CPU processes)", **flag
    )
    p.add_argument("--seed", type=int, default=42)
    # evaluation, checkpoints, outputs
    p.add_argument("--output_dir", default="outputs/entityclip")
    p.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps (0: at the end of each epoch)")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: at the end of each epoch)")
    p.add_argument("--keep_checkpoints", type=int, default=2, help="how many step checkpoints to keep")
    p.add_argument(
        "--best_metric",
        default="rsum",
        help="eval metric that picks best/: rsum, contrastive_loss (the paper), i2t_R@1, ...",
    )
    p.add_argument("--log_every", type=int, default=10, help="log the training losses every N steps")
    p.add_argument(
        "--eval_diagnostics",
        default=True,
        help="also log ITM AUC and the expert loss with shuffled explanations / images (leak indicators); one process",
        **flag,
    )
    p.add_argument("--resume", nargs="?", const="latest", help="continue from a checkpoint folder, or the latest one")
    p.add_argument(
        "--overwrite_output_dir", default=False, help="start afresh: delete an earlier run's outputs", **flag
    )
    p.add_argument("--report_to", default="none", help="Accelerate trackers: tensorboard, wandb, all, none, ...")
    p.add_argument("--push_to_hub", default=False, help="push best/ with a model card to --hub_model_id", **flag)
    p.add_argument("--hub_model_id", help="Hub repository id (user/name) for --push_to_hub")
    p.add_argument("--hub_private", default=False, help="create the Hub repository as private", **flag)
    p.add_argument("--crash_after_step", type=int, help="testing: exit hard (no cleanup) after this step")
    return p


# Flags that must be at least 1, and at least 0.
POSITIVE_FLAGS = ("batch_size", "eval_batch_size", "num_epochs", "gradient_accumulation_steps", "keep_checkpoints",
                  "log_every", "tiny_hidden_size", "tiny_num_layers", "tiny_image_size", "tiny_patch_size")  # fmt: skip
NON_NEGATIVE_FLAGS = ("max_steps", "eval_every", "save_every", "warmup_steps", "num_workers", "max_bad_steps",
                      "shuffle_buffer")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, with defaults taken from --config (a JSON object of flag names; keys starting with _ are comments).

    User errors (a config file that cannot be read, an unknown dataset, a number out of range) end here, with
    argparse's one-line "error:" and exit status 2; `check_paths` then checks the folders and files named.
    """
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        try:
            with open(known.config, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            parser.error(f"--config {known.config}: {error}")
        if not isinstance(values, dict):
            parser.error(f"--config {known.config}: expected a JSON object of flag values, got {type(values).__name__}")
        values = {key: value for key, value in values.items() if not key.startswith("_")}  # _: comments
        flags = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - flags)
        if unknown:
            parser.error(f"{known.config}: unknown keys {unknown}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    for name in POSITIVE_FLAGS + NON_NEGATIVE_FLAGS:
        if getattr(args, name) < (1 if name in POSITIVE_FLAGS else 0):
            parser.error(f"--{name} must be >= {1 if name in POSITIVE_FLAGS else 0}, got {getattr(args, name)}")
    if args.head_learning_rate is not None and not args.head_learning_rate > 0:
        parser.error(f"--head_learning_rate must be > 0, got {args.head_learning_rate}")
    return args


def check_paths(args) -> None:
    """The folders and files the flags name exist (a `UsageError` otherwise), before any work is done."""
    check_dataset_flags(args)
    for path in args.explanations.split(",") if args.explanations else ():
        if not os.path.exists(path):
            raise UsageError(f"--explanations: no file or folder {path}")
    # A Hub id is 'name' or 'user/name': anything else that does not exist is a missing folder.
    looks_local = os.path.isabs(args.model) or args.model.startswith((".", "~")) or args.model.count("/") > 1
    if args.model != "tiny" and looks_local and not os.path.exists(os.path.expanduser(args.model)):
        raise UsageError(f"--model {args.model}: no such folder")


# ----------------------------------------------------------------------------------------------------- model & data
def build_model_and_processor(args, train_texts):
    """The model to fine-tune and its processor, from --model (tiny | CLIP checkpoint | EntityCLIP checkpoint)."""
    heads = {key: getattr(args, key) for key in MODEL_FIELDS if getattr(args, key) is not None}
    if args.model == "tiny":
        # A tokenizer trained on the training texts: a tiny model learns faster from a vocabulary of its own domain.
        tokenizer = train_bpe_tokenizer(train_texts, vocab_size=args.tiny_vocab_size)
        clip_config = tiny_clip_config(
            tokenizer,
            hidden_size=args.tiny_hidden_size,
            num_layers=args.tiny_num_layers,
            image_size=args.tiny_image_size,
            patch_size=args.tiny_patch_size,
            projection_dim=args.tiny_hidden_size,
        )
        processor = EntityCLIPProcessor(tiny_image_processor(args.tiny_image_size), tokenizer)
        return EntityCLIPModel(EntityCLIPConfig(clip_config=clip_config, **heads)), processor
    model_type = AutoConfig.from_pretrained(args.model).model_type
    if model_type == "clip":
        model = EntityCLIPModel.from_clip_pretrained(args.model, dtype=torch.float32, **heads)
        image_processor = CLIPImageProcessorPil.from_pretrained(args.model)
        processor = EntityCLIPProcessor(image_processor, CLIPTokenizer.from_pretrained(args.model))
        return model, processor
    if model_type == EntityCLIPConfig.model_type:
        model = EntityCLIPModel.from_pretrained(args.model, dtype=torch.float32, **heads)
        return model, EntityCLIPProcessor.from_pretrained(args.model)
    raise UsageError(f"--model {args.model}: a {model_type!r} checkpoint; expected 'tiny', CLIP or EntityCLIP")


def make_optimizer(args, model, device):
    """AdamW; no weight decay on biases, norms, gains and `logit_scale` (as open_clip)."""
    head_lr = args.head_learning_rate if args.head_learning_rate is not None else args.learning_rate
    groups = {}  # (learning rate, decayed?) -> parameters
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        decayed = not (param.ndim < 2 or "bias" in leaf or leaf.startswith("ln_") or "logit_scale" in name)
        groups.setdefault((args.learning_rate if name.startswith("clip.") else head_lr, decayed), []).append(param)
    # CLIP's groups first, decayed then not: with one learning rate, the two groups of the paper's recipe (and of
    # checkpoints written before --head_learning_rate existed), in the same order.
    order = sorted(groups, key=lambda key: (key[0] != args.learning_rate, not key[1]))
    groups = [
        {"params": groups[key], "lr": key[0], "weight_decay": args.weight_decay if key[1] else 0.0} for key in order
    ]
    return torch.optim.AdamW(
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        # One kernel for all parameters instead of a loop of small ops (1.14x faster steps on CPU, bench/README.md).
        fused=device.type in ("cuda", "cpu", "xpu", "mps") or None,
    )


# ----------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, loader, accelerator, args) -> dict[str, float]:
    """Retrieval metrics (R@K both directions, rsum) and the validation contrastive loss on the whole eval split.

    Embeddings are CLIP's (what retrieval uses), gathered from every process in dataset order.
    """
    model.eval()
    image_embeds, text_embeds = [], []
    for batch in loader:
        output = model(**{key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values")})
        image_embeds.append(accelerator.gather_for_metrics(output.image_embeds.float().contiguous()))
        text_embeds.append(accelerator.gather_for_metrics(output.text_embeds.float().contiguous()))
    model.train()
    image_embeds, text_embeds = torch.cat(image_embeds).cpu(), torch.cat(text_embeds).cpu()
    metrics = retrieval_metrics(image_embeds, text_embeds, chunk_size=4096)
    # The paper's selection criterion: mean contrastive loss over consecutive eval batches (independent of the
    # number of processes, since it is computed on the gathered embeddings).
    logit_scale = accelerator.unwrap_model(model).clip.logit_scale.detach()
    logit_scale = getattr(logit_scale, "full_tensor", lambda: logit_scale)().float().cpu()  # FSDP2: a DTensor
    losses = [
        contrastive_loss(image_embeds[i : i + args.eval_batch_size], text_embeds[i : i + args.eval_batch_size],
                         logit_scale, gather=False)[0]
        for i in range(0, len(image_embeds), args.eval_batch_size)
    ]  # fmt: skip
    metrics["contrastive_loss"] = torch.stack(losses).mean().item()
    if args.eval_diagnostics:
        metrics.update(evaluate_diagnostics(model, loader, accelerator))
    return metrics


@torch.no_grad()
def evaluate_diagnostics(model, loader, accelerator) -> dict[str, float]:
    """Whether the experts and GI-ITM learn image-text matching, or read the answer off the explanation.

    - `itm_loss`, `itm_auc`: GI-ITM on each eval batch's true pairs vs its mined negatives (AUC 0.5: no skill);
    - `expert_contrastive_loss`: the expert contrastive loss on true pairs;
    - `expert_contrastive_loss_shuffled_explanations`: the same with each pair given another pair's explanation;
    - `expert_contrastive_loss_shuffled_images`: each (text, explanation) with another pair's image. An expert
      loss that matches images to texts must rise towards chance (log of the batch size) here; one that stays far
      below it is solved from the explanation alone, which both sides read (the leak).
    """
    # Each process measures its own batches with the unwrapped model and process-local losses (no DDP hooks, no
    # all-gathers inside the forwards); only the totals below are collectives, the same calls on every process.
    model = accelerator.unwrap_model(model)
    model.eval()
    probabilities, labels, sums, batches = [], [], {}, 0
    with torch.random.fork_rng(devices=[]), local_losses():  # mining must not move the run's random state
        for batch in loader:
            inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
            # Every process skips the same batches: under FSDP each forward is a collective (weights all-gathered).
            if on_any_process(inputs["input_ids"].shape[0] < 2 or "explanation_input_ids" not in inputs, accelerator):
                continue
            output = model(**inputs, return_loss=True)
            probabilities += output.itm_logits.float().softmax(-1)[:, 0].tolist()
            labels += output.itm_labels.tolist()
            rolled_explanations = {
                **inputs,
                "explanation_input_ids": inputs["explanation_input_ids"].roll(1, 0),
                "explanation_attention_mask": inputs["explanation_attention_mask"].roll(1, 0),
            }
            rolled_images = {**inputs, "pixel_values": inputs["pixel_values"].roll(1, 0)}
            values = {
                "itm_loss": output.itm_loss,
                "expert_contrastive_loss": output.expert_contrastive_loss,
                "expert_contrastive_loss_shuffled_explanations": model(
                    **rolled_explanations, return_loss=True
                ).expert_contrastive_loss,
                "expert_contrastive_loss_shuffled_images": model(
                    **rolled_images, return_loss=True
                ).expert_contrastive_loss,
            }
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            batches += 1
    model.train()
    from entityclip_hf.itm_evaluation import roc_auc

    # Tensor collectives only (gather of padded rows, sum-reduce): the same calls on every process.
    device = accelerator.device
    names = sorted(sums)
    totals = accelerator.reduce(
        torch.tensor([sums[n] for n in names] + [batches], device=device, dtype=torch.float64), "sum"
    )
    pairs = torch.tensor([probabilities, labels], device=device, dtype=torch.float64).T.reshape(-1, 2)
    pairs = accelerator.gather(accelerator.pad_across_processes(pairs, dim=0, pad_index=-1)).cpu()
    pairs = pairs[pairs[:, 1] >= 0]  # padding rows carry label -1
    if float(totals[-1]) == 0:
        return {}
    metrics = {name: float(totals[i] / totals[-1]) for i, name in enumerate(names)}
    positives, negatives = pairs[pairs[:, 1] == 0, 0], pairs[pairs[:, 1] != 0, 0]
    if len(positives) and len(negatives):
        metrics["itm_auc"] = roc_auc(positives, negatives)
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    parts = [
        f"{d} R@1 {metrics[f'{d}_R@1']:.1f} R@5 {metrics[f'{d}_R@5']:.1f} R@10 {metrics[f'{d}_R@10']:.1f}"
        for d in ("i2t", "t2i")
    ]
    parts += [f"rsum {metrics['rsum']:.1f}", f"contrastive loss {metrics['contrastive_loss']:.4f}"]
    diagnostics = (
        ("itm_loss", "itm loss"),
        ("itm_auc", "itm auc"),
        ("expert_contrastive_loss", "expert loss"),
        ("expert_contrastive_loss_shuffled_explanations", "shuffled explanations"),
        ("expert_contrastive_loss_shuffled_images", "shuffled images"),
    )
    parts += [f"{label} {metrics[name]:.4f}" for name, label in diagnostics if name in metrics]
    return " | ".join(parts)


def is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    # A tie is not an improvement, also when rsum's sum of percentages differs from the best in its last bits.
    margin = 1e-9 * max(1.0, abs(best))
    return value < best - margin if metric.endswith("loss") or metric.endswith("rank") else value > best + margin


# ----------------------------------------------------------------------------------------------------- training
def clear_previous_run(args, accelerator) -> None:
    """Refuse to mix a new run with an earlier one in --output_dir, or delete its outputs (--overwrite_output_dir)."""
    previous_run = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(args.output_dir, name))]
    if previous_run and not args.resume:
        if not args.overwrite_output_dir:
            raise UsageError(
                f"{args.output_dir} holds an earlier run ({', '.join(previous_run)}): pass --resume to continue it, "
                "--overwrite_output_dir to replace it, or choose another --output_dir"
            )
        accelerator.wait_for_everyone()  # every process has looked before the main process deletes
        if accelerator.is_main_process:
            for name in previous_run:
                path = os.path.join(args.output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    accelerator.wait_for_everyone()


def common_rows(batch, accelerator):
    """Trim a batch to the row count every process has: the collator may have dropped bad samples on one process,
    and the all-gathered contrastive loss needs equal rows everywhere (a skip on one process only would hang)."""
    rows = batch["input_ids"].shape[0]
    if accelerator.num_processes > 1:
        rows = int(accelerator.gather(torch.tensor([rows], device=accelerator.device)).min())
    return {key: batch[key][:rows] for key in MODEL_INPUTS if key in batch}, rows


def check_distributed_setup(accelerator, launched_processes: int, args=None) -> None:
    """Refuse the setups that would train wrongly or fail late, before any work is done."""
    if accelerator.num_processes != launched_processes:
        raise RuntimeError(f"{launched_processes} processes launched but Accelerate sees {accelerator.num_processes}")
    if args is not None:
        check_sharding_setup(args, accelerator)  # FSDP: version 2 only, --fsdp needs 2+ processes, ...


def train(args) -> dict:
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # Without cpu=True, processes launched on a machine without GPU silently train as independent single runs.
        cpu=args.cpu or (launched_processes > 1 and not torch.cuda.is_available()),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to.split(","),
        project_dir=args.output_dir,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the number of processes
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    check_distributed_setup(accelerator, launched_processes, args)
    if not accelerator.is_main_process:
        # One copy of every report, warning and progress bar: the main process's.
        logging.getLogger("entityclip_hf").setLevel(logging.ERROR)
        datasets_logging.set_verbosity_error()
        datasets_logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()

    def log(message: str) -> None:  # main process only, without breaking the progress bar
        if accelerator.is_main_process:
            tqdm.write(message)

    log(json.dumps(vars(args), indent=2))
    log(
        f"{accelerator.num_processes} process(es), distributed type {accelerator.distributed_type.value}, "
        f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )
    if args.malloc_keep_freed:  # before the data loaders: their worker processes inherit the setting
        applied, why = keep_freed_memory()
        log(f"allocator: {why}" if applied else f"warning: allocator left as it is: {why} (bench/README.md, Allocator)")
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    clear_previous_run(args, accelerator)
    datasets = load_datasets(args, accelerator)
    resume_dir = find_checkpoint(args)
    if args.resume and resume_dir is None:
        log(f"--resume: no checkpoint in {args.output_dir}/checkpoints, starting from scratch")
    # --model tiny trains its tokenizer here: on the explanations too, or their words would split into characters.
    try:
        model, processor = build_model_and_processor(args, tokenizer_corpus(args, datasets))
    except UsageError:
        raise
    except (OSError, ValueError) as error:  # no or a bad config.json, an id the Hub (or the offline cache) lacks
        raise UsageError(f"--model {args.model}: cannot load it ({str(error).splitlines()[0]})") from error
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if args.compile:
        # The encoders are where the time goes and compile to one graph each; the whole model would break its graph
        # at data-dependent steps (hard-negative sampling). In place: weight names stay those of the model.
        model.clip.vision_model.compile()
        model.clip.text_model.compile()
    model.to(accelerator.device)
    train_loader, eval_loader, test_loader = make_dataloaders(args, datasets, processor, accelerator)
    sharding = Sharding(args, accelerator)  # DDP, or FSDP2 (--fsdp, or accelerate's FSDP plugin)
    # A StreamingLoader is not a DataLoader: prepare hands it back as it is (it splits the stream itself).
    model, optimizer, train_loader = sharding.prepare(
        model, lambda model: make_optimizer(args, model, accelerator.device), train_loader
    )
    log(f"model wrapping: {sharding.describe()}")
    if len(train_loader) == 0:
        raise UsageError(
            f"{len(datasets['train'])} training pairs: fewer than one batch of {args.batch_size} per process"
        )
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)  # len: batches per process
    total_steps = args.max_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    if args.streaming and args.max_steps:  # a streamed epoch's length is only known at its end: run to max_steps
        num_epochs = sys.maxsize
    scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps
    )
    scheduler = accelerator.prepare(scheduler)
    eval_loader, test_loader = (accelerator.prepare(x) if x is not None else None for x in (eval_loader, test_loader))
    if eval_loader is None:
        log(f"no '{args.eval_split}' split: no evaluation; best/ will be the final model")

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best_value": None, "best_step": None, "initial": None}
    if resume_dir:
        sharding.load_state(resume_dir)
        with open(os.path.join(resume_dir, STATE_FILE)) as f:
            state = json.load(f)
        log(f"resumed from {resume_dir} at step {state['step']} (epoch {state['epoch']})")
    state.setdefault("skipped_steps", 0)
    bad_steps = BadStepCounter(args.max_bad_steps)
    accelerator.init_trackers(
        TRACKER_PROJECT, config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    )
    log_file = open(os.path.join(args.output_dir, "train_log.jsonl"), "a") if accelerator.is_main_process else None
    if log_file:  # which run wrote the lines that follow (a resumed run repeats the steps after its checkpoint)
        run = {"num_processes": accelerator.num_processes, "resumed_from": resume_dir, "total_steps": total_steps}
        log_file.write(json.dumps({"step": state["step"], "run": run}) + "\n")

    def write_log(record):
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def run_eval():
        metrics = evaluate(model, eval_loader, accelerator, args)
        log(f"eval step {state['step']}: {format_metrics(metrics)}")
        write_log({"step": state["step"], **{f"eval/{k}": v for k, v in metrics.items()}})
        if state["initial"] is None:
            state["initial"] = metrics
        if args.best_metric not in metrics:
            raise UsageError(f"--best_metric {args.best_metric!r} is not an evaluation metric: {sorted(metrics)}")
        value = metrics[args.best_metric]
        if state["step"] > 0 and is_better(value, state["best_value"], args.best_metric):
            state["best_value"], state["best_step"] = value, state["step"]
            save_model_folder(accelerator, model, processor, os.path.join(args.output_dir, "best"), sharding)
            log(f"new best {args.best_metric} {value:.4f}: saved {args.output_dir}/best")
        return metrics

    if eval_loader is not None and state["step"] == 0:
        run_eval()  # R@K before training
    progress = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_main_process)
    sums, micro_batches, last_eval, last_saved, started = torch.zeros(len(LOSS_NAMES)), 0, None, None, time.time()
    step_problem = None  # why the optimizer step being accumulated is skipped, if it is
    start_epoch, skip = state["epoch"], state["batches_in_epoch"]
    model.train()
    for epoch in range(start_epoch, num_epochs):
        if state["step"] >= total_steps:  # resumed from the last checkpoint of a finished run
            break
        skip = skip if epoch == start_epoch else 0
        # The checkpoint was taken at the end of this epoch (a stream knows that from its position, not its length).
        if skip >= len(train_loader) and not args.streaming:
            continue
        state["epoch"], state["batches_in_epoch"] = epoch, skip
        for batch in epoch_batches(args, accelerator, train_loader, epoch, skip, state):  # resumes mid-epoch
            state["batches_in_epoch"] += 1
            if args.streaming:  # the checkpoint's state file keeps where the stream is
                state["stream_position"] = train_loader.position()
            inputs, rows = common_rows(batch, accelerator)
            if rows == 0:
                log(f"step {state['step']}: a batch with no usable sample on some process: skipped")
                continue
            with accelerator.accumulate(model):
                sharding.sync_gradients(accelerator.sync_gradients)
                # NaN/inf inputs, a forward failing on them, a NaN loss: the step is skipped, never applied. Every
                # process decides the same before the forward's and backward's collectives, or DDP would hang.
                problem, output = nonfinite_inputs(inputs), None
                if not on_any_process(problem is not None, accelerator):
                    output, problem = guarded_forward(model, inputs)
                bad_batch = on_any_process(problem is not None, accelerator)
                if bad_batch:
                    step_problem = describe_bad_batch(problem, list(batch.get("ids", []))[:rows], accelerator)
                else:
                    accelerator.backward(output.loss)
                if accelerator.sync_gradients and step_problem is None:
                    if args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad()  # also drops the gradients of a skipped step's good micro-batches
            if not bad_batch:
                losses = torch.stack([getattr(output, name).detach().float() for name in LOSS_NAMES])
                sums += accelerator.reduce(losses, "mean").cpu()  # each process's loss averaged: the global batch's
                micro_batches += 1
            if not accelerator.sync_gradients:
                continue
            if step_problem is not None:
                log(f"warning: step {state['step'] + 1} skipped (no update): {step_problem}")
                if log_file:
                    log_file.write(json.dumps({"step": state["step"], "skipped_step": step_problem}) + "\n")
                    log_file.flush()
                sums, micro_batches, description, step_problem = torch.zeros(len(LOSS_NAMES)), 0, step_problem, None
                state["skipped_steps"] += 1
                if bad_steps.bad_step():  # --max_bad_steps in a row: something is wrong beyond one bad sample
                    # The good steps since the last checkpoint are kept.
                    save_checkpoint(accelerator, args, state, sharding)
                    checkpoint = os.path.join(args.output_dir, "checkpoints", f"step_{state['step']}")
                    raise TrainingStopped(bad_steps.stop_message(description, checkpoint))
                if not args.save_every and state["batches_in_epoch"] >= len(train_loader):
                    save_checkpoint(
                        accelerator, args, state, sharding
                    )  # the epoch's checkpoint, though its last step was skipped
                    last_saved = state["step"]
                continue
            bad_steps.good_step()
            accelerator.unwrap_model(model).clamp_logit_scale()
            state["step"] += 1
            progress.update(1)
            record = {"step": state["step"], "epoch": epoch, "lr": scheduler.get_last_lr()[0]}
            record.update({f"train/{n}": v for n, v in zip(LOSS_NAMES, (sums / micro_batches).tolist(), strict=True)})
            sums, micro_batches = torch.zeros(len(LOSS_NAMES)), 0
            write_log(record)
            if state["step"] % args.log_every == 0:
                progress.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['lr']:.2e}")
            end_of_epoch = state["batches_in_epoch"] >= len(train_loader)
            done = state["step"] >= total_steps
            every = args.eval_every and state["step"] % args.eval_every == 0
            if eval_loader is not None and (every or (not args.eval_every and end_of_epoch) or done):
                last_eval = run_eval()
            if (args.save_every and state["step"] % args.save_every == 0) or (not args.save_every and end_of_epoch):
                save_checkpoint(accelerator, args, state, sharding)
                last_saved = state["step"]
            if args.crash_after_step is not None and state["step"] >= args.crash_after_step:
                os._exit(3)  # a crash: no cleanup, no final save
            if done:
                break
    progress.close()
    if eval_loader is not None and last_eval is None:  # --resume of a finished run: nothing trained, still report
        last_eval = run_eval()

    if last_saved != state["step"]:
        save_checkpoint(accelerator, args, state, sharding)
    save_model_folder(accelerator, model, processor, os.path.join(args.output_dir, "final"), sharding)
    if state["best_step"] is None:  # no evaluation after training: the final model is the best we know
        save_model_folder(accelerator, model, processor, os.path.join(args.output_dir, "best"), sharding)
    log(f"trained to step {state['step']} in {time.time() - started:.0f} s: saved {args.output_dir}/final and /best")
    if state["initial"] is not None and last_eval is not None:
        log(f"{args.eval_split} before: {format_metrics(state['initial'])}")
        log(f"{args.eval_split} after:  {format_metrics(last_eval)}")
    results = {"initial": state["initial"], "final": last_eval, "best_step": state["best_step"], "test": None}
    results["skipped_steps"] = state["skipped_steps"]
    if test_loader is not None:
        load_model_folder(model, os.path.join(args.output_dir, "best"), sharding)
        results["test"] = evaluate(model, test_loader, accelerator, args)
        title = f"{args.test_split} split, best/ (step {state['best_step'] or state['step']}):"
        log(format_metrics_table(results["test"], title=title))
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    if args.push_to_hub and accelerator.is_main_process:
        from entityclip_hf.hub import push_folder_to_hub

        metrics, split = (results["test"], "test") if results["test"] else (last_eval, args.eval_split)
        commit = push_folder_to_hub(
            os.path.join(args.output_dir, "best"),
            args.hub_model_id,
            metrics=metrics,
            dataset_name=args.dataset if metrics else None,
            dataset_split=split,
            training_args=vars(args),
            private=args.hub_private,
        )
        log(f"pushed best/ to {args.hub_model_id}: {getattr(commit, 'commit_url', commit)}")
    # Before end_training(), which destroys the process group (accelerate's Accelerator.end_training).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()  # every process has written what it writes
    accelerator.end_training()  # trackers finished, the process group destroyed
    if log_file:
        log_file.close()
    # A launched process (accelerate launch / torchrun) ends here, everything written and closed, without tearing
    # down this function's objects: after the peer process has exited, DDP's Reducer freeing its ProcessGroupGloo
    # hangs the last one now and then (2 gloo CPU processes, torch 2.13: the destructor joins a thread that never
    # returns; seen with py-spy --native). Its results are in output_dir.
    end_launched_process(0)
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        check_paths(args)
        return train(args)
    except UsageError as error:  # found once the data or model is opened: said like argparse would, exit status 2
        print(f"finetune.py: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error
    except TrainingStopped as error:  # not a bug: the run stopped on purpose, and says why on one line
        raise SystemExit(f"finetune.py: error: {error}") from error


if __name__ == "__main__":
    main(sys.argv[1:])
