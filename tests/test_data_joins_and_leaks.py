"""Explanation joins that could hand a row another image's explanation, unused explanations, images in two splits."""

import json
import logging
from pathlib import Path

from PIL import Image

from entityclip_hf.data import load_entity_dataset


def write_jpeg(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path, format="JPEG")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def test_a_bare_name_key_matching_images_in_several_folders_joins_none_and_is_reported(tmp_path):
    root = tmp_path / "mine"
    for image in ("pics/agency_a/1.jpg", "pics/agency_b/1.jpg", "pics/agency_a/2.jpg"):
        write_jpeg(root / image)
    write_jsonl(
        root / "train.jsonl",
        [
            {"id": "a1", "image": "pics/agency_a/1.jpg", "text": "A protest in Lyon."},
            {"id": "a2", "image": "pics/agency_a/2.jpg", "text": "A parade in Nice."},
        ],
    )
    write_jsonl(root / "test.jsonl", [{"id": "b1", "image": "pics/agency_b/1.jpg", "text": "A storm in Brest."}])
    (root / "explanations").mkdir()
    (root / "explanations" / "mine.json").write_text(json.dumps({"1.jpg": "Lyon.", "2.jpg": "Nice."}))
    dataset, report = load_entity_dataset(
        "jsonl", root, explanations=[root / "explanations" / "mine.json"], return_report=True
    )
    # 2.jpg names one image: joined. 1.jpg names two (in two splits, even): neither gets it.
    assert dataset["train"]["explanation"] == [None, "Nice."]
    assert dataset["test"]["explanation"] == [None]
    for split, sample_id in (("train", "a1"), ("test", "b1")):
        issue = report.splits[split].issues["ambiguous_explanation"]
        assert issue.count == 1 and issue.examples[0][0] == sample_id
        assert "key '1.jpg' names no folder, and 2 images are called so" in issue.examples[0][1]
        assert "mine.json" in issue.examples[0][1]
    assert "explanation key matching several images or explanations (joined to none): 1 (e.g. a1" in str(report)
    assert report.unused_explanations[str(root / "explanations" / "mine.json")].examples == [("1.jpg", "")]


def test_visualnews_bare_name_shared_by_three_folders(tmp_path):
    root = tmp_path / "VisualNews"
    sources = ("bbc", "guardian", "usa_today")
    records = [
        {"id": index, "caption": f"Story {index}.", "topic": "t", "source": source,
         "image_path": f"./{source}/images/0001/501.jpg"}
        for index, source in enumerate(sources)
    ]  # fmt: skip
    (root).mkdir()
    (root / "train.json").write_text(json.dumps(records))
    for record in records:
        write_jpeg(root / "images" / record["image_path"])
    (root / "CapDsc_mistral_train.json").write_text(json.dumps({"501.jpg": "Whose?"}))
    dataset, report = load_entity_dataset("visualnews", root, return_report=True)
    assert dataset["train"]["explanation"] == [None, None, None]
    issue = report.splits["train"].issues["ambiguous_explanation"]
    assert issue.count == 3 and "3 images are called so" in issue.examples[0][1]


def test_keys_ending_alike_with_different_explanations_are_reported(tmp_path):
    root = tmp_path / "mine"
    write_jpeg(root / "1.jpg")
    write_jsonl(root / "train.jsonl", [{"id": "x", "image": "1.jpg", "text": "Who is this?"}])
    (root / "CapDsc_mistral_train.json").write_text(json.dumps({"/a/1.jpg": "First.", "/b/1.jpg": "Second."}))
    dataset, report = load_entity_dataset("jsonl", root, return_report=True)
    assert dataset["train"]["explanation"] == [None]
    detail = report.splits["train"].issues["ambiguous_explanation"].examples[0][1]
    assert "keys with different explanations end with '1.jpg'" in detail


def test_explanations_no_row_uses_are_reported_with_their_first_keys(tmp_path, caplog):
    root = tmp_path / "mine"
    write_jpeg(root / "img" / "a.jpg")
    write_jsonl(root / "train.jsonl", [{"id": "a", "image": "img/a.jpg", "text": "Alpha."}])
    released = {"a.jpg": "About a.", "gone1.jpg": "Nobody.", "gone2.jpg": "Nobody either."}
    (root / "CapDsc_mistral_train.json").write_text(json.dumps(released))
    with caplog.at_level(logging.WARNING, logger="entityclip_hf.data"):
        dataset, report = load_entity_dataset("jsonl", root, max_examples=1, return_report=True)
    assert dataset["train"]["explanation"] == ["About a."]
    issue = report.unused_explanations[str(root.resolve() / "CapDsc_mistral_train.json")]
    assert issue.count == 2 and issue.examples == [("gone1.jpg", "")], "count of all, first keys only"
    assert "explanations no row uses: 2 in" in caplog.text and "gone1.jpg" in caplog.text
    assert json.loads(json.dumps(report.to_dict()))["unused_explanations"]


def test_cache_entries_no_row_uses_are_reported(tmp_path):
    root = tmp_path / "mine"
    write_jpeg(root / "img" / "a.jpg")
    write_jsonl(root / "train.jsonl", [{"id": "a", "image": "img/a.jpg", "text": "Alpha."}])
    cache = root / "explanations" / "cache.jsonl"
    base = {"model": "m", "prompt_version": "v1", "ok": True, "error": None}
    write_jsonl(
        cache, [{**base, "text": "Alpha.", "explanation": "A."}, {**base, "text": "Beta.", "explanation": "B."}]
    )
    dataset, report = load_entity_dataset("jsonl", root, return_report=True)
    assert dataset["train"]["explanation"] == ["A."]
    assert report.unused_explanations[str(cache)].examples == [("Beta.", "")]


def test_images_shared_between_splits_are_reported(tmp_path, caplog):
    root = tmp_path / "mine"
    for name in ("a", "b", "c"):
        write_jpeg(root / "img" / f"{name}.jpg")
    write_jsonl(
        root / "train.jsonl",
        [{"id": "t1", "image": "img/a.jpg", "text": "Alpha."}, {"id": "t2", "image": "img/b.jpg", "text": "Beta."}],
    )
    write_jsonl(root / "val.jsonl", [{"id": "v1", "image": "img/b.jpg", "text": "Beta again."}])
    write_jsonl(
        root / "test.jsonl",
        [{"id": "s1", "image": "img/a.jpg", "text": "Alpha again."}, {"id": "s2", "image": "img/c.jpg", "text": "C."}],
    )
    with caplog.at_level(logging.WARNING, logger="entityclip_hf.data"):
        dataset, report = load_entity_dataset("jsonl", root, return_report=True)
    assert len(dataset["test"]) == 2, "reported, not removed: the user decides"
    assert set(report.shared_images) == {"train/validation", "train/test"}
    test_leak = report.shared_images["train/test"]
    assert test_leak.count == 1 and test_leak.examples[0] == ("s1", str((root / "img" / "a.jpg").resolve()))
    assert report.shared_images["train/validation"].examples[0][0] == "v1"
    assert "images shared by train and test: 1 test row(s) (e.g. s1" in caplog.text
    assert report.has_problems
