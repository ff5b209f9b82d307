"""Any `datasets` source: parquet / arrow / csv / json folders, save_to_disk folders, webdataset shards and a Hub id
(offline, from the datasets cache) load with the file layouts' columns, column mapping, bad-data report and joins."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import datasets
import pytest
from PIL import Image

from entityclip_hf.data import load_entity_dataset
from entityclip_hf.data.sources import ColumnMapping, open_source_stream


def jpeg_bytes(colour=(200, 40, 40), size=12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


# Rows as a user's table holds them, under its own column names: uid, img (encoded bytes), caption.
GOOD = [(f"pair-{index}", jpeg_bytes((20 * index, 90, 160)), f"Person {index} visits Rome.") for index in range(4)]


def user_table(extra_bad: bool = True) -> datasets.Dataset:
    rows = list(GOOD)
    if extra_bad:
        rows += [
            ("blank", jpeg_bytes(), "   "),
            ("garbage", b"not an image", "A caption."),
            ("pair-0", jpeg_bytes(), "Dup."),
        ]
    features = datasets.Features(
        {"uid": datasets.Value("string"), "img": datasets.Image(), "caption": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(
        {
            "uid": [r[0] for r in rows],
            "img": [{"bytes": r[1], "path": None} for r in rows],
            "caption": [r[2] for r in rows],
        },
        features=features,
    )


MAPPING = ColumnMapping(image="img", text="caption", id="uid")


def check_user_table(dataset: datasets.DatasetDict, report) -> None:
    train = dataset["train"]
    assert {"id", "image", "text", "explanation"} <= set(train.column_names)
    assert train["id"] == ["pair-0", "pair-1", "pair-2", "pair-3", "pair-0"]
    assert train["text"][1] == "Person 1 visits Rome."
    assert isinstance(train[0]["image"], Image.Image) and train[0]["image"].size == (12, 12)  # decoded on access
    split = report.splits["train"]
    assert (split.rows_read, split.rows_kept) == (7, 5)
    assert split.count("empty_text") == 1 and split.issues["empty_text"].examples[0][0] == "blank"
    assert split.count("corrupt_image") == 1 and split.issues["corrupt_image"].examples[0][0] == "garbage"
    assert split.count("duplicate_id") == 1


@pytest.mark.parametrize("kind", ["parquet", "arrow", "save_to_disk"])
def test_table_folders_with_column_mapping_and_the_bad_data_report(tmp_path, kind):
    table = user_table()
    folder = tmp_path / kind
    if kind == "parquet":
        folder.mkdir()
        table.to_parquet(folder / "train.parquet")
        user_table(extra_bad=False).to_parquet(folder / "test.parquet")
    elif kind == "arrow":  # the Arrow stream files datasets itself writes
        table.save_to_disk(tmp_path / "saved")
        folder.mkdir()
        shutil.copy(next((tmp_path / "saved").glob("*.arrow")), folder / "train.arrow")
    else:
        datasets.DatasetDict({"train": table, "test": user_table(extra_bad=False)}).save_to_disk(folder)
    dataset, report = load_entity_dataset(str(folder), columns=MAPPING, return_report=True, explanations=None)
    check_user_table(dataset, report)
    if kind != "arrow":
        assert len(dataset["test"]) == 4 and not report.splits["test"].issues["corrupt_image"].count
    assert "empty text: 1 (e.g. blank)" in report.summary()


def test_csv_and_json_folders_with_image_paths_and_released_explanations(tmp_path):
    (tmp_path / "img").mkdir()
    for index in range(3):
        (tmp_path / "img" / f"{index}.jpg").write_bytes(jpeg_bytes((60 * index, 20, 20)))
    csv_folder, json_folder = tmp_path / "csv", tmp_path / "json"
    csv_folder.mkdir()
    json_folder.mkdir()
    # Paths relative to the source folder; one missing file.
    lines = (
        ["image_path,caption"] + [f"../img/{index}.jpg,Caption {index}." for index in range(3)] + ["../img/9.jpg,Gone."]
    )
    (csv_folder / "train.csv").write_text("\n".join(lines) + "\n")
    dataset, report = load_entity_dataset(str(csv_folder), return_report=True, explanations=None)
    assert dataset["train"]["text"] == ["Caption 0.", "Caption 1.", "Caption 2."]  # columns found by their usual names
    assert report.splits["train"].count("missing_image") == 1
    assert dataset["train"][2]["image"].getpixel((0, 0))[0] > 100  # the file itself

    records = [{"id": f"j{index}", "image": str(tmp_path / "img" / f"{index}.jpg"), "text": f"Text {index}.", "explanation": None}
               for index in range(3)]  # fmt: skip
    records[0]["explanation"] = "Its own explanation."
    (json_folder / "train.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (json_folder / "test.jsonl").write_text(json.dumps(records[2]) + "\n")
    released = {"1.jpg": "Released explanation of image 1.", "7.jpg": "No row has this one."}
    (json_folder / "CapDsc_mistral_train.json").write_text(json.dumps(released))
    dataset, report = load_entity_dataset(str(json_folder), return_report=True)  # explanations="auto"
    assert dataset["train"]["explanation"] == ["Its own explanation.", "Released explanation of image 1.", None]
    assert report.splits["train"].count("missing_explanation") == 1
    assert report.unused_explanations and "7.jpg" in report.summary()
    # Image 2 is in train and test: a leak, reported as the file layouts report it.
    assert report.shared_images["train/test"].examples[0][0] == "j2"


def write_shards(folder: Path, shards: int, per_shard: int, bad_every: int = 0) -> list[str]:
    """webdataset tar shards of (key.jpg, key.txt) samples; every `bad_every`-th text is blank. Returns the keys."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(shards):
        with tarfile.open(folder / f"train-{shard:05d}.tar", "w") as tar:
            for index in range(per_shard):
                key = f"s{shard}_{index:04d}"
                text = (
                    "  "
                    if bad_every and (shard * per_shard + index) % bad_every == bad_every - 1
                    else f"Caption {key}."
                )
                for extension, data in (
                    ("jpg", jpeg_bytes((shard * 40 % 255, index % 255, 9))),
                    ("txt", text.encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                if text.strip():
                    keys.append(key)
    return keys


def test_webdataset_shards_map_style_and_streamed(tmp_path):
    keys = write_shards(tmp_path / "wds", shards=2, per_shard=3, bad_every=4)
    dataset, report = load_entity_dataset(str(tmp_path / "wds"), return_report=True, explanations=None)
    assert sorted(dataset["train"]["id"]) == sorted(keys)  # __key__ is the id, .jpg the image, .txt the text
    assert report.splits["train"].count("empty_text") == 1
    streamed = list(open_source_stream(str(tmp_path / "wds"), "train"))
    assert sorted(row["id"] for row in streamed) == sorted(keys)  # the blank row is left out on the fly
    assert (
        set(streamed[0]) == {"id", "image", "text", "explanation"} and streamed[0]["image"]["bytes"][:2] == b"\xff\xd8"
    )


def mirror_hub_dataset(cache_dir: Path, repo_id: str, data_files: dict[str, str]) -> None:
    """The datasets cache a `load_dataset(repo_id)` on a machine with internet leaves behind, written locally: the
    prepared Arrow files under `<namespace>___<name>/default/0.0.0/<hash>/`."""
    namespace, name = repo_id.split("/")
    staging = cache_dir.parent / "staging"
    builder = datasets.load_dataset_builder("parquet", data_files=data_files, cache_dir=str(staging))
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir)
    target = cache_dir / f"{namespace}___{name}" / "default" / "0.0.0" / prepared.name
    target.mkdir(parents=True)
    info = json.loads((prepared / "dataset_info.json").read_text())
    info.update(config_name="default", dataset_name=name)
    (target / "dataset_info.json").write_text(json.dumps(info))
    for arrow in prepared.glob("*.arrow"):
        shutil.copy(arrow, target / arrow.name.replace("parquet-", f"{name}-"))


def test_hub_id_offline_from_the_datasets_cache(tmp_path):
    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py: no network
    source = tmp_path / "files"
    source.mkdir()
    user_table().to_parquet(source / "train.parquet")
    user_table(extra_bad=False).to_parquet(source / "validation.parquet")
    cache = tmp_path / "cache"
    mirror_hub_dataset(cache, "someone/mini_news", {"train": str(source / "train.parquet"),
                                                    "validation": str(source / "validation.parquet")})  # fmt: skip
    dataset, report = load_entity_dataset(
        "someone/mini_news", columns=MAPPING, cache_dir=str(cache), return_report=True, explanations="auto"
    )
    check_user_table(dataset, report)
    assert len(dataset["validation"]) == 4
    with pytest.raises(FileNotFoundError, match="someone/absent.*could not be loaded"):
        load_entity_dataset("someone/absent", cache_dir=str(cache))


def test_column_errors_name_the_column_and_the_columns_there(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    user_table(extra_bad=False).rename_column("caption", "title").to_parquet(folder / "train.parquet")
    with pytest.raises(
        ValueError, match=r"no text column \(looked for text, caption.*'uid', 'img', 'title'.*--text_column"
    ):
        load_entity_dataset(str(folder))
    with pytest.raises(ValueError, match="no column 'headline' .--text_column."):
        load_entity_dataset(str(folder), columns=ColumnMapping(text="headline"))
    with pytest.raises(FileNotFoundError, match="not a dataset layout .* no such file or folder"):
        load_entity_dataset(str(tmp_path / "nowhere" / "x"))


def test_entityclip_data_command_takes_a_source_and_column_flags(tmp_path, capsys):
    from entityclip_hf.data import main

    folder = tmp_path / "pq"
    folder.mkdir()
    user_table().to_parquet(folder / "train.parquet")
    assert main([str(folder), "--image-column", "img", "--text-column", "caption", "--id-column", "uid"]) == 0
    assert 'train[0]: {"id": "pair-0"' in capsys.readouterr().out
    assert main([str(folder), "--text-column", "headline"]) == 2
    assert "entityclip-data: error: " in capsys.readouterr().err
