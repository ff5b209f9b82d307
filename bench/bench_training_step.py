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
import math
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
    peak_resident_memory_bytes,
    random_batch,
    report,
    reset_peak_resident_memory,
    timed_wall_and_cpu,
    vit_b32_clip_config,
    wait_for_idle_cpu,
)
from transformers import CLIPModel

# The targets for EntityCLIP / CLIP.
MAX_FLOP_RATIO = 2.2
MAX_TIME_OVER_FLOP_RATIO = 1.15
MAX_MEMORY_RATIO = 2.0


@dataclasses.dataclass(frozen=True)
class Setup:
    """How a step runs: the options whose gains docs/performance.md reports."""

    precision: str = "fp32"  # "bf16": forward under bf16 autocast (fp32 master weights)
    attn: str = "sdpa"  # CLIP's attention implementation: "sdpa" or "eager"
    optimizer: str = "fused"  # AdamW kernel: "fused", "foreach" or "for-loop"
    compile: str = "none"  # torch.compile "encoders" (CLIP's vision and text encoders) or the whole "model"
    text_padding: int | None = None  # pad the texts to this many tokens (77 = padding="max_length"); None: none
    malloc: str = "default"  # "tuned": glibc's malloc keeps freed memory instead of returning it (MALLOC_TUNED)

    def describe(self) -> str:
        parts = [self.precision, f"attention {self.attn}", f"AdamW {self.optimizer}"]
        if self.compile != "none":
            parts.append(f"torch.compile {self.compile}")
        if self.text_padding:
            parts.append(f"texts padded to {self.text_padding}")
        if self.malloc != "default":
            parts.append(f"malloc {self.malloc}")
        return ", ".join(parts)

    def worker_env(self) -> dict[str, str] | None:
        return MALLOC_TUNED if self.malloc == "tuned" else None


# glibc returns freed memory of >= 32 MiB blocks (mmap) and of the heap's top (trim) to the kernel; a training step
# then page-faults the same gigabytes back in, zeroed, every step. A fixed mmap threshold at its maximum and a trim
# threshold above any heap size keep it. (jemalloc or tcmalloc through LD_PRELOAD do the same, when installed.)
MALLOC_TUNED = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=68719476736"}


# `--gain NAME`: the EntityCLIP step without (first) and with (second) one speed-up, everything else the default.
GAINS = {
    "bf16": (Setup(precision="fp32"), Setup(precision="bf16")),
    "sdpa": (Setup(attn="eager"), Setup(attn="sdpa")),
    "fused-adamw": (Setup(optimizer="foreach"), Setup(optimizer="fused")),
    "compile": (Setup(compile="none"), Setup(compile="encoders")),
    "compile-model": (Setup(compile="none"), Setup(compile="model")),
    "dynamic-padding": (Setup(text_padding=77), Setup(text_padding=None)),
    "malloc": (Setup(malloc="default"), Setup(malloc="tuned")),
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


def pad_texts(batch: dict[str, torch.Tensor], length: int, pad_token_id: int) -> None:
    """Pad `input_ids` / `attention_mask` to `length` in place, as a processor with padding="max_length" would."""
    extra = length - batch["input_ids"].shape[1]
    if extra > 0:
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_token_id)
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0)


