"""Do explanations pay off? EntityCLIP's story at small scale, in two stages, measured over seeds.

Stage 1 pretrains a tiny CLIP on generic captions that describe what is drawn in words (colours, shapes, objects;
no names): the stand-in for OpenAI's CLIP (`efficacy_pretrain.py`, cached). Stage 2 fine-tunes it with
`examples/finetune.py` on entity pairs whose captions only NAME made-up entities ("Oren Halloran arrives in
Tessaly") and whose explanations describe each entity's look in the stage-1 words (`efficacy_data.py`). Arms
(`examples/ablate.py` presets, plus the variants): plain fine-tuning, the paper's EntityCLIP, EntityCLIP without
explanations, ... x seeds.

Each fine-tuned model is evaluated on four conditions: seen entities (new images and captions of entities trained
on) and unseen entities (never trained on, with explanations), each with a validation and a test split. Retrieval
with the text alone (the paper) and with explanation-aware texts (`fuse_explanation_embeddings`, weight chosen per
arm on BOTH validation conditions, never on test); ITM AUC; R@K after GI-ITM reranks the CLIP top-k.

    python bench/bench_efficacy.py                       # everything: ~30 min on 2 CPU cores (see bench/README.md)
    python bench/bench_efficacy.py --arms plain entityclip --seeds 0   # a subset; finished runs are reused

Outputs in --work_dir (default outputs/efficacy): the data, stage1/, one finetune folder per arm and seed; the
results JSON (--output) and the tables (--markdown-out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

from ablate import ARM_FLAGS, run_arm  # noqa: E402
from common import machine_summary  # noqa: E402
from efficacy_data import all_entity_texts, write_entity_conditions  # noqa: E402
from efficacy_pretrain import pretrain_stage1  # noqa: E402

from entityclip_hf.ablation import comparison_table, summarize_arms  # noqa: E402
from entityclip_hf.itm_evaluation import PairScorer, itm_auc, rerank_recalls_by_clip_weight  # noqa: E402
from entityclip_hf.metrics import retrieval_metrics  # noqa: E402
from entityclip_hf.retrieval import encode_explanations, encode_images, encode_texts  # noqa: E402

# condition -> (folder under the data root, split file)
CONDITIONS = {
    "val_seen": ("main", "validation"),
    "val_unseen": ("unseen_val", "test"),
    "test_seen": ("main", "test"),
    "test_unseen": ("unseen_test", "test"),
}
WEIGHTS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)  # explanation weights tried on validation
RERANK_TOP_K = 10
# Reranking scores tried on validation: GI-ITM's probability alone (None), or its log-odds + w x the CLIP logit.
CLIP_WEIGHTS = (None, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# The arms of the benchmark: ablate.py's presets, then the variants (flags of finetune.py).
BENCH_ARMS = {
    name: ARM_FLAGS[name]
    for name in (
        "plain", "entityclip", "no_explanations", "explanation_loss", "leak_free_experts", "cross_itm", "all_variants",
        "itm_reranker", "itm_reranker_no_cross_attention", "itm_reranker_fused_negatives",
    )
}  # fmt: skip
# Stage 2's recipe, the same for every arm (chosen on the seen validation split with the plain arm).
FINETUNE_ARGS = [
    "--dataset", "jsonl", "--check_images", "none", "--test_split", "",
    "--batch_size", "32", "--eval_batch_size", "128", "--learning_rate", "2e-4", "--weight_decay", "0.1",
    "--warmup_steps", "20", "--num_epochs", "8", "--best_metric", "rsum", "--save_every", "1000000",
    "--log_every", "50",
]  # fmt: skip
RETRIEVAL_KEYS = ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "rsum")


def load_conditions(data_root: Path) -> dict:
    from entityclip_hf.data import load_entity_dataset

    conditions = {}
    for name, (folder, split) in CONDITIONS.items():
        splits = load_entity_dataset("jsonl", data_root / folder, splits=[split], check_images="none")
        conditions[name] = splits[split]
    return conditions


@torch.no_grad()
def embed(model, processor, dataset) -> dict[str, torch.Tensor]:
    options = {"batch_size": 256, "progress": False}
    return {
        "image": encode_images(model, processor, dataset, **options),
        "text": encode_texts(model, processor, dataset, **options),
        "explanation": encode_explanations(model, processor, dataset["explanation"], batch_size=256),
    }


def retrieval_by_weight(embeddings: dict) -> dict[str, dict]:
    """Retrieval metrics for each explanation weight (0: the text alone, the paper)."""
    by_weight = {}
    for weight in WEIGHTS:
        metrics = retrieval_metrics(
            embeddings["image"], embeddings["text"], explanation_embeds=embeddings["explanation"],
            explanation_weight=weight,
        )  # fmt: skip
        entry = {key: metrics[key] for key in RETRIEVAL_KEYS}
        entry["R@1"] = (metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2
        entry["R@5"] = (metrics["i2t_R@5"] + metrics["t2i_R@5"]) / 2
        by_weight[str(weight)] = entry
    return by_weight


def load_entityclip(folder: Path):
    from entityclip_hf import EntityCLIPModel, EntityCLIPProcessor

    model = EntityCLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    return model, EntityCLIPProcessor.from_pretrained(folder)


def evaluate_zero_shot(stage1: Path, conditions: dict) -> dict:
    """The stage-1 CLIP without fine-tuning: text-only, explanation-only and fused queries."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from entityclip_hf import EntityCLIPProcessor

    model = CLIPModel.from_pretrained(stage1, dtype=torch.float32).eval()
    processor = EntityCLIPProcessor(
        CLIPImageProcessorPil.from_pretrained(stage1), CLIPTokenizer.from_pretrained(stage1)
    )
    return {name: retrieval_by_weight(embed(model, processor, data)) for name, data in conditions.items()}


