"""Steps every loader shares once its rows are read: explanation files joined onto rows, and what the joins and the
splits' images tell the `DataReport` (unused explanations, images shared by two splits).

`rows` here are columns of one split (`id`, `image`, `text`, `explanation`, `image_key`, `raw_text`, as lists).
"""

from __future__ import annotations

from .formats import SPLITS
from .report import DataReport, Issue


def images_per_file_name(read: dict[str, tuple[dict[str, list], list]]) -> dict[str, int]:
    """File name -> how many distinct images (image keys) of the loaded splits have it, for names shared by several:
    a bare-name explanation key (`1.jpg`) names none of `agency_a/1.jpg` and `agency_b/1.jpg`."""
    first_key: dict[str, str] = {}
    shared: dict[str, set[str]] = {}
    for rows, _ in read.values():
        for key in rows["image_key"]:
            name = key.rsplit("/", 1)[-1]
            known = first_key.setdefault(name, key)
            if known != key:
                shared.setdefault(name, {known}).add(key)
    return {name: len(keys) for name, keys in shared.items()}


def join_explanations(rows: dict[str, list], sources, images_per_name: dict[str, int], issues, limit) -> None:
    """Step 2: each row without its own explanation takes the first source's; ambiguous keys are reported."""
    if not sources:
        return
    explanations = rows["explanation"]
    for index, explanation in enumerate(explanations):
        if explanation is not None:
            continue
        key = rows["image_key"][index]
        name_shared_by = images_per_name.get(key.rsplit("/", 1)[-1], 1)
        problems = []
        for source in sources:
            explanation, problem = source.lookup(key, rows["raw_text"][index], rows["text"][index], name_shared_by)
            if explanation is not None:
                break
            if problem is not None:
                problems.append(problem)
        explanations[index] = explanation
        if explanation is None and problems:
            issues["ambiguous_explanation"].add(rows["id"][index], "; ".join(problems), limit)


def report_unused_explanations(report: DataReport, sources, limit: int) -> None:
    for source in sources:
        unused = source.unused()
        if unused:
            issue = report.unused_explanations.setdefault(str(source), Issue())
            for key in unused:
                issue.add(key if len(key) <= 80 else key[:77] + "...", "", limit)


def report_shared_images(report: DataReport, read: dict[str, tuple[dict[str, list], list]], limit: int) -> None:
    """Rows of a later split (validation, test) whose image file an earlier split also uses: a leak."""
    splits = [split for split in SPLITS if split in read]
    for position, first in enumerate(splits):
        first_images = set(read[first][0]["image"])
        for second in splits[position + 1 :]:
            rows = read[second][0]
            issue = Issue()
            for sample_id, image in zip(rows["id"], rows["image"], strict=True):
                if image in first_images:
                    issue.add(sample_id, image, limit)
            if issue.count:
                report.shared_images[f"{first}/{second}"] = issue


__all__ = ["images_per_file_name", "join_explanations", "report_shared_images", "report_unused_explanations"]
