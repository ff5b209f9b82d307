"""The demo dataset: made locally, deterministic, entity looks consistent, loaded through the real loader; the CLI."""

import hashlib
import json
import random
import time

import numpy as np
import pytest
from PIL import Image

from entityclip_hf.data import demo_entities, load_entity_dataset, main, make_demo_dataset
from entityclip_hf.data.demo import COLOURS, draw_scene


def folder_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_demo_is_deterministic_and_fast(tmp_path):
    start = time.perf_counter()
    first = make_demo_dataset(tmp_path / "a")
    elapsed = time.perf_counter() - start
    second = make_demo_dataset(tmp_path / "b")
    assert folder_digest(first) == folder_digest(second)
    assert folder_digest(make_demo_dataset(tmp_path / "c", seed=1)) != folder_digest(first)
    assert elapsed < 5, f"the demo took {elapsed:.1f}s to make"
    info = json.loads((first / "demo_info.json").read_text())
    assert info["rows"] == {"train": 144, "validation": 24, "test": 24}
    assert len(info["entities"]) == 24
    assert {entity["kind"] for entity in info["entities"]} == {"person", "place", "organisation", "event"}


def test_demo_splits_hold_out_new_sentences_about_known_entities(tmp_path):
    dataset = load_entity_dataset("demo", tmp_path / "demo")
    assert {split: len(rows) for split, rows in dataset.items()} == {"train": 144, "validation": 24, "test": 24}
    train_texts = set(dataset["train"]["text"])
    all_texts = [text for rows in dataset.values() for text in rows["text"]]
    assert len(set(all_texts)) == len(all_texts), "every caption is a different sentence"
    assert not train_texts & set(dataset["test"]["text"])
    # Every entity has captions in every split.
    for split in dataset.values():
        assert set(split["entity"]) == set(dataset["train"]["entity"])
    assert dataset["train"].column_names == ["id", "image", "text", "explanation", "entity", "topic", "entities"]
    row = dataset["test"][0]
    assert row["entity"] in row["text"] and row["image"].size == (64, 64)


def test_demo_explanations_describe_the_look_of_each_named_entity(tmp_path):
    entities = {entity.name: entity for entity in demo_entities()}
    for entity in entities.values():
        described = {name: value for name, value in entity.look.items() if name != "backdrop"}
        assert all(value in entity.description for value in described.values()), entity
    dataset = load_entity_dataset("demo", tmp_path / "demo", splits=["train"])
    for row in dataset["train"]:
        names = row["entities"].split("; ")
        assert names[0] == row["entity"]
        assert all(name in row["text"] for name in names)
        assert row["explanation"] == " ".join(entities[name].description for name in names)


def colour_share(image: Image.Image, colour, tolerance=40) -> float:
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    return float((np.abs(pixels - np.array(colour)).max(axis=-1) <= tolerance).mean())


def test_each_entity_keeps_its_look_across_images():
    entities = demo_entities()
    person = next(entity for entity in entities if entity.kind == "person")
    place = next(entity for entity in entities if entity.kind == "place")
    jacket, sky = COLOURS[person.look["jacket"]], COLOURS[place.look["sky"]]
    for seed in range(5):
        alone = draw_scene([person], 64, random.Random(seed))
        together = draw_scene([person, place], 64, random.Random(seed))
        # The person's jacket is in every picture of them; the place's sky is behind them when they are there.
        assert colour_share(alone, jacket) > 0.08
        assert colour_share(together, jacket) > 0.08
        assert colour_share(together, sky) > 0.15
    # Two pictures of the same entity differ a little (position, lighting), not in look.
    one, two = (np.asarray(draw_scene([place], 64, random.Random(seed)), dtype=np.int32) for seed in (1, 2))
    assert 0 < np.abs(one - two).mean() < 60


def test_demo_is_built_atomically_and_reused(tmp_path):
    root = tmp_path / "demo"
    make_demo_dataset(root, num_entities=8, captions_per_entity=4, image_size=32)
    stamp = (root / "demo_info.json").stat().st_mtime_ns
    # Same parameters: reused, not rebuilt; no staging folder left behind.
    make_demo_dataset(root, num_entities=8, captions_per_entity=4, image_size=32)
    assert (root / "demo_info.json").stat().st_mtime_ns == stamp
    assert [path.name for path in tmp_path.iterdir()] == ["demo"]
    # load_entity_dataset("demo") uses whatever demo the folder holds.
    dataset = load_entity_dataset("demo", root)
    assert len(dataset["train"]) == 16 and dataset["train"][0]["image"].size == (32, 32)
    # Other parameters, or a folder that is not a demo: an error, nothing is overwritten.
    with pytest.raises(FileExistsError, match="Choose another folder"):
        make_demo_dataset(root, num_entities=12, captions_per_entity=4, image_size=32)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        load_entity_dataset("demo", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import entityclip_hf.data.demo as demo

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "_write_json", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        make_demo_dataset(tmp_path / "demo")
    assert list(tmp_path.iterdir()) == []


def test_demo_parameters_are_checked(tmp_path):
    with pytest.raises(ValueError, match="captions_per_entity"):
        make_demo_dataset(tmp_path / "x", captions_per_entity=2)
    with pytest.raises(ValueError, match="num_entities"):
        make_demo_dataset(tmp_path / "x", num_entities=3)
    with pytest.raises(ValueError, match="too few"):
        demo_entities(num_entities=200)


def test_cli_loads_and_prints_the_report(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code = main(["demo", "--root", str(tmp_path / "demo"), "--report-json", str(report_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "DatasetDict" in out and "num_rows: 144" in out and "test[0]:" in out
    assert json.loads(report_path.read_text())["splits"]["test"]["rows_kept"] == 24


def test_cli_errors_exit_with_a_message(tmp_path, capsys):
    assert main(["coco", "--root", str(tmp_path)]) == 2
    assert "not a dataset layout (demo, goodnews, jsonl, n24news, visualnews)" in capsys.readouterr().err
    assert main(["n24news", "--root", str(tmp_path / "absent")]) == 2
    assert "nytimes_train.json" in capsys.readouterr().err
    root = tmp_path / "bad"
    root.mkdir()
    (root / "train.jsonl").write_text(json.dumps({"image": "gone.jpg", "text": "x"}) + "\n")
    assert main(["jsonl", "--root", str(root), "--strict"]) == 1
    assert "missing image file: 1" in capsys.readouterr().err