def evaluate_run(folder: Path, conditions: dict) -> dict:
    """Retrieval by weight on every condition for one fine-tuned model (best/), cached in the run folder."""
    cache = folder / "efficacy_eval.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model, processor = load_entityclip(folder / "best")
    result = {"retrieval": {}}
    for name, data in conditions.items():
        result["retrieval"][name] = retrieval_by_weight(embed(model, processor, data))
    cache.write_text(json.dumps(result, indent=1))
    return result


def choose_weight(evaluations: dict[int, dict]) -> float:
    """The explanation weight with the best mean R@1 over seeds on the seen AND the unseen validation splits."""

    def score(weight: str) -> float:
        values = [
            (run["retrieval"]["val_seen"][weight]["R@1"] + run["retrieval"]["val_unseen"][weight]["R@1"]) / 2
            for run in evaluations.values()
        ]
        return sum(values) / len(values)

    return float(max((str(w) for w in WEIGHTS), key=score))


def itm_diagnostics(folder: Path, conditions: dict, weight: float) -> dict:
    """ITM AUC and GI-ITM reranking of the first stage's top k (texts fused at `weight`) on every condition, for each
    reranking score of CLIP_WEIGHTS (chosen later on the validation conditions)."""
    cache = folder / f"efficacy_rerank_w{weight}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from entityclip_hf.retrieval import fuse_explanation_embeddings

    model, processor = load_entityclip(folder / "best")
    result = {}
    for name, data in conditions.items():
        scorer = PairScorer.from_dataset(model, processor, data)
        embeddings = embed(model, processor, data)
        text = fuse_explanation_embeddings(embeddings["text"], embeddings["explanation"], weight)
        by_weight = rerank_recalls_by_clip_weight(scorer, embeddings["image"], text, CLIP_WEIGHTS, top_k=RERANK_TOP_K)
        entry = {"itm_auc": 100 * itm_auc(scorer)}
        for clip_weight, rerank in by_weight.items():
            entry["clip_R@1"] = (rerank["clip_i2t_R@1"] + rerank["clip_t2i_R@1"]) / 2
            entry[f"rerank_R@1 clip_weight={clip_weight}"] = (rerank["rerank_i2t_R@1"] + rerank["rerank_t2i_R@1"]) / 2
        result[name] = entry
    cache.write_text(json.dumps(result, indent=1))
    return result


def choose_clip_weight(diagnostics: dict[int, dict]) -> float:
    """The CLIP weight of the fused reranking score with the best mean reranked R@1 over seeds on the seen AND the
    unseen validation splits (never on test)."""

    def score(clip_weight) -> float:
        key = f"rerank_R@1 clip_weight={clip_weight}"
        values = [(run["val_seen"][key] + run["val_unseen"][key]) / 2 for run in diagnostics.values()]
        return sum(values) / len(values)

    return max((w for w in CLIP_WEIGHTS if w is not None), key=score)


LEAK_KEYS = {
    "eval/contrastive_loss": "CLIP loss",
    "eval/expert_contrastive_loss": "expert loss",
    "eval/expert_contrastive_loss_shuffled_explanations": "expert loss, shuffled explanations",
    "eval/expert_contrastive_loss_shuffled_images": "expert loss, shuffled images",
    "eval/itm_loss": "ITM loss",
    "eval/itm_auc": "ITM AUC vs hardest negatives",
}


