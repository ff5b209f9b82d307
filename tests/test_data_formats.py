"""Loaders of the real dataset formats: miniature copies with real JPEG files -> the same columns everywhere."""

import json
import os
from pathlib import Path

import datasets
import pytest
from PIL import Image

from entityclip_hf.data import KNOWN_DATASETS, load_entity_dataset

CORE = ["id", "image", "text", "explanation"]


def write_jpeg(path: Path, colour=(200, 30, 30), size=16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format="JPEG")


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def n24news_record(image_id, caption, section="Sports"):
    return {
        "image_id": image_id,
        "headline": f"Headline of {image_id}",
        "abstract": "An abstract.",
        "caption": caption,
        "body": "A long body. " * 20,
        "section": section,
        "image_url": f"https://static01.nyt.com/images/{image_id}.jpg",
        "article_url": f"https://www.nytimes.com/{image_id}.html",
    }


@pytest.fixture
def n24news(tmp_path):
    root = tmp_path / "N24News"
    splits = {
        "train": [("5a1b", "Serena Williams wins in Melbourne."), ("5a1c", "Angela Merkel speaks in Berlin.")],
        "dev": [("6b2d", "Lionel Messi scores for Barcelona.")],
        "test": [("7c3e", "Pope Francis greets the crowd\nin St. Peter's Square.")],
    }
    for split, rows in splits.items():
        write_json(root / "news" / f"nytimes_{split}.json", [n24news_record(i, c) for i, c in rows])
        for image_id, _ in rows:
            write_jpeg(root / "imgs" / f"{image_id}.jpg")
        # Released explanations: keyed by image file name.
        write_json(
            root / "news" / f"CapDsc_mistral_{split}.json",
            {f"{image_id}.jpg": f"Explanation of {image_id}." for image_id, _ in rows},
        )
    return root


def test_n24news_columns_splits_and_explanations(n24news):
    dataset = load_entity_dataset("n24news", n24news)
    assert list(dataset) == ["train", "validation", "test"]
    assert [len(dataset[split]) for split in dataset] == [2, 1, 1]
    for split in dataset.values():
        assert split.column_names == CORE + ["section", "headline"]
        assert isinstance(split.features["image"], datasets.Image)
    row = dataset["train"][0]
    assert row["id"] == "5a1b"
    assert row["text"] == "Serena Williams wins in Melbourne."
    assert row["explanation"] == "Explanation of 5a1b."
    assert row["section"] == "Sports" and row["headline"] == "Headline of 5a1b"
    assert isinstance(row["image"], Image.Image) and row["image"].size == (16, 16)
    # The stored path is absolute: decoding does not depend on the current directory.
    path = dataset["train"].cast_column("image", datasets.Image(decode=False))[0]["image"]["path"]
    assert os.path.isabs(path) and path == str(n24news.resolve() / "imgs" / "5a1b.jpg")
    # dev is the validation split; whitespace runs (a newline) become one space.
    assert dataset["validation"][0]["explanation"] == "Explanation of 6b2d."
    assert dataset["test"][0]["text"] == "Pope Francis greets the crowd in St. Peter's Square."


def test_n24news_accepts_an_object_of_records_and_any_name_spelling(n24news, tmp_path, monkeypatch):
    records = json.loads((n24news / "news" / "nytimes_train.json").read_text())
    # An object of records keyed by image id (the id need not be repeated inside).
    as_object = {record.pop("image_id"): record for record in records}
    write_json(n24news / "news" / "nytimes_train.json", as_object)
    monkeypatch.chdir(tmp_path)
    for name in ("N24News", "n24news", "N24-News", "N4News"):
        dataset = load_entity_dataset(name, "N24News", splits=["train"])
        assert list(dataset) == ["train"]
        assert dataset["train"]["id"] == ["5a1b", "5a1c"]
        assert dataset["train"]["explanation"] == ["Explanation of 5a1b.", "Explanation of 5a1c."]


