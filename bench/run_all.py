"""Run every benchmark (training step, inference, data pipeline, retrieval at scale) and print their tables.

Each benchmark runs in its own process, one after the other (they would skew each other's timings). With
`--update-readme` the tables, the command of each and the machine they ran on replace the results section of
bench/README.md.

    python bench/run_all.py                    # ~6 minutes on 2 idle cores
    python bench/run_all.py --update-readme
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_summary, wait_for_idle_cpu

BENCH_DIR = Path(__file__).resolve().parent
README = BENCH_DIR / "README.md"
RESULTS_BEGIN = "<!-- results:begin (written by bench/run_all.py --update-readme) -->"
RESULTS_END = "<!-- results:end -->"
RETRIEVAL_README = BENCH_DIR / "README_retrieval.md"
RETRIEVAL_BEGIN = "<!-- retrieval:begin (copied from bench/README_retrieval.md by bench/run_all.py) -->"
RETRIEVAL_END = "<!-- retrieval:end -->"
# Benchmarks that take --wait-idle SECONDS.
WAIT_IDLE_SCRIPTS = ("bench_training_step.py", "bench_retrieval_metrics.py")

# (title, script, arguments, whether it writes its report with --markdown-out; otherwise its stdout is the report)
CPU_BENCHMARKS = [
    # open_clip's row joins when the `bench` extra is installed (--open-clip auto).
    ("Training step", "bench_training_step.py", [], True),
    # glibc's malloc hands big freed blocks back to the kernel and page-faults them in again every step, which costs
    # EntityCLIP's larger activations more than CLIP's: the same comparison with malloc keeping freed memory, set as
    # finetune.py sets it (entityclip_hf.allocator).
    ("Training step, malloc tuned", "bench_training_step.py", ["--malloc", "mallopt"], True),
    ("Inference", "bench_inference.py", [], True),
    ("Data pipeline", "bench_data_pipeline.py", [], True),
    ("Retrieval evaluation at scale", "bench_retrieval_metrics.py", ["--quick"], False),
]
# On a GPU: bf16 autocast (fp32 master weights), batches a GPU trains with, more timed steps (they take
# milliseconds), a torch.compile row, and the data pipeline's workers needed to feed the GPU step.
GPU_TRAINING_BATCH_SIZES = ["128", "256"]
GPU_COMMON = ["--device", "cuda", "--precision", "bf16"]
GPU_BENCHMARKS = [
    (
        "Training step (GPU, bf16)", "bench_training_step.py",
        [*GPU_COMMON, "--batch-sizes", *GPU_TRAINING_BATCH_SIZES, "--iterations", "10"], True,
    ),
    (
        "Training step (GPU, bf16, torch.compile of the encoders)", "bench_training_step.py",
        [*GPU_COMMON, "--compile", "encoders", "--batch-sizes", GPU_TRAINING_BATCH_SIZES[-1], "--iterations", "10"],
        True,
    ),
    ("Inference (GPU, bf16)", "bench_inference.py", [*GPU_COMMON, "--batch-size", "256", "--iterations", "20"], True),
    (
        "Data pipeline", "bench_data_pipeline.py",
        ["--num-samples", "2048", "--workers", "0", "1", "2", "4", "--decoders", "pil", "torchvision"], True,
    ),
    ("Retrieval evaluation at scale", "bench_retrieval_metrics.py", ["--quick"], False),
]  # fmt: skip
# flash-attn's kernels through transformers' attn_implementation="flash_attention_2", where the package is installed.
GPU_FLASH_ATTENTION = (
    "Training step (GPU, bf16, flash_attention_2)", "bench_training_step.py",
    [*GPU_COMMON, "--attn", "flash_attention_2", "--batch-sizes", GPU_TRAINING_BATCH_SIZES[-1], "--iterations", "10"],
    True,
)  # fmt: skip
# The data pipeline is compared with the EntityCLIP training step at this batch size, as measured just before.
DATA_PIPELINE_BATCH_SIZE = "32"


def benchmark_plan(cuda: bool | None = None) -> tuple[str, list[tuple[str, str, list[str], bool]], str]:
    """(device, the benchmarks to run, the training batch size the data pipeline is compared with): the GPU plan
    when CUDA is there, the CPU plan otherwise."""
    import importlib.util

    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        return "cpu", list(CPU_BENCHMARKS), DATA_PIPELINE_BATCH_SIZE
    plan = list(GPU_BENCHMARKS)
    if importlib.util.find_spec("flash_attn") is not None:
        plan.insert(2, GPU_FLASH_ATTENTION)
    return "cuda", plan, GPU_TRAINING_BATCH_SIZES[-1]


def run_benchmark(script: str, arguments: list[str], writes_markdown: bool, workdir: Path) -> tuple[str, float, int]:
    """Run one benchmark, streaming its output; returns its report, its wall time and its exit code."""
    command = [sys.executable, str(BENCH_DIR / script), *arguments]
    markdown = workdir / (Path(script).stem + ".md")
    if writes_markdown:
        command += ["--markdown-out", str(markdown)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    exit_code = process.wait()
    elapsed = time.perf_counter() - start
    if writes_markdown and markdown.exists():
        report = markdown.read_text()
    else:
        # Benchmarks without --markdown-out: their whole output is the report.
        report = "".join(lines).strip()
    return report.strip(), elapsed, exit_code


def results_section(reports: list[tuple[str, str, str, float, int]], total: float, machine: str, command: str) -> str:
    parts = [
        RESULTS_BEGIN,
        f"Last run: `{command}`, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"{total / 60:.1f} minutes in all.\n\nMachine at the start: {machine}",
    ]
    for title, command, report, elapsed, exit_code in reports:
        status = "" if exit_code == 0 else f" **(exited with code {exit_code})**"
        parts.append(f"### {title}\n\n`{command}` ({elapsed:.0f} s){status}\n\n{report}")
    parts.append(RESULTS_END)
    return "\n\n".join(parts)


def replace_block(text: str, begin: str, end: str, block: str, heading: str) -> str:
    """`text` with the part from `begin` to `end` replaced by `block` (appended, under `heading`, if absent)."""
    if begin in text and end in text:
        return text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    return text.rstrip() + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"


def update_readme(section: str | None) -> None:
    """Write the results section (None: keep it) and the retrieval helper's full-run notes into bench/README.md."""
    text = README.read_text() if README.exists() else ""
    if section is not None:
        text = replace_block(text, RESULTS_BEGIN, RESULTS_END, section, "## Last measured results")
    if RETRIEVAL_README.exists():
        # The retrieval benchmark's own write-up (its full run at 1M, which run_all does not repeat), kept in sync.
        block = f"{RETRIEVAL_BEGIN}\n\n{RETRIEVAL_README.read_text().strip()}\n\n{RETRIEVAL_END}"
        text = replace_block(text, RETRIEVAL_BEGIN, RETRIEVAL_END, block, "")
    # Written beside and renamed: an interrupted run never leaves a half-written README.
    temporary = README.with_suffix(".md.tmp")
    temporary.write_text(text)
    temporary.replace(README)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-readme", action="store_true", help="write the tables into bench/README.md")
    parser.add_argument(
        "--merge-retrieval-only",
        action="store_true",
        help="run nothing: only copy bench/README_retrieval.md into bench/README.md",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted({script for _, script, _, _ in CPU_BENCHMARKS + GPU_BENCHMARKS}),
        help="run only these benchmarks",
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: the GPU plan when CUDA is there"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on a shared machine: wait up to this long for idle cores before each benchmark and each round of "
        "timed training steps",
    )
    args = parser.parse_args(argv)
    if args.merge_retrieval_only:
        update_readme(None)
        return 0
    device, plan, pipeline_batch_size = benchmark_plan(None if args.device == "auto" else args.device == "cuda")
    machine = machine_summary()
    print(f"Machine: {machine}\nPlan: {device} ({len(plan)} benchmarks)\n", flush=True)
    reports, failed = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        training_json = Path(workdir) / "training_step.json"
        for title, script, arguments, writes_markdown in plan:
            if args.only and script not in args.only:
                continue
            extra = []  # arguments that only pass figures between benchmarks of this run
            if script == "bench_training_step.py" and not training_json.exists():
                extra = ["--json-out", str(training_json)]  # the first training bench: the plan's main one
            if script in WAIT_IDLE_SCRIPTS and args.wait_idle:
                arguments = [*arguments, "--wait-idle", f"{args.wait_idle:g}"]
            if args.wait_idle and not wait_for_idle_cpu(timeout=args.wait_idle):
                print(f"(the machine stayed busy for {args.wait_idle:g} s: running anyway)", flush=True)
            if script == "bench_data_pipeline.py" and training_json.exists():
                training = json.loads(training_json.read_text())[pipeline_batch_size]["EntityCLIPModel"]
                arguments = [
                    *arguments, "--batch-size", pipeline_batch_size,
                    "--training-samples-per-second", f"{training['samples_per_second']:.3f}",
                    "--training-source", f"EntityCLIP training step on {device}, batch {pipeline_batch_size}",
                ]  # fmt: skip
            command = shlex.join(["python", f"bench/{script}", *arguments])
            print(f"==== {title}: {command}", flush=True)
            report, elapsed, exit_code = run_benchmark(script, arguments + extra, writes_markdown, Path(workdir))
            print(f"==== {title}: {elapsed:.0f} s\n", flush=True)
            reports.append((title, command, report, elapsed, exit_code))
            if exit_code != 0:
                failed.append(script)
    total = time.perf_counter() - start
    print(f"All benchmarks: {total / 60:.1f} minutes. Machine at the end: {machine_summary()}")
    if args.update_readme:
        command = shlex.join(["python", "bench/run_all.py", *(argv if argv is not None else sys.argv[1:])])
        update_readme(results_section(reports, total, machine, command))
        print(f"Results written to {README}")
    if failed:
        print(f"Failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