def training_diagnostics(folder: Path) -> dict:
    """finetune.py's last evaluation diagnostics (validation, seen entities) of one run."""
    records = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    last = [record for record in records if "eval/rsum" in record][-1]
    return {label: last[key] for key, label in LEAK_KEYS.items() if key in last}


def rows_for_tables(arms, evaluations, weights, diagnostics, clip_weights):
    """arm label -> seed -> flat metrics ("seen R@1", "unseen rsum", "seen ITM AUC", ...) for the comparison tables."""
    rows = {}
    for arm in arms:
        explained = f"{arm} + explanation queries (w={weights[arm]}, rerank clip_weight={clip_weights[arm]})"
        for label, weight in ((arm, "0.0"), (explained, str(weights[arm]))):
            rows[label] = {}
            for seed, run in evaluations[arm].items():
                flat = {}
                for condition, short in (("test_seen", "seen"), ("test_unseen", "unseen")):
                    for key, value in run["retrieval"][condition][weight].items():
                        flat[f"{short} {key}"] = value
                    if weight != "0.0":
                        itm = diagnostics[arm][seed][condition]
                        flat[f"{short} ITM AUC"] = itm["itm_auc"]
                        flat[f"{short} CLIP R@1"] = itm["clip_R@1"]
                        flat[f"{short} GI-ITM reranked R@1"] = itm["rerank_R@1 clip_weight=None"]
                        flat[f"{short} fused reranked R@1"] = itm[f"rerank_R@1 clip_weight={clip_weights[arm]}"]
                        flat[f"{short} rerank gain"] = flat[f"{short} fused reranked R@1"] - itm["clip_R@1"]
                rows[label][seed] = flat
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/efficacy")
    parser.add_argument("--arms", nargs="+", default=list(BENCH_ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", default=str(HERE / "results" / "efficacy.json"))
    parser.add_argument("--markdown-out", type=Path, help="also write the tables to this Markdown file")
    parser.add_argument("--finetune_args", default="", help="extra finetune.py flags for every arm (quoted)")
    parser.add_argument("--jobs", type=int, default=2, help="finetune.py runs at a time")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per process: 1 keeps 2 parallel runs from oversubscribing 2 cores (measured: several "
        "times faster per step on a busy 2-core machine than torch's default)",
    )  # fmt: skip
    parser.add_argument("--stage1_folder", help="use this CLIP folder as stage 1 instead of pretraining (smoke runs)")
    args = parser.parse_args(argv)
    started = time.time()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every finetune.py run
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir).resolve()
    data_info = write_entity_conditions(work / "data")
    stage1 = Path(args.stage1_folder).resolve() if args.stage1_folder else work / "stage1"
    stage1_info = (
        {"folder": str(stage1)} if args.stage1_folder else pretrain_stage1(stage1, all_entity_texts(work / "data"))
    )
    stage1_seconds = time.time() - started
    conditions = load_conditions(work / "data")
    zero_shot = evaluate_zero_shot(stage1, conditions)
    finetune_args = [*FINETUNE_ARGS, "--model", str(stage1), "--dataset_root", str(work / "data" / "main")]
    finetune_args += args.finetune_args.split()
    evaluations, weights, diagnostics, seconds = {}, {}, {}, {}

    def train(arm_and_seed):
        arm, seed = arm_and_seed
        tick = time.time()
        run_arm(arm, BENCH_ARMS.get(arm, ARM_FLAGS.get(arm)), seed, work / "runs", finetune_args)
        seconds[f"{arm}/seed{seed}"] = round(time.time() - tick, 1)
        # Evaluated here, in this thread, while the other job trains (torch releases the GIL in its kernels).
        return arm, seed, evaluate_run(work / "runs" / arm / f"seed{seed}", conditions)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is its own process
        for arm, seed, evaluation in pool.map(train, [(arm, seed) for seed in args.seeds for arm in args.arms]):
            evaluations.setdefault(arm, {})[seed] = evaluation
    training_seconds = time.time() - started - stage1_seconds
    for arm in args.arms:
        evaluations[arm] = {seed: evaluations[arm][seed] for seed in args.seeds}
        weights[arm] = choose_weight(evaluations[arm])

    def itm(arm_and_seed):
        arm, seed = arm_and_seed
        return arm, seed, itm_diagnostics(work / "runs" / arm / f"seed{seed}", conditions, weights[arm])

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for arm, seed, result in pool.map(itm, [(arm, seed) for arm in args.arms for seed in args.seeds]):
            diagnostics.setdefault(arm, {})[seed] = result
    clip_weights = {arm: choose_clip_weight(diagnostics[arm]) for arm in args.arms}
    rows = rows_for_tables(args.arms, evaluations, weights, diagnostics, clip_weights)
    leak = {arm: {seed: training_diagnostics(work / "runs" / arm / f"seed{seed}") for seed in args.seeds}
            for arm in args.arms}  # fmt: skip
    baseline = "plain" if "plain" in args.arms else None
    tables = render_tables(rows, zero_shot, data_info, baseline, args.seeds)
    tables += (
        "\n\nfinetune.py's last evaluation (validation, seen entities; eval batch of 113 pairs, chance loss "
        "log 113 = 4.73): leak indicators and GI-ITM\n\n" + comparison_table(leak, list(LEAK_KEYS.values()), digits=3)
    )
    total = time.time() - started
    text = (
        f"{tables}\n\nWhole run: {total / 60:.1f} min (data and stage 1 {stage1_seconds / 60:.1f} min, stage-2 "
        f"training {training_seconds / 60:.1f} min, evaluation {(total - stage1_seconds - training_seconds) / 60:.1f} "
        f"min), {args.jobs} runs at a time, {args.threads} thread(s) each.\n"
    )
    text += f"Machine: {machine_summary()}"
    print("\n" + text)
    if args.markdown_out:
        args.markdown_out.write_text(text + "\n")
    metrics = [key for row in rows.values() for seed_row in row.values() for key in seed_row]
    result = {
        "command": "python bench/bench_efficacy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": data_info["rows"],
        "stage1": stage1_info,
        "zero_shot": zero_shot,
        "weights": weights,
        "rerank_clip_weights": clip_weights,
        "evaluations": evaluations,
        "itm": diagnostics,
        "training_diagnostics": leak,
        "summary": summarize_arms(rows, sorted(set(metrics)), baseline),
        "seconds": {
            "total": round(total, 1),
            "data_and_stage1": round(stage1_seconds, 1),
            "stage2_training": round(training_seconds, 1),
            **seconds,
        },  # fmt: skip
        "machine": machine_summary(),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    return result


def render_tables(rows, zero_shot, data_info, baseline, seeds) -> str:
    counts = data_info["rows"]
    parts = [
        f"Test galleries: seen {counts['main/test.jsonl']} pairs, unseen {counts['unseen_test/test.jsonl']} pairs "
        f"(chance R@1 {100 / counts['main/test.jsonl']:.1f} / {100 / counts['unseen_test/test.jsonl']:.1f}). "
        f"Seeds {seeds}; Δ = paired difference to {baseline} over seeds (bold: mean > 2 x spread). "
        "R@1 = mean of i2t and t2i R@1.",
        "\nSeen entities (test):\n",
        comparison_table(rows, ["seen R@1", "seen R@5", "seen rsum"], baseline),
        "\nUnseen entities, with explanations (test):\n",
        comparison_table(rows, ["unseen R@1", "unseen R@5", "unseen rsum"], baseline),
        "\nGI-ITM: AUC (true vs mismatched pairs, %) and R@1 after reranking the first stage's top "
        f"{RERANK_TOP_K} (test), by GI-ITM's probability alone and by its log-odds + clip_weight x the CLIP logit "
        "(clip_weight chosen per arm on both validation splits):\n",
        comparison_table(
            {label: row for label, row in rows.items() if "explanation queries" in label},
            [
                "seen ITM AUC",
                "seen CLIP R@1",
                "seen GI-ITM reranked R@1",
                "seen fused reranked R@1",
                "seen rerank gain",
                "unseen ITM AUC",
                "unseen CLIP R@1",
                "unseen GI-ITM reranked R@1",
                "unseen fused reranked R@1",
                "unseen rerank gain",
            ],
        ),  # fmt: skip
        "\nStage-1 CLIP without fine-tuning (one model), R@1 by query: caption / caption + explanation (w=0.5) / "
        "explanation alone:\n",
    ]
    for condition in ("test_seen", "test_unseen"):
        by_weight = zero_shot[condition]
        parts.append(
            f"- {condition}: {by_weight['0.0']['R@1']:.1f} / {by_weight['0.5']['R@1']:.1f} / {by_weight['1.0']['R@1']:.1f}"
        )
    return "\n".join(parts)


if __name__ == "__main__":
    main()
