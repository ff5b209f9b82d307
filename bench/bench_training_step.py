"""Benchmark: one EntityCLIP training step against one plain CLIPModel contrastive step, side by side.

Both models have ViT-B/32 CLIP's shapes and the same random weights; both see the same batch (texts of 40 tokens,
explanations of 77 for EntityCLIP) at the same precision, with the same optimizer (AdamW). A step is forward, loss,
backward, optimizer step, `zero_grad` and the `logit_scale` clamp. Each model lives in its own worker process; the
parent times them alternately (A B A B ...), so that noise from the rest of the machine hits both, and reads each
process's own peak resident memory. FLOPs are counted once per model with `FlopCounterMode`, on the untimed warm-up
step.

    python bench/bench_training_step.py                           # batch 16 and 32, fp32: the issue's table
    python bench/bench_training_step.py --precision bf16          # the same under bf16 autocast
    python bench/bench_training_step.py --gain bf16               # EntityCLIP without / with one speed-up
    python bench/bench_training_step.py --profile --batch-sizes 8 # where an EntityCLIP step spends its time
    python bench/bench_training_step.py --variant-flops           # FLOPs of the opt-in variants' steps / CLIP's
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from common import (
    Worker,
    count_flops,
    format_table,
    gib,
    interleaved,
    machine_summary,
    matmul_throughput,
    median,
    report,
    wait_for_idle_cpu,
)
from training_steps import OPEN_CLIP_MODEL, Setup, TrainingStep, open_clip_available

# The targets for EntityCLIP / CLIP.
MAX_FLOP_RATIO = 2.2
MAX_TIME_OVER_FLOP_RATIO = 1.15
MAX_MEMORY_RATIO = 2.0
# ... and for EntityCLIP / open_clip's CLIP step, in time (issue 15).
MAX_TIME_RATIO_TO_OPEN_CLIP = 1.6
MODEL_LABELS = {"clip": "CLIPModel", "entityclip": "EntityCLIPModel", "open_clip": f"open_clip {OPEN_CLIP_MODEL}"}



# `--gain NAME`: the EntityCLIP step without (first) and with (second) one speed-up, everything else the default.
GAINS = {
    "bf16": (Setup(precision="fp32"), Setup(precision="bf16")),
    "sdpa": (Setup(attn="eager"), Setup(attn="sdpa")),
    "fused-adamw": (Setup(optimizer="foreach"), Setup(optimizer="fused")),
    "compile": (Setup(compile="none"), Setup(compile="encoders")),
    "compile-model": (Setup(compile="none"), Setup(compile="model")),
    "dynamic-padding": (Setup(text_padding=77), Setup(text_padding=None)),
    "malloc": (Setup(malloc="default"), Setup(malloc="tuned")),
    # The allocator setting applied from inside the process (entityclip_hf.allocator, what finetune.py calls).
    "malloc-mallopt": (Setup(malloc="default"), Setup(malloc="mallopt")),
    # The cheaper explanation pass (opt-in): explanations encoded without a gradient through the text encoder.
    "explanation-encoder-gradient": (Setup(), Setup(model_fields=(("explanation_encoder_gradient", False),))),
}


# `--variant-flops`: the EntityCLIPConfig fields of each opt-in variant (modeling_variants.py).
VARIANTS = {
    "paper (defaults)": {},
    "explanation_contrastive_weight=1": {"explanation_contrastive_weight": 1.0},
    "expert_loss_reads_candidate_explanation": {"expert_loss_reads_candidate_explanation": True},
    "itm_cross_attention": {"itm_cross_attention": True},
    "explanation_encoder_gradient=False": {"explanation_encoder_gradient": False},
    "all three": {
        "explanation_contrastive_weight": 1.0,
        "expert_loss_reads_candidate_explanation": True,
        "itm_cross_attention": True,
    },
}


def training_step_worker(name: str, kind: str, batch_size: int, setup: Setup, args: argparse.Namespace) -> Worker:
    """A worker process holding one model ("clip" or "entityclip") and its batch, ready to time training steps."""
    return Worker(
        name, TrainingStep, kind, batch_size, args.text_length, args.explanation_length, setup, args.seed,
        worker_env=setup.worker_env(),
    )  # fmt: skip


def measure(variants: dict[str, tuple[str, Setup]], batch_size: int, args: argparse.Namespace) -> dict[str, dict]:
    """Time, FLOPs and peak memory of each variant (label -> (model kind, setup)) at one batch size."""
    workers = [training_step_worker(label, kind, batch_size, setup, args) for label, (kind, setup) in variants.items()]
    try:
        build = {worker.name: worker.wait_ready() for worker in workers}
        # CLIPModel and EntityCLIP share one CLIP's weights; open_clip has its own (None).
        checksums = {worker.call("backbone_checksum") for worker in workers} - {None}
        if len(checksums) > 1:
            raise RuntimeError(f"the variants do not share the same CLIP weights: {checksums}")
        flops = {worker.name: worker.call("warmup_flops") for worker in workers}
        for worker in workers:
            if not worker.call("reset_peak_memory"):
                print("warning: cannot reset the peak-memory mark; peaks include the warm-up step", file=sys.stderr)
        times = interleaved(workers, "timed_step", args.iterations, wait_idle=args.wait_idle)
        peaks = {worker.name: worker.call("peak_memory") for worker in workers}
        parameters = {worker.name: worker.call("num_parameters") for worker in workers}
    finally:
        for worker in workers:
            worker.close()
    return {
        label: {
            "walls": [wall for wall, _ in times[label]],
            "time": median([wall for wall, _ in times[label]]),
            "cpu_time": median([cpu for _, cpu in times[label]]),
            "samples_per_second": batch_size / median([wall for wall, _ in times[label]]),
            "flops": flops[label],
            # Everything training needs (weights, gradients, AdamW state, activations, allocator slack): the
            # process's peak resident memory over the timed steps, minus its resident memory before the model (on
            # CUDA: the device's peak allocated memory, which holds nothing else).
            "memory": peaks[label] - (0 if variants[label][1].device == "cuda" else build[label]["baseline_rss"]),
            "parameters": parameters[label],
        }
        for label in variants
    }


def figures_row(batch_size: int, label: str, figures: dict, matmul_flops: float) -> list:
    achieved = figures["flops"] / figures["time"]
    return [
        batch_size,
        label,
        f"{figures['parameters'] / 1e6:.1f}M",
        figures["time"],
        figures["cpu_time"],
        figures["samples_per_second"],
        gib(figures["memory"]),
        figures["flops"] / 1e9,
        achieved / 1e9,
        f"{100 * achieved / matmul_flops:.0f}%",
    ]


FIGURE_HEADERS = [
    "batch",
    "model",
    "params",
    "s/step",
    "CPU s/step",
    "samples/s",
    "peak mem (GiB)",
    "GFLOP/step",
    "GFLOP/s",
    "of matmul peak",
]


def comparison_report(results: dict[int, dict], matmul_flops: float) -> tuple[str, bool]:
    """The figures of every model, the EntityCLIP / CLIP ratios (and the ratios to open_clip when it ran), and
    whether every target is met."""
    rows, ratio_rows, open_clip_rows, all_met = [], [], [], True
    for batch_size, models in results.items():
        rows += [figures_row(batch_size, label, figures, matmul_flops) for label, figures in models.items()]
        clip, entity = models[MODEL_LABELS["clip"]], models[MODEL_LABELS["entityclip"]]
        flop_ratio = entity["flops"] / clip["flops"]
        time_ratio = entity["time"] / clip["time"]
        memory_ratio = entity["memory"] / clip["memory"]
        # Per-iteration ratios (each EntityCLIP step over the CLIP step timed right before it) show the spread.
        pair_ratios = sorted(e / c for e, c in zip(entity["walls"], clip["walls"], strict=True))
        met = (
            flop_ratio <= MAX_FLOP_RATIO
            and time_ratio <= MAX_TIME_OVER_FLOP_RATIO * flop_ratio
            and memory_ratio <= MAX_MEMORY_RATIO
        )
        all_met &= met
        ratio_rows.append(
            [
                batch_size,
                f"{flop_ratio:.2f} (<= {MAX_FLOP_RATIO})",
                f"{time_ratio:.2f} ({pair_ratios[0]:.2f}-{pair_ratios[-1]:.2f})",
                f"{time_ratio / flop_ratio:.2f} (<= {MAX_TIME_OVER_FLOP_RATIO})",
                f"{entity['cpu_time'] / clip['cpu_time']:.2f}",
                f"{memory_ratio:.2f} (<= {MAX_MEMORY_RATIO})",
                "yes" if met else "NO",
            ]
        )
        open_clip = models.get(MODEL_LABELS["open_clip"])
        if open_clip:
            for label, figures in ((MODEL_LABELS["clip"], clip), (MODEL_LABELS["entityclip"], entity)):
                ratio = figures["time"] / open_clip["time"]
                walls = sorted(f / o for f, o in zip(figures["walls"], open_clip["walls"], strict=True))
                flops = figures["flops"] / open_clip["flops"]
                goal = ""
                if label == MODEL_LABELS["entityclip"]:
                    goal = "yes" if ratio <= MAX_TIME_RATIO_TO_OPEN_CLIP else "NO"
                    all_met &= ratio <= MAX_TIME_RATIO_TO_OPEN_CLIP
                open_clip_rows.append(
                    [
                        batch_size,
                        label,
                        f"{ratio:.2f} ({walls[0]:.2f}-{walls[-1]:.2f})",
                        f"{flops:.2f}",
                        f"{ratio / flops:.2f}",
                        f"{figures['memory'] / open_clip['memory']:.2f}",
                        goal,
                    ]
                )
    ratios = format_table(
        [
            "batch",
            "FLOP ratio",
            "time ratio (min-max)",
            "time ratio / FLOP ratio",
            "CPU-time ratio",
            "memory ratio",
            "targets met",
        ],
        ratio_rows,
    )
    text = f"{format_table(FIGURE_HEADERS, rows)}\n\nEntityCLIP / CLIP:\n\n{ratios}"
    if open_clip_rows:
        headers = [
            "batch",
            "model",
            "time ratio (min-max)",
            "FLOP ratio",
            "time / FLOP ratio",
            "memory ratio",
            f"time <= {MAX_TIME_RATIO_TO_OPEN_CLIP}",
        ]
        text += (
            f"\n\n/ open_clip {OPEN_CLIP_MODEL} (texts padded to its fixed 77 tokens; time / FLOP ratio above 1 = "
            f"slower per FLOP than open_clip):\n\n{format_table(headers, open_clip_rows)}"
        )
    return text, all_met


def gain_report(results: dict[int, dict], matmul_flops: float) -> str:
    rows = []
    for batch_size, variants in results.items():
        baseline = next(iter(variants.values()))
        for label, figures in variants.items():
            rows.append(
                figures_row(batch_size, label, figures, matmul_flops)
                + [
                    f"{baseline['time'] / figures['time']:.2f}x",
                    f"{baseline['cpu_time'] / figures['cpu_time']:.2f}x",
                    f"{figures['memory'] / baseline['memory']:.2f}",
                    f"{figures['flops'] / baseline['flops']:.3f}",
                ]
            )
    return format_table(FIGURE_HEADERS + ["speed-up", "CPU-time speed-up", "memory vs first", "FLOPs vs first"], rows)


def variant_flops_report(args: argparse.Namespace) -> str:
    """FLOPs of one training step of each opt-in variant, and their ratio to CLIPModel's step (same batch)."""
    rows = []
    for batch_size in args.batch_sizes:
        clip_step = TrainingStep("clip", batch_size, args.text_length, args.explanation_length, Setup(), args.seed)
        clip_flops = count_flops(clip_step.step)
        del clip_step
        paper_flops = None
        for name, fields in VARIANTS.items():
            runner = TrainingStep(
                "entityclip", batch_size, args.text_length, args.explanation_length, Setup(), args.seed, fields
            )
            flops = count_flops(runner.step)
            paper_flops = paper_flops or flops
            rows.append([batch_size, name, f"{flops / 1e12:.3f}", f"{flops / clip_flops:.3f}", f"{flops / paper_flops:.3f}"])
            print(f"batch {batch_size}, {name}: {flops / 1e12:.3f} TFLOP", flush=True)
            del runner
    headers = ["batch", "EntityCLIP variant", "TFLOP / step", "/ CLIPModel step", "/ paper EntityCLIP step"]
    return (
        f"FLOPs per training step (forward, backward, AdamW) of EntityCLIP's opt-in variants; ViT-B/32 shapes, texts "
        f"{args.text_length} tokens, explanations {args.explanation_length}, fp32, counted with FlopCounterMode.\n\n"
        + format_table(headers, rows)
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--iterations", type=int, default=3, help="timed steps per model (after 1 warm-up)")
    parser.add_argument("--text-length", type=int, default=40)
    parser.add_argument("--explanation-length", type=int, default=77)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = bf16 autocast")
    parser.add_argument(
        "--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa",
        help="transformers CLIP's attention implementation (flash_attention_2: CUDA with the flash-attn package)",
    )  # fmt: skip
    parser.add_argument("--optimizer", choices=["fused", "foreach", "for-loop"], default="fused", help="AdamW kernel")
    parser.add_argument(
        "--compile", choices=["none", "encoders", "model"], default="none", help="torch.compile (in the warm-up step)"
    )
    parser.add_argument(
        "--malloc", choices=["default", "tuned", "mallopt"], default="default",
        help="glibc malloc of the workers: tuned = GLIBC_TUNABLES at start; mallopt = entityclip_hf.allocator",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument(
        "--open-clip", choices=["yes", "no", "auto"], default="auto",
        help=f"add open_clip's {OPEN_CLIP_MODEL} as a row (the `bench` extra); auto: when it can be imported",
    )  # fmt: skip
    parser.add_argument("--gain", choices=sorted(GAINS), help="EntityCLIP without and with one speed-up, instead")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on a shared machine: before each round of timed steps, wait up to this long for the cores to go idle",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--profile", action="store_true", help="profile one step instead of timing")
    parser.add_argument(
        "--variant-flops", action="store_true", help="count the FLOPs of the opt-in variants' steps instead of timing"
    )
    parser.add_argument("--profile-model", choices=["entityclip", "clip", "open_clip"], default="entityclip")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--markdown-out", type=Path, help="also write the report to this file")
    parser.add_argument("--json-out", type=Path, help="also write the figures to this file (for bench/run_all.py)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"Machine: {machine_summary()}", flush=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    setup = Setup(args.precision, args.attn, args.optimizer, args.compile, malloc=args.malloc, device=args.device)
    if args.variant_flops:
        report(variant_flops_report(args), args.markdown_out)
        return 0
    if args.profile:
        batch_size = args.batch_sizes[0]
        worker = training_step_worker(args.profile_model, args.profile_model, batch_size, setup, args)
        with worker:
            worker.call("timed_step")  # warm-up
            print(f"Profile of one {args.profile_model} step, batch {batch_size}, {setup.describe()}:\n")
            print(worker.call("profile", row_limit=args.profile_rows))
        return 0

    if args.gain:
        # --device, and --malloc unless the allocator is what is compared, apply to both sides.
        shared = {"device": args.device} | ({} if args.gain.startswith("malloc") else {"malloc": args.malloc})
        without, with_gain = (dataclasses.replace(gain, **shared) for gain in GAINS[args.gain])
        variants = {without.describe(): ("entityclip", without), with_gain.describe(): ("entityclip", with_gain)}
        title = f"Gain of {args.gain} on the EntityCLIP training step"
    else:
        kinds = ["clip", "entityclip"]
        if args.open_clip == "yes" or (args.open_clip == "auto" and open_clip_available()):
            kinds.append("open_clip")
        variants = {MODEL_LABELS[kind]: (kind, setup) for kind in kinds}
        title = f"Training step, {setup.describe()}"
    dtype = torch.bfloat16 if args.precision == "bf16" or args.gain == "bf16" else torch.float32
    if args.wait_idle:
        wait_for_idle_cpu(timeout=args.wait_idle)
    matmul_flops = matmul_throughput(args.matmul_size, dtype, device=args.device)
    results = {}
    for batch_size in args.batch_sizes:
        print(f"batch {batch_size}: building the models, warm-up with FLOP counting, timed steps ...", flush=True)
        results[batch_size] = measure(variants, batch_size, args)
    # Measured again after the steps: the better of the two is the machine's capability.
    if args.wait_idle:
        wait_for_idle_cpu(timeout=args.wait_idle)
    matmul_flops = max(matmul_flops, matmul_throughput(args.matmul_size, dtype, device=args.device))
    if setup.device == "cpu":
        measures = (
            "CPU s = the process's CPU time, all threads: about 2x the wall time on an idle 2-core machine, it stays "
            "put when other jobs take the cores. Peak memory = peak resident memory over the timed steps minus the "
            "resident memory before the model was built."
        )
    else:
        device_name = torch.cuda.get_device_name(torch.device(setup.device))
        measures = (
            f"One process per model on {device_name}, each step timed to its last kernel (synchronised). Peak memory "
            f"= the device's peak allocated memory over the timed steps."
        )
    header = (
        f"{title}; ViT-B/32 shapes, texts {args.text_length} tokens, explanations {args.explanation_length}; median of "
        f"{args.iterations} interleaved steps after 1 warm-up. {measures} Matmul peak of this machine ({dtype} "
        f"{args.matmul_size}^2 matmul, best of 5): {matmul_flops / 1e9:.0f} GFLOP/s."
    )
    if args.gain:
        body, all_met = gain_report(results, matmul_flops), True
    else:
        body, all_met = comparison_report(results, matmul_flops)
    text = f"{header}\n\n{body}"
    report(text, args.markdown_out)
    if args.json_out:
        args.json_out.write_text(json.dumps({str(batch): variants for batch, variants in results.items()}, indent=1))
    if not all_met:
        print("\nA target is missed (see 'targets met').")
    return 0


if __name__ == "__main__":
    sys.exit(main())