class TrainingStep:
    """One model, its AdamW optimizer and a fixed batch; `step()` runs one full training step."""

    def __init__(
        self, kind: str, batch_size: int, text_length: int, explanation_length: int, setup: Setup, seed: int,
        fields: dict | None = None,
    ):  # fmt: skip
        config = vit_b32_clip_config(setup.attn)
        torch.manual_seed(seed)
        clip = CLIPModel(config)
        if kind == "clip":
            self.model = clip
            self.batch = random_batch(batch_size, text_length, None, seed=seed)
        elif kind == "entityclip":
            from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

            self.model = EntityCLIPModel(EntityCLIPConfig(clip_config=config, **(fields or {})))
            # The same backbone as the CLIP baseline: its weights, copied.
            self.model.clip.load_state_dict(clip.state_dict())
            del clip
            self.batch = random_batch(batch_size, text_length, explanation_length, seed=seed)
        else:
            raise ValueError(f"unknown model kind {kind!r}")
        if setup.text_padding:
            pad_texts(self.batch, setup.text_padding, config.text_config.pad_token_id)
        self.model.train()
        self.clip = self.model if kind == "clip" else self.model.clip
        if setup.compile == "encoders":
            # EntityCLIP's own code has data-dependent shapes (which samples have an explanation, the negatives
            # drawn each step) that break a whole-model graph; the encoders are where the time goes.
            self.clip.vision_model.compile()
            self.clip.text_model.compile()
        elif setup.compile == "model":
            # torch 2.13's AOTAutograd cache replays aliased outputs with garbage shapes from a warm cache: CLIPModel
            # returns logits_per_text as a view of logits_per_image (EntityCLIP returns a contiguous copy).
            torch._functorch.config.enable_autograd_cache = False
            self.model.compile()
        optimizer_flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-5, weight_decay=0.2, **optimizer_flags[setup.optimizer]
        )
        self.autocast = setup.precision == "bf16"
        self.compiled = setup.compile != "none"

    def forward_loss(self) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(**self.batch, return_loss=True).loss

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Both models clamp the temperature, as open_clip and EntityCLIP's training do.
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, math.log(100))

    def step(self) -> None:
        self.forward_loss().backward()
        self.optimizer_step()

    def warmup_flops(self) -> int:
        """The untimed warm-up (optimizer state, kernel caches, compilation), with the FLOPs of a step counted."""
        if self.compiled:
            # Compiled kernels are invisible to FlopCounterMode: compile first, then count an eager step.
            self.step()
            with torch.compiler.set_stance("force_eager"):
                return count_flops(self.step)
        return count_flops(self.step)

    def timed_step(self) -> tuple[float, float]:
        """Wall-clock and CPU seconds of one step."""
        return timed_wall_and_cpu(self.step)

    def reset_peak_memory(self) -> bool:
        return reset_peak_resident_memory()

    def peak_memory(self) -> int:
        return peak_resident_memory_bytes()

    def backbone_checksum(self) -> float:
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.clip.parameters()))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def profile(self, row_limit: int) -> str:
        return profile_step(self, row_limit)


