"""Statistics and tables of an ablation: arms (training configurations) x seeds, compared with a baseline arm.

    results = {"plain": {0: {"R@1": 40.0}, 1: {...}}, "entityclip": {0: {...}, 1: {...}}}   # arm -> seed -> metrics
    print(comparison_table(results, metrics=["R@1", "rsum"], baseline="plain"))

A difference between arms is reported PAIRED over seeds (arm - baseline on the same seed, then mean +- std over
seeds), since a seed fixes the data order and initialisation of the new layers for both arms: the paired spread is
what the seed-to-seed noise of the difference is, and far smaller than the spread of either arm alone. Used by
`examples/ablate.py` and `bench/bench_efficacy.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["comparison_table", "mean_std", "paired_differences", "summarize_arms"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and SAMPLE standard deviation (n - 1; 0.0 for a single value) of `values`."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value.")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_differences(arm: Mapping, baseline: Mapping, metric: str) -> list[float]:
    """`arm[seed][metric] - baseline[seed][metric]` for every seed both arms have, in seed order."""
    seeds = sorted(set(arm) & set(baseline), key=str)
    if not seeds:
        raise ValueError(f"no seed in common between the arm ({sorted(arm)}) and the baseline ({sorted(baseline)}).")
    return [float(arm[seed][metric]) - float(baseline[seed][metric]) for seed in seeds]


def summarize_arms(results: Mapping[str, Mapping], metrics: Sequence[str], baseline: str | None = None) -> dict:
    """Per arm and metric: `{"mean", "std", "n"}` and, against `baseline`, `{"diff_mean", "diff_std", "clear"}`,
    where `clear` means the paired difference's mean exceeds twice its spread (and the spread is over >= 2 seeds)."""
    summary = {}
    for arm, by_seed in results.items():
        summary[arm] = {}
        for metric in metrics:
            values = [by_seed[seed][metric] for seed in sorted(by_seed, key=str) if metric in by_seed[seed]]
            if not values:
                continue
            mean, std = mean_std(values)
            entry = {"mean": mean, "std": std, "n": len(values)}
            baseline_has_it = baseline in results and all(metric in row for row in results[baseline].values())
            if baseline is not None and arm != baseline and baseline_has_it:
                diffs = paired_differences(by_seed, results[baseline], metric)
                diff_mean, diff_std = mean_std(diffs)
                entry.update(
                    diff_mean=diff_mean, diff_std=diff_std, clear=len(diffs) >= 2 and abs(diff_mean) > 2 * diff_std
                )
            summary[arm][metric] = entry
    return summary


def comparison_table(
    results: Mapping[str, Mapping],
    metrics: Sequence[str],
    baseline: str | None = None,
    digits: int = 1,
    labels: Mapping[str, str] | None = None,
) -> str:
    """A Markdown table: one row per arm, per metric `mean +- std` over seeds and, for every arm but the baseline,
    the paired difference to the baseline `+d +- s` (bold when its mean exceeds twice its spread)."""
    summary = summarize_arms(results, metrics, baseline)
    labels = labels or {}
    header = ["arm", "seeds"] + [
        column for metric in metrics for column in ([metric] + ([f"Δ {metric}"] if baseline else []))
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in results:
        row = [labels.get(arm, arm), str(len(results[arm]))]
        for metric in metrics:
            entry = summary[arm].get(metric)
            if entry is None:
                row += ["-"] + (["-"] if baseline else [])
                continue
            row.append(f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}")
            if baseline:
                if "diff_mean" not in entry:
                    row.append("(baseline)" if arm == baseline else "-")
                else:
                    cell = f"{entry['diff_mean']:+.{digits}f} ± {entry['diff_std']:.{digits}f}"
                    row.append(f"**{cell}**" if entry["clear"] else cell)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
