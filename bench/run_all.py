"""Run every benchmark (training step, inference, data pipeline, retrieval at scale) and print their tables.

Each benchmark runs in its own process, one after the other (they would skew each other's timings). With
`--update-readme` the tables, the command of each and the machine they ran on replace the results section of
bench/README.md.

    python bench/run_all.py                    # ~8 minutes on 2 cores
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

# (title, script, arguments, whether it writes its report with --markdown-out; otherwise its stdout is the report)
BENCHMARKS = [
    ("Training step", "bench_training_step.py", [], True),
    ("Inference", "bench_inference.py", [], True),
    ("Data pipeline", "bench_data_pipeline.py", [], True),
    ("Retrieval evaluation at scale", "bench_retrieval_metrics.py", ["--quick"], False),
]
# The data pipeline is compared with the EntityCLIP training step at its batch size (32), as measured just before.
DATA_PIPELINE_BATCH_SIZE = "32"


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


def update_readme(section: str) -> None:
    text = README.read_text() if README.exists() else ""
    if RESULTS_BEGIN in text and RESULTS_END in text:
        before = text[: text.index(RESULTS_BEGIN)]
        after = text[text.index(RESULTS_END) + len(RESULTS_END) :]
        text = before + section + after
    else:
        text = text.rstrip() + "\n\n## Last measured results\n\n" + section + "\n"
    # Written beside and renamed: an interrupted run never leaves a half-written README.
    temporary = README.with_suffix(".md.tmp")
    temporary.write_text(text)
    temporary.replace(README)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-readme", action="store_true", help="write the tables into bench/README.md")
    parser.add_argument(
        "--only", nargs="+", choices=[script for _, script, _, _ in BENCHMARKS], help="run only these benchmarks"
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
    machine = machine_summary()
    print(f"Machine: {machine}\n", flush=True)
    reports, failed = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        training_json = Path(workdir) / "training_step.json"
        for title, script, arguments, writes_markdown in BENCHMARKS:
            if args.only and script not in args.only:
                continue
            extra = []  # arguments that only pass figures between benchmarks of this run
            if script == "bench_training_step.py":
                extra = ["--json-out", str(training_json)]
                if args.wait_idle:
                    arguments = [*arguments, "--wait-idle", f"{args.wait_idle:g}"]
            if args.wait_idle and not wait_for_idle_cpu(timeout=args.wait_idle):
                print(f"(the machine stayed busy for {args.wait_idle:g} s: running anyway)", flush=True)
            if script == "bench_data_pipeline.py" and training_json.exists():
                training = json.loads(training_json.read_text())[DATA_PIPELINE_BATCH_SIZE]["EntityCLIPModel"]
                arguments = [*arguments, "--training-samples-per-second", f"{training['samples_per_second']:.3f}"]
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