def test_unknown_name_lists_the_known_ones(tmp_path):
    # Not a layout: tried as a datasets source (a Hub id here, offline and not cached), refused naming the layouts.
    with pytest.raises(FileNotFoundError) as error:
        load_entity_dataset("coco", tmp_path)
    for name in ("n24news", "visualnews", "goodnews", "jsonl", "demo"):
        assert name in str(error.value)
    assert set(KNOWN_DATASETS) == {"n24news", "visualnews", "goodnews", "jsonl", "demo"}


def test_visualnews_relative_image_paths_and_the_authors_absolute_explanation_keys(tmp_path):
    root = tmp_path / "VisualNews"
    records = {
        "train": [
            {
                "id": 101,
                "caption": "Barack Obama waves from Air Force One.",
                "topic": "politics",
                "source": "washington_post",
                "image_path": "./washington_post/images/0376/501.jpg",
                "article_path": "./washington_post/articles/101.txt",
            },
            # Same file name, another folder: matched by its whole relative path, not by the name alone.
            {
                "id": 102,
                "caption": "Usain Bolt wins the 100 meters.",
                "topic": "sports",
                "source": "bbc",
                "image_path": "./bbc/images/0001/501.jpg",
                "article_path": "./bbc/articles/102.txt",
            },
        ],
        "val": [
            {
                "id": 201,
                "caption": "Flood waters cover Houston.",
                "topic": "weather",
                "source": "usa_today",
                "image_path": "./usa_today/images/0002/7.jpg",
                "article_path": "./usa_today/articles/201.txt",
            }
        ],
    }
    for split, rows in records.items():
        write_json(root / f"{split}.json", rows)
        for row in rows:
            write_jpeg(root / "images" / row["image_path"])
    # The released files key by the authors' absolute paths (with their doubled slash).
    write_json(
        root / "CapDsc_mistral_train.json",
        {
            "/star/someone/VisualNews/images//washington_post/images/0376/501.jpg": "Obama explanation.",
            "/star/someone/VisualNews/images//bbc/images/0001/501.jpg": "Bolt explanation.",
        },
    )
    write_json(
        root / "CapDsc_mistral_val.json",
        {"/star/someone/VisualNews/images//usa_today/images/0002/7.jpg": "Houston explanation."},
    )
    dataset = load_entity_dataset("VisualNews", root)
    assert list(dataset) == ["train", "validation"]
    train = dataset["train"]
    assert train.column_names == CORE + ["topic", "source"]
    assert train["id"] == ["101", "102"]
    assert train["explanation"] == ["Obama explanation.", "Bolt explanation."]
    assert train["topic"] == ["politics", "sports"]
    assert dataset["validation"][0]["explanation"] == "Houston explanation."
    paths = train.cast_column("image", datasets.Image(decode=False))["image"]
    assert paths[0]["path"] == str(root.resolve() / "images" / "washington_post" / "images" / "0376" / "501.jpg")


def test_visualnews_row_never_gets_the_explanation_of_another_folders_same_named_image(tmp_path):
    root = tmp_path / "VisualNews"
    rows = [
        {"id": 1, "caption": "Barack Obama waves.", "topic": "politics", "source": "washington_post",
         "image_path": "./washington_post/images/0376/501.jpg"},
        {"id": 2, "caption": "Usain Bolt wins.", "topic": "sports", "source": "bbc",
         "image_path": "./bbc/images/0001/501.jpg"},
    ]  # fmt: skip
    write_json(root / "train.json", rows)
    for row in rows:
        write_jpeg(root / "images" / row["image_path"])
    # Only the Washington Post image has an explanation; the BBC image shares its file name.
    write_json(
        root / "CapDsc_mistral_train.json",
        {"/star/someone/VisualNews/images//washington_post/images/0376/501.jpg": "Obama explanation."},
    )
    dataset, report = load_entity_dataset("visualnews", root, return_report=True)
    assert dataset["train"]["explanation"] == ["Obama explanation.", None]
    assert report.splits["train"].issues["missing_explanation"].examples[0][0] == "2", "reported, not filled in"


