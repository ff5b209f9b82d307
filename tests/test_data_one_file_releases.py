"""Releases without split files: VisualNews' official origin/data.json and N24News as its own build script writes it."""

import json
from pathlib import Path

import pytest
from PIL import Image

from entityclip_hf.data import load_entity_dataset
from entityclip_hf.data.formats import hashed_split

NUM_RECORDS = 60


def write_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (90, 90, 200)).save(path, format="JPEG")


def visualnews_origin(root: Path) -> list[dict]:
    sources = ("bbc", "guardian", "usa_today", "washington_post")
    records = [
        {"id": 1000 + index, "caption": f"Story number {index}.", "topic": "world", "source": sources[index % 4],
         "image_path": f"./{sources[index % 4]}/images/{index // 4:04d}/{index}.jpg",
         "article_path": f"./{sources[index % 4]}/articles/{1000 + index}.txt"}
        for index in range(NUM_RECORDS)
    ]  # fmt: skip
    (root / "origin").mkdir(parents=True)
    (root / "origin" / "data.json").write_text(json.dumps(records))
    for record in records:
        write_jpeg(root / "origin" / record["image_path"])
    return records


def n24news_built_by_its_script(root: Path) -> list[dict]:
    records = [
        {"image_id": f"{index:06x}", "caption": f"Caption {index}.", "headline": f"H{index}", "section": "Arts",
         "abstract": "", "body": "", "image_url": "", "article_url": ""}
        for index in range(NUM_RECORDS)
    ]  # fmt: skip
    root.mkdir(parents=True)
    (root / "nytimes_dataset_full.json").write_text(json.dumps(records))
    for record in records:
        write_jpeg(root / "images" / f"{record['image_id']}.jpg")
    return records


@pytest.mark.parametrize(
    ("name", "build", "id_field", "shares"),
    [
        ("visualnews", visualnews_origin, "id", (5.0, 5.0)),
        ("n24news", n24news_built_by_its_script, "image_id", (10.0, 10.0)),
    ],
)
def test_a_one_file_release_is_split_by_a_hash_of_the_id(tmp_path, name, build, id_field, shares):
    root = tmp_path / name
    records = build(root)
    dataset, report = load_entity_dataset(name, root, return_report=True)
    ids = {split: set(dataset[split]["id"]) for split in dataset}
    assert sum(len(split_ids) for split_ids in ids.values()) == NUM_RECORDS, "every record in exactly one split"
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids.get("validation", set()))
    for record in records:
        sample_id = str(record[id_field])
        assert sample_id in ids[hashed_split(sample_id, *shares)], "the documented rule, nothing else"
    assert len(ids["train"]) > len(ids["test"]) > 0
    assert report.split_rule is not None and "hashed from its id" in str(report)
    assert not report.count("missing_image"), "image paths resolved in the release's own layout"
    # Deterministic: a second load with the records in another order gives the same splits.
    (tmp_path / "again").mkdir()
    again = tmp_path / "again" / name
    build(again)
    full_file = next(again.rglob("*.json"))
    full_file.write_text(json.dumps(list(reversed(json.loads(full_file.read_text())))))
    reloaded = load_entity_dataset(name, again)
    assert {split: set(reloaded[split]["id"]) for split in reloaded} == ids
    # One split asked for: only its records.
    test_only = load_entity_dataset(name, root, splits=["test"])
    assert set(test_only["test"]["id"]) == ids["test"]


def test_one_file_release_joins_explanations_of_every_released_split_file(tmp_path):
    root = tmp_path / "n24news"
    records = n24news_built_by_its_script(root)
    # The authors' files follow their own split; ours is another, so every file applies to every split.
    half = len(records) // 2
    (root / "news").mkdir()
    (root / "news" / "CapDsc_mistral_train.json").write_text(
        json.dumps({f"{r['image_id']}.jpg": f"About {r['image_id']}." for r in records[:half]})
    )
    (root / "news" / "CapDsc_mistral_test.json").write_text(
        json.dumps({f"{r['image_id']}.jpg": f"About {r['image_id']}." for r in records[half:]})
    )
    dataset, report = load_entity_dataset("n24news", root, return_report=True)
    for split in dataset:
        assert all(
            explanation == f"About {i}."
            for i, explanation in zip(dataset[split]["id"], dataset[split]["explanation"], strict=True)
        )
    assert report.count("missing_explanation") == 0 and not report.unused_explanations


def test_split_files_win_over_a_one_file_release(tmp_path):
    root = tmp_path / "n24news"
    n24news_built_by_its_script(root)
    (root / "news").mkdir()
    (root / "news" / "nytimes_test.json").write_text(json.dumps([{"image_id": "000001", "caption": "Only one."}]))
    dataset, report = load_entity_dataset("n24news", root, return_report=True)
    assert list(dataset) == ["test"] and dataset["test"]["id"] == ["000001"] and report.split_rule is None


def test_no_split_file_and_no_release_file_shows_both_layouts(tmp_path):
    root = tmp_path / "visualnews"
    (root / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"(?s)no split file.*origin/data.json"):
        load_entity_dataset("visualnews", root)
    with pytest.raises(FileNotFoundError, match=r"no image folder .*images and no .*origin/data.json"):
        load_entity_dataset("visualnews", tmp_path)


def test_hashed_split_shares():
    counts = {"train": 0, "validation": 0, "test": 0}
    for index in range(20000):
        counts[hashed_split(str(index), 10.0, 10.0)] += 1
    assert 0.78 < counts["train"] / 20000 < 0.82 and 0.09 < counts["test"] / 20000 < 0.11
    assert hashed_split("abc", 10.0, 10.0) == hashed_split("abc", 10.0, 10.0)
