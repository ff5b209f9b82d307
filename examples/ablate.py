"""Ablation on your own data: run arms x seeds of any finetune.py configuration and compare them with paired seeds.

    python examples/ablate.py --output_dir runs/ablation --seeds 0 1 2 --arms plain entityclip no_explanations \\
        -- --config my_run.json --dataset jsonl --dataset_root /data/mine

Everything after `--` goes to every `examples/finetune.py` run (the arm's flags and `--seed` are added, and the
run writes to `<output_dir>/<arm>/seed<N>`; a run whose `results.json` exists is not run again). The table compares
each arm with the baseline arm (default `plain`): per metric `mean +- std` over seeds, and the paired difference to
the baseline over the same seeds (bold when its mean exceeds twice its spread). Metrics are those finetune.py
writes for best/ on `--test_split` (or its last evaluation on `--eval_split` when there is no test split). Choose
between arms on a validation split (`--metrics_from final`), and only report the test split.

Arms: the presets of ARM_FLAGS below (`--help` lists them), or your own as `name=--flag value ...`.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

# The finetune.py flags of each preset arm. The paper's EntityCLIP is finetune.py's default configuration.
ARM_FLAGS: dict[str, list[str]] = {
    "plain": ["--beta", "0", "--gamma", "0"],  # plain CLIP fine-tuning: only CLIP's contrastive loss
    "entityclip": [],  # the paper: + 0.1 x expert contrastive loss + 0.1 x GI-ITM loss
    "no_explanations": ["--use_explanations", "false"],  # EntityCLIP's losses, every explanation removed
    # The opt-in variants (EntityCLIPConfig fields), each on top of the paper's losses:
    "explanation_loss": ["--explanation_contrastive_weight", "1.0"],  # + images vs explanation-aware texts
    "leak_free_experts": ["--expert_loss_reads_candidate_explanation", "true"],  # expert loss, candidates' expl.
    "cross_itm": ["--itm_cross_attention", "true"],  # GI-ITM with text-to-image cross-attention
    # explanation_loss, with the cheaper explanation pass (no gradient through the text encoder for explanations)
    "explanation_loss_no_encoder_gradient": [
        "--explanation_contrastive_weight", "1.0", "--explanation_encoder_gradient", "false",
    ],  # fmt: skip
    "all_variants": [
        "--explanation_contrastive_weight",
        "1.0",
        "--expert_loss_reads_candidate_explanation",
        "true",
        "--itm_cross_attention",
        "true",
    ],  # fmt: skip
    # A GI-ITM that learns enough to rerank: its new layers at 10x CLIP's learning rate (bench_efficacy.py's recipe:
    # 2e-4), the ITM loss at weight 1, cross-attention; on top of the explanation-aware training term.
    "itm_reranker": [
        "--explanation_contrastive_weight",
        "1.0",
        "--itm_cross_attention",
        "true",
        "--gamma",
        "1",
        "--head_learning_rate",
        "2e-3",
    ],  # fmt: skip
    "itm_reranker_fused_negatives": [
        "--explanation_contrastive_weight", "1.0", "--itm_cross_attention", "true", "--gamma", "1",
        "--head_learning_rate", "2e-3", "--itm_negatives_from_fused_texts", "true",
    ],  # fmt: skip
    "itm_reranker_no_cross_attention": [
        "--explanation_contrastive_weight",
        "1.0",
        "--gamma",
        "1",
        "--head_learning_rate",
        "2e-3",
    ],  # fmt: skip
}
DEFAULT_METRICS = ("i2t_R@1", "t2i_R@1", "R@1", "rsum")


FINETUNE = Path(__file__).resolve().parent / "finetune.py"


def parse_arm(text: str) -> tuple[str, list[str]]:
    """`name` (a preset) or `name=--flag value ...` (a custom arm)."""
    if "=" in text.split(" ", 1)[0]:
        name, flags = text.split("=", 1)
        return name, shlex.split(flags)
    if text not in ARM_FLAGS:
        raise SystemExit(f"ablate.py: unknown arm {text!r}; presets: {', '.join(ARM_FLAGS)}, or name='--flag value'")
    return text, ARM_FLAGS[text]


def run_arm(name: str, flags: list[str], seed: int, output_dir: Path, finetune_args: list[str], log=print) -> dict:
    """Run (or find) one finetune.py run and return its results.json."""
    folder = output_dir / name / f"seed{seed}"
    results = folder / "results.json"
    if results.exists():
        log(f"{name} seed {seed}: found {results}")
        return json.loads(results.read_text())
    command = [sys.executable, str(FINETUNE), *finetune_args, *flags, "--seed", str(seed)]
    command += ["--output_dir", str(folder), "--overwrite_output_dir"]
    log(f"{name} seed {seed}: {shlex.join(command)}")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "finetune.log", "w") as handle:
        completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    if completed.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed (exit {completed.returncode}): see {folder / 'finetune.log'}")
    return json.loads(results.read_text())


def metrics_of(results: dict, source: str) -> dict:
    metrics = dict(results["test"] if source == "test" and results.get("test") else results["final"])
    if "i2t_R@1" in metrics and "t2i_R@1" in metrics:
        metrics["R@1"] = (metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2  # the mean of both directions
    return metrics


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    finetune_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    presets = "\n".join(
        f"  {name:<18} {' '.join(flags) or '(no flag: the paper)'}" for name, flags in ARM_FLAGS.items()
    )
    parser = argparse.ArgumentParser(
        description=__doc__, epilog="preset arms:\n" + presets, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--arms", nargs="+", default=["plain", "entityclip", "no_explanations"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--baseline", default="plain", help="the arm the others are compared with")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument(
        "--metrics_from", choices=("test", "final"), default="test",
        help="test: best/ on --test_split; final: the last evaluation on --eval_split (validation)",
    )  # fmt: skip
    args = parser.parse_args(own)
    from entityclip_hf.ablation import comparison_table, summarize_arms

    output_dir = Path(args.output_dir)
    arms = dict(parse_arm(text) for text in args.arms)
    results = {
        name: {seed: metrics_of(run_arm(name, flags, seed, output_dir, finetune_args), args.metrics_from)
               for seed in args.seeds}
        for name, flags in arms.items()
    }  # fmt: skip
    baseline = args.baseline if args.baseline in arms else None
    table = comparison_table(results, args.metrics, baseline=baseline)
    print(f"\n{args.metrics_from} metrics, mean ± std over seeds {args.seeds}; Δ: paired difference to {baseline}\n")
    print(table)
    summary = {"arms": {n: f for n, f in arms.items()}, "seeds": args.seeds, "metrics_from": args.metrics_from,
               "results": results, "summary": summarize_arms(results, args.metrics, baseline), "table": table}  # fmt: skip
    (output_dir / "ablation.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