def test_goodnews_resized_folder_broken_list_and_corrected_explanations(tmp_path):
    root = tmp_path / "GoodNews"
    rows = {
        "train": [
            {"image_id": "5312524f38f0d81c811a1bf7_0.jpg", "captioning": "Mr. Smith\r\nin Boston.", "title": "A"},
            {"image_id": "5312524f38f0d81c811a1bf7_1.jpg", "captioning": "A broken one.", "title": "A"},
        ],
        "val": [{"image_id": "63a1_0.jpg", "captioning": "Ms. Jones in Paris.", "title": "B"}],
        "test": [{"image_id": "74b2_3.jpg", "captioning": "The Senate in session.", "title": "C"}],
    }
    for split, records in rows.items():
        write_json(root / f"new_goodnews_capim_{split}.json", records)
        for record in records:
            write_jpeg(root / "resized" / record["image_id"])
        write_json(
            root / "train_cap_individual" / f"New_Corr_CapDsc_mistral_{split}.json",
            {record["image_id"]: f"About {record['image_id']}." for record in records},
        )
    (root / "broken_images.txt").write_text("5312524f38f0d81c811a1bf7_1.jpg\n")
    dataset, report = load_entity_dataset("goodnews", root, return_report=True)
    assert [len(dataset[split]) for split in ("train", "validation", "test")] == [1, 1, 1]
    train = dataset["train"]
    assert train.column_names == CORE + ["title"]
    assert train[0]["id"] == "5312524f38f0d81c811a1bf7_0.jpg"
    assert train[0]["text"] == "Mr. Smith in Boston."
    assert train[0]["explanation"] == "About 5312524f38f0d81c811a1bf7_0.jpg."
    assert train.cast_column("image", datasets.Image(decode=False))[0]["image"]["path"].endswith(
        "resized/5312524f38f0d81c811a1bf7_0.jpg"
    )
    # The listed broken image is left out, and said so.
    assert report.splits["train"].count("broken_image") == 1
    assert report.splits["train"].issues["broken_image"].examples[0][0] == "5312524f38f0d81c811a1bf7_1.jpg"
    assert "listed in broken_images.txt: 1" in report.summary()


def test_bad_json_records_are_named_by_id_or_position(n24news):
    records = json.loads((n24news / "news" / "nytimes_train.json").read_text())
    del records[0]["caption"]
    records.append("not a record")
    records.append({"caption": "No image id."})
    write_json(n24news / "news" / "nytimes_train.json", records)
    dataset, report = load_entity_dataset("n24news", n24news, splits=["train"], return_report=True)
    assert dataset["train"]["id"] == ["5a1c"]
    assert report.splits["train"].issues["bad_record"].examples == [
        ("5a1b", "record 0: no field 'caption'"),
        ("record 2", "record is str, not an object"),
        ("record 3", "record 3: no field 'image_id'"),
    ]


def test_goodnews_without_an_image_folder_explains_the_layout(tmp_path):
    root = tmp_path / "GoodNews"
    write_json(root / "new_goodnews_capim_test.json", [{"image_id": "a_0.jpg", "captioning": "x", "title": "t"}])
    with pytest.raises(FileNotFoundError, match="images/ or resized/"):
        load_entity_dataset("goodnews", root)