class ComponentHooks:
    """Runs a context (`make_context(label)`) around each forward call of the named sub-modules.

    Calls are numbered per module: EntityCLIP's `clip.text_model` runs twice, #1 on the texts, #2 on the
    explanations.
    """

    def __init__(self, runner: TrainingStep, make_context):
        self.make_context = make_context
        self.open_contexts, self.calls, self.handles = [], {}, []
        names = ["clip.vision_model", "clip.text_model", "vision_experts", "text_experts", "shared_experts"]
        for name in names:
            owner, _, attribute = name.rpartition(".")
            module = getattr(runner.clip if owner else runner.model, attribute, None)
            if module is not None:
                self.handles.append(module.register_forward_pre_hook(lambda module, args, name=name: self._enter(name)))
                self.handles.append(module.register_forward_hook(lambda module, args, output: self._leave()))

    def _enter(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        context = self.make_context(f"forward: {name} #{self.calls[name]}")
        context.__enter__()
        self.open_contexts.append(context)

    def _leave(self) -> None:
        self.open_contexts.pop().__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()


def profile_step(runner: TrainingStep, row_limit: int) -> str:
    """Where one step goes: time per phase and per forward component (torch.profiler), forward FLOPs per component
    (FlopCounterMode), then the operators by self time."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from torch.utils.flop_counter import FlopCounterMode

    with ComponentHooks(runner, record_function), profile(activities=[ProfilerActivity.CPU]) as profiler:
        with record_function("step: forward"):
            loss = runner.forward_loss()
        with record_function("step: backward"):
            loss.backward()
        with record_function("step: optimizer"):
            runner.optimizer_step()
    events = profiler.key_averages()
    labelled = {event.key: event for event in events if event.key.startswith(("step: ", "forward: "))}
    step_time = sum(event.cpu_time_total for key, event in labelled.items() if key.startswith("step: "))

    # Forward FLOPs of each component, in a separate untimed forward pass (counting slows the ops down).
    counters: dict[str, FlopCounterMode] = {}

    def counter(label: str) -> FlopCounterMode:
        counters[label] = FlopCounterMode(display=False)
        return counters[label]

    with torch.no_grad(), ComponentHooks(runner, counter), FlopCounterMode(display=False) as whole:
        runner.forward_loss()
    forward_flops = whole.get_total_flops()
    times = {key: event.cpu_time_total / 1e6 for key, event in labelled.items()}
    flops = {key: counter.get_total_flops() for key, counter in counters.items()}
    flops["step: forward"] = forward_flops
    # What the hooks do not see: the experts' keys/values (computed outside their forward), the gates, the ITM head,
    # projections and losses.
    components = [key for key in times if key.startswith("forward: ")]
    rest = "forward: the rest (expert keys/values, gates, ITM head, losses)"
    times[rest] = times["step: forward"] - sum(times[key] for key in components)
    flops[rest] = forward_flops - sum(flops.get(key, 0) for key in components)
    rows = [
        [
            key,
            seconds,
            f"{100 * seconds / (step_time / 1e6):.1f}%",
            f"{flops[key] / 1e9:.1f}" if key in flops else "",
            f"{100 * flops[key] / forward_flops:.1f}%" if key in flops else "",
        ]
        for key, seconds in sorted(times.items(), key=lambda item: -item[1])
    ]
    component_table = format_table(
        ["phase / forward component", "CPU time (s)", "share of step", "forward GFLOP", "share of forward FLOPs"], rows
    )
    operator_table = events.table(sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=40)
    return component_table + "\n\n" + operator_table


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
        checksums = {worker.call("backbone_checksum") for worker in workers}
        if len(checksums) != 1:
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
            # process's peak resident memory over the timed steps, minus its resident memory before the model.
            "memory": peaks[label] - build[label]["baseline_rss"],
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
    """The figures of CLIP and EntityCLIP, the EntityCLIP / CLIP ratios, and whether every target is met."""
    rows, ratio_rows, all_met = [], [], True
    for batch_size, models in results.items():
        rows += [figures_row(batch_size, label, figures, matmul_flops) for label, figures in models.items()]
        clip, entity = models["CLIPModel"], models["EntityCLIPModel"]
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
    return f"{format_table(FIGURE_HEADERS, rows)}\n\nEntityCLIP / CLIP:\n\n{ratios}", all_met


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
                ]
            )
    return format_table(FIGURE_HEADERS + ["speed-up", "CPU-time speed-up", "memory vs first"], rows)


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
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="CLIP's attention implementation")
    parser.add_argument("--optimizer", choices=["fused", "foreach", "for-loop"], default="fused", help="AdamW kernel")
    parser.add_argument(
        "--compile", choices=["none", "encoders", "model"], default="none", help="torch.compile (in the warm-up step)"
    )
    parser.add_argument(
        "--malloc", choices=["default", "tuned"], default="default", help="glibc malloc settings of the workers"
    )
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
    parser.add_argument("--profile-model", choices=["entityclip", "clip"], default="entityclip")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--markdown-out", type=Path, help="also write the report to this file")
    parser.add_argument("--json-out", type=Path, help="also write the figures to this file (for bench/run_all.py)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"Machine: {machine_summary()}", flush=True)
    setup = Setup(args.precision, args.attn, args.optimizer, args.compile, malloc=args.malloc)
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
        without, with_gain = GAINS[args.gain]
        variants = {without.describe(): ("entityclip", without), with_gain.describe(): ("entityclip", with_gain)}
        title = f"Gain of {args.gain} on the EntityCLIP training step"
    else:
        variants = {"CLIPModel": ("clip", setup), "EntityCLIPModel": ("entityclip", setup)}
        title = f"Training step, {setup.describe()}"
    dtype = torch.bfloat16 if args.precision == "bf16" or args.gain == "bf16" else torch.float32
    if args.wait_idle:
        wait_for_idle_cpu(timeout=args.wait_idle)
    matmul_flops = matmul_throughput(args.matmul_size, dtype)
    results = {}
    for batch_size in args.batch_sizes:
        print(f"batch {batch_size}: building the models, warm-up with FLOP counting, timed steps ...", flush=True)
        results[batch_size] = measure(variants, batch_size, args)
    # Measured again after the steps: the better of the two is the machine's capability.
    if args.wait_idle:
        wait_for_idle_cpu(timeout=args.wait_idle)
    matmul_flops = max(matmul_flops, matmul_throughput(args.matmul_size, dtype))
    header = (
        f"{title}; ViT-B/32 shapes, texts {args.text_length} tokens, explanations {args.explanation_length}; median of "
        f"{args.iterations} interleaved steps after 1 warm-up. CPU s = the process's CPU time, all threads: about "
        f"2x the wall time on an idle 2-core machine, it stays put when other jobs take the cores. Peak memory = "
        f"peak resident memory over the timed steps minus the resident memory before the model was built. Matmul "
        f"peak of this machine ({dtype} {args.matmul_size}^2 matmul, best of 5): {matmul_flops / 1e9:.0f} GFLOP/s."
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
