"""Bad-data accounting: what each loader found wrong, per split, with the first few offending ids."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Problems whose rows are left out of the dataset (an unusable pair), in the order the loader checks them: a row
# is counted once, under the first problem found.
EXCLUDED_PROBLEMS = ("bad_record", "empty_text", "broken_image", "missing_image", "corrupt_image")
# Problems reported but kept: the pair is still usable.
KEPT_PROBLEMS = ("duplicate_id", "missing_explanation", "ambiguous_explanation")
# What `strict=True` turns into an error. Not `broken_image` (GoodNews' own list of images to skip: leaving them
# out is the dataset's documented behaviour) nor `missing_explanation` (explanations are optional by design).
STRICT_PROBLEMS = ("bad_record", "empty_text", "missing_image", "corrupt_image", "duplicate_id")

PROBLEM_LABELS = {
    "bad_record": "bad record (required field missing or not a string)",
    "empty_text": "empty text",
    "broken_image": "listed in broken_images.txt",
    "missing_image": "missing image file",
    "corrupt_image": "unreadable image file",
    "duplicate_id": "duplicate id",
    "missing_explanation": "no explanation",
    "ambiguous_explanation": "explanation key matching several images or explanations (joined to none)",
}


def one_line(message: object) -> str:
    """An error message on one line, for the command lines: a multi-line message (an expected folder layout) has its
    lines joined with "; " (with a space only after a line ending in ":")."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    for previous, line in zip(lines, lines[1:], strict=False):  # pairs of neighbours
        text += (" " if previous.endswith(":") else "; ") + line
    return text


class DataError(ValueError):
    """Raised by ``load_entity_dataset(..., strict=True)`` when the data has problems; carries the report."""

    def __init__(self, report: DataReport):
        self.report = report
        super().__init__(
            "bad data (strict=True; pass strict=False to exclude bad rows and continue):\n" + report.summary()
        )


def _examples(issue: Issue) -> str:
    shown = "; ".join(f"{name} ({detail})" if detail else name for name, detail in issue.examples)
    return shown + (", ..." if issue.count > len(issue.examples) else "")


@dataclass
class Issue:
    """How many rows have one problem, and the first few of them as (id, detail) pairs."""

    count: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)

    def add(self, sample_id: str, detail: str, max_examples: int) -> None:
        self.count += 1
        if len(self.examples) < max_examples:
            self.examples.append((sample_id, detail))


@dataclass
class SplitReport:
    """The accounting of one split: rows read from `source`, rows kept, and each problem's count and examples."""

    split: str
    source: str
    rows_read: int = 0
    rows_kept: int = 0
    issues: dict[str, Issue] = field(default_factory=lambda: {name: Issue() for name in PROBLEM_LABELS})

    def count(self, problem: str) -> int:
        return self.issues[problem].count

    @property
    def rows_excluded(self) -> int:
        return sum(self.count(problem) for problem in EXCLUDED_PROBLEMS)


@dataclass
class DataReport:
    """What a loader found in a dataset: per split, rows read and kept, and every problem with example ids.

    `str(report)` is the printed summary; `to_dict()` is a JSON-serialisable copy (for logs of long jobs).
    """

    dataset: str
    root: str
    image_check: str
    explanation_sources: list[str] = field(default_factory=list)
    splits: dict[str, SplitReport] = field(default_factory=dict)
    # How the splits were made when the dataset has no split files (a one-file release), else None.
    split_rule: str | None = None
    # Per explanation file: how many of its entries no row took, and the first keys (or texts, for caches).
    unused_explanations: dict[str, Issue] = field(default_factory=dict)
    # Per pair of splits ("train/test"): rows of the later split whose image file the earlier split also uses
    # (as (id, image path)): the model would be evaluated on images it was trained on.
    shared_images: dict[str, Issue] = field(default_factory=dict)

    def count(self, problem: str) -> int:
        return sum(split.count(problem) for split in self.splits.values())

    @property
    def has_strict_problems(self) -> bool:
        return any(self.count(problem) for problem in STRICT_PROBLEMS)

    @property
    def has_problems(self) -> bool:
        return (
            any(self.count(problem) for problem in PROBLEM_LABELS)
            or any(issue.count for issue in self.unused_explanations.values())
            or any(issue.count for issue in self.shared_images.values())
        )

    def summary(self) -> str:
        sources = ", ".join(self.explanation_sources) if self.explanation_sources else "none"
        lines = [
            f"{self.dataset} at {self.root} (image check: {self.image_check}; explanations: {sources})",
        ]
        if self.split_rule:
            lines.append(f"  splits: {self.split_rule}")
        for split in self.splits.values():
            lines.append(f"  {split.split}: {split.rows_kept} kept of {split.rows_read} rows read from {split.source}")
            for problem in EXCLUDED_PROBLEMS + KEPT_PROBLEMS:
                issue = split.issues[problem]
                if not issue.count:
                    continue
                action = "excluded" if problem in EXCLUDED_PROBLEMS else "kept"
                lines.append(f"    {action}, {PROBLEM_LABELS[problem]}: {issue.count} (e.g. {_examples(issue)})")
        for pair, issue in self.shared_images.items():
            if issue.count:
                first, second = pair.split("/")
                lines.append(
                    f"  images shared by {first} and {second}: {issue.count} {second} row(s) (e.g. {_examples(issue)})"
                )
        for source, issue in self.unused_explanations.items():
            if issue.count:
                lines.append(f"  explanations no row uses: {issue.count} in {source} (e.g. {_examples(issue)})")
        return "\n".join(lines)

    __str__ = summary

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = [
    "EXCLUDED_PROBLEMS",
    "KEPT_PROBLEMS",
    "STRICT_PROBLEMS",
    "DataError",
    "DataReport",
    "Issue",
    "SplitReport",
    "one_line",
]