def test_jsonl_inline_explanations_metadata_relative_and_absolute_images(tmp_path):
    root = tmp_path / "mine"
    write_jpeg(root / "pics" / "a.jpg")
    elsewhere = tmp_path / "elsewhere" / "b.jpg"
    write_jpeg(elsewhere)
    lines = [
        {"id": "a", "image": "pics/a.jpg", "text": "Alpha.", "explanation": "Inline.", "source": "x", "year": 2020},
        {"image": str(elsewhere), "text": "Beta.", "source": "y"},
    ]
    (root / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (root / "val.jsonl").write_text(json.dumps({"image": "pics/a.jpg", "text": "Gamma.", "lang": "en"}) + "\n")
    write_json(root / "CapDsc_mistral_train.json", {"a.jpg": "Released, loses to inline.", "b.jpg": "Released b."})
    dataset = load_entity_dataset("jsonl", root)
    train = dataset["train"]
    # Metadata columns are the union over splits, strings (non-string values as JSON text), None where absent.
    assert train.column_names == CORE + ["source", "year", "lang"]
    assert train["id"] == ["a", "train-2"]
    assert train["explanation"] == ["Inline.", "Released b."]
    assert train["year"] == ["2020", None]
    assert dataset["validation"][0]["lang"] == "en"
    assert dataset["validation"][0]["source"] is None
    assert dataset["validation"][0]["explanation"] is None


def test_explanation_caches_join_by_text(tmp_path, n24news):
    cache = n24news / "explanations" / "mistral.jsonl"
    cache.parent.mkdir()
    entries = [
        {
            "model": "m1",
            "prompt_version": "v1",
            "text": "Angela Merkel speaks in Berlin.",
            "explanation": "Old.",
            "ok": True,
            "error": None,
        },
        {
            "model": "m1",
            "prompt_version": "v1",
            "text": "Angela Merkel speaks in Berlin.",
            "explanation": "Merkel is...",
            "ok": True,
            "error": None,
        },
        {
            "model": "m2",
            "prompt_version": "v1",
            "text": "Serena Williams wins in Melbourne.",
            "explanation": "Serena is...",
            "ok": True,
            "error": None,
        },
        {
            "model": "m1",
            "prompt_version": "v1",
            "text": "Lionel Messi scores for Barcelona.",
            "explanation": None,
            "ok": False,
            "error": "timeout",
        },
    ]
    cache.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    # Without released files, "auto" finds the cache in root/explanations/ (later lines win; failures never count).
    for split in ("train", "dev", "test"):
        (n24news / "news" / f"CapDsc_mistral_{split}.json").unlink()
    dataset, report = load_entity_dataset("n24news", n24news, return_report=True)
    assert dataset["train"]["explanation"] == ["Serena is...", "Merkel is..."]
    assert dataset["validation"]["explanation"] == [None]
    assert report.explanation_sources == [str(cache)]
    # Restricted to one generator, and given as an explicit path.
    dataset = load_entity_dataset("n24news", n24news, explanations=cache, explanation_model="m1", splits=["train"])
    assert dataset["train"]["explanation"] == [None, "Merkel is..."]
    # The cache holds the text as written in the file; the loader matches it before cleaning whitespace.
    entry = {
        "model": "m1",
        "prompt_version": "v1",
        "text": "Pope Francis greets the crowd\nin St. Peter's Square.",
        "explanation": "Francis is...",
        "ok": True,
        "error": None,
    }
    with cache.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    assert load_entity_dataset("n24news", n24news, splits=["test"])["test"]["explanation"] == ["Francis is..."]


def test_explanations_none_and_explicit_released_file(n24news, tmp_path):
    dataset, report = load_entity_dataset("n24news", n24news, explanations=None, splits=["train"], return_report=True)
    assert dataset["train"]["explanation"] == [None, None]
    # Asked for none: their absence is not a problem to report.
    assert report.count("missing_explanation") == 0 and not report.has_problems
    other = tmp_path / "other.json"
    write_json(other, {"5a1c.jpg": "From another file."})
    dataset = load_entity_dataset("n24news", n24news, explanations=[other], splits=["train"])
    assert dataset["train"]["explanation"] == [None, "From another file."]
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_entity_dataset("n24news", n24news, explanations=tmp_path / "nope.json")


def test_splits_argument_and_missing_files(n24news):
    dataset = load_entity_dataset("n24news", n24news, splits=["dev"])
    assert list(dataset) == ["validation"]
    (n24news / "news" / "nytimes_test.json").unlink()
    # By default the splits present are loaded...
    assert list(load_entity_dataset("n24news", n24news)) == ["train", "validation"]
    # ...but a split asked for must exist, and the error says which file was expected.
    with pytest.raises(FileNotFoundError, match="nytimes_test.json"):
        load_entity_dataset("n24news", n24news, splits=["test"])
    with pytest.raises(ValueError, match="unknown split"):
        load_entity_dataset("n24news", n24news, splits=["holdout"])


def test_missing_root_or_image_folder_shows_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="nytimes_train.json"):
        load_entity_dataset("n24news", tmp_path / "absent")
    (tmp_path / "VisualNews").mkdir()
    with pytest.raises(FileNotFoundError, match="no image folder"):
        load_entity_dataset("visualnews", tmp_path / "VisualNews")
    (tmp_path / "VisualNews" / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="no split file"):
        load_entity_dataset("visualnews", tmp_path / "VisualNews")
