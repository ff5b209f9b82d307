"""Bad data: every kind is counted and reported with example ids, bad pairs are left out, strict mode raises."""

import io
import json
import logging
import struct
from pathlib import Path

import pytest
from PIL import ExifTags, Image

from entityclip_hf.data import DataError, load_entity_dataset
from entityclip_hf.data.loading import image_error


def write_jpeg(path: Path, colour=(30, 120, 200), size=16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format="JPEG")


def write_truncated_jpeg(path: Path) -> None:
    # A real photo-like JPEG cut in half: its header is intact, its pixels are not.
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.effect_noise((32, 32), 60).convert("RGB")
    image.save(path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def messy(tmp_path):
    """A JSON-lines dataset with one row of every problem (and two good rows)."""
    root = tmp_path / "messy"
    write_jpeg(root / "img" / "good1.jpg")
    write_jpeg(root / "img" / "good2.jpg")
    write_jpeg(root / "img" / "dup.jpg")
    write_jpeg(root / "img" / "empty.jpg")
    (root / "img" / "garbage.jpg").write_bytes(b"this is not an image at all")
    write_truncated_jpeg(root / "img" / "truncated.jpg")
    lines = [
        json.dumps({"id": "good1", "image": "img/good1.jpg", "text": "Alpha in Rome.", "explanation": "Alpha is."}),
        json.dumps({"id": "good2", "image": "img/good2.jpg", "text": "Beta in Oslo."}),  # no explanation: kept
        json.dumps({"id": "good1", "image": "img/dup.jpg", "text": "Gamma.", "explanation": "Dup."}),  # kept
        json.dumps({"id": "blank", "image": "img/empty.jpg", "text": "  \n "}),
        json.dumps({"id": "null-text", "image": "img/empty.jpg", "text": None}),
        json.dumps({"id": "gone", "image": "img/missing.jpg", "text": "Delta.", "explanation": "x"}),
        json.dumps({"id": "garbage", "image": "img/garbage.jpg", "text": "Epsilon.", "explanation": "x"}),
        json.dumps({"id": "truncated", "image": "img/truncated.jpg", "text": "Zeta.", "explanation": "x"}),
        json.dumps({"id": "no-image", "text": "Eta."}),
        json.dumps({"id": "number-text", "image": "img/good1.jpg", "text": 42}),
        '{"id": "torn", "image": "img/go',  # a line cut by a crash
        json.dumps(["not", "an", "object"]),
    ]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_every_problem_is_counted_with_ids_and_bad_pairs_are_left_out(messy, caplog):
    with caplog.at_level(logging.WARNING, logger="entityclip_hf.data"):
        dataset, report = load_entity_dataset("jsonl", messy, return_report=True)
    train = dataset["train"]
    # good1, good2 and the duplicate id; the truncated JPEG is left out although its header is fine.
    assert train["id"] == ["good1", "good2", "good1"]
    split = report.splits["train"]
    assert split.rows_read == 12 and split.rows_kept == 3
    assert split.count("empty_text") == 2
    assert [sample_id for sample_id, _ in split.issues["empty_text"].examples] == ["blank", "null-text"]
    assert split.count("missing_image") == 1
    sample_id, detail = split.issues["missing_image"].examples[0]
    assert sample_id == "gone" and "missing.jpg" in detail
    assert split.count("corrupt_image") == 2
    reasons = dict(split.issues["corrupt_image"].examples)
    assert "UnidentifiedImageError" in reasons["garbage"] and "truncated" in reasons["truncated"]
    assert split.count("bad_record") == 4
    reasons = dict(split.issues["bad_record"].examples)
    assert "no field 'image'" in reasons["no-image"]
    assert "'text' is int" in reasons["number-text"]
    assert "not valid JSON" in reasons["train-11"]
    assert "list, not an object" in reasons["train-12"]
    assert split.count("duplicate_id") == 1 and split.issues["duplicate_id"].examples[0][0] == "good1"
    assert split.count("missing_explanation") == 1
    assert split.issues["missing_explanation"].examples == [("good2", "")]
    # Each excluded row is counted once, so the counts add up.
    assert split.rows_excluded == split.rows_read - split.rows_kept
    # The summary is printed (logged as a warning) with the ids.
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "missing image file: 1 (e.g. gone" in logged
    assert "unreadable image file: 2 (e.g. garbage (" in logged and "; truncated (" in logged
    assert "empty text: 2 (e.g. blank; null-text)" in logged
    assert "duplicate id: 1 (e.g. good1)" in logged
    assert json.loads(json.dumps(report.to_dict()))["splits"]["train"]["rows_kept"] == 3


def test_header_check_decodes_only_jpegs_without_an_end_marker(tmp_path, monkeypatch):
    whole, padded, cut = tmp_path / "whole.jpg", tmp_path / "padded.jpg", tmp_path / "cut.jpg"
    write_jpeg(whole)
    padded.write_bytes(whole.read_bytes() + b"\x00" * 100)  # bytes after the end marker: PIL reads it fine
    write_truncated_jpeg(cut)
    assert image_error(str(whole), "header") is None and image_error(str(padded), "header") is None
    assert "truncated" in image_error(str(cut), "header")
    # A whole JPEG is not decoded by the header check (it stays cheap on millions of files).
    monkeypatch.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    assert image_error(str(whole), "header") is None


def _jpeg_bytes(size: int, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 60).convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _exif_thumbnail_segment(thumbnail: bytes) -> bytes:
    """An APP1 EXIF segment whose IFD1 holds `thumbnail` (JPEGInterchangeFormat / ...Length), as cameras write."""
    ifd0 = struct.pack("<HI", 0, 14)  # no entries; the next IFD (IFD1, the thumbnail's) starts at byte 14
    ifd1 = (
        struct.pack("<H", 2)
        + struct.pack("<HHII", 0x0201, 4, 1, 44)
        + struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail))
    )
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd0 + ifd1 + struct.pack("<I", 0) + thumbnail
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _photoshop_thumbnail_segment(thumbnail: bytes) -> bytes:
    """An APP13 "Photoshop 3.0" segment with an image resource 0x040C (thumbnail: 28-byte header + JPEG)."""
    data = struct.pack(">IIIIIIHH", 1, 16, 16, 48, 48 * 16, len(thumbnail), 24, 1) + thumbnail
    data += b"\x00" * (len(data) % 2)
    payload = (
        b"Photoshop 3.0\x00" + b"8BIM" + struct.pack(">H", 0x040C) + b"\x00\x00" + struct.pack(">I", len(data)) + data
    )
    return b"\xff\xed" + struct.pack(">H", len(payload) + 2) + payload


@pytest.mark.parametrize("segment", [_exif_thumbnail_segment, _photoshop_thumbnail_segment], ids=["exif", "app13"])
def test_header_check_ignores_the_end_marker_of_an_embedded_thumbnail(tmp_path, segment):
    thumbnail = _jpeg_bytes(16, quality=50)
    main = _jpeg_bytes(48)
    photo = main[:2] + segment(thumbnail) + main[2:]  # the thumbnail's segment right after the start of image
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(photo)
    with Image.open(whole) as opened:  # a real JPEG with its thumbnail, as PIL reads it
        opened.load()
        if segment is _exif_thumbnail_segment:  # IFD1: JPEGInterchangeFormat (offset), ...Length
            assert opened.getexif().get_ifd(ExifTags.IFD.IFD1) == {0x0201: 44, 0x0202: len(thumbnail)}
        else:  # image resource 0x040C: the Photoshop thumbnail
            assert 0x040C in opened.info["photoshop"]
    assert image_error(str(whole), "header") is None
    # Cut short inside the main image's scan data: the thumbnail's end marker is still in the last 4 KiB.
    scan = photo.index(b"\xff\xda", 2 + len(segment(thumbnail)))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo[: scan + 300])
    tail = cut.read_bytes()[-4096:]
    assert b"\xff\xd9" in tail, "the test's premise: the old tail check saw an end marker"
    error = image_error(str(cut), "header")
    assert error is not None and "truncated" in error
    dataset, report = load_entity_dataset("jsonl", _one_row_dataset(tmp_path, cut), return_report=True)
    assert len(dataset["train"]) == 0 and report.splits["train"].issues["corrupt_image"].examples[0][0] == "cut"


def _one_row_dataset(tmp_path: Path, image: Path) -> Path:
    root = tmp_path / "one"
    root.mkdir()
    (root / "train.jsonl").write_text(json.dumps({"id": "cut", "image": str(image), "text": "A cut photo."}) + "\n")
    return root


def test_decode_check_also_finds_truncated_files(messy):
    dataset, report = load_entity_dataset("jsonl", messy, check_images="decode", return_report=True)
    assert "truncated" not in dataset["train"]["id"]
    assert {sample_id for sample_id, _ in report.splits["train"].issues["corrupt_image"].examples} == {
        "garbage",
        "truncated",
    }


def test_no_image_check_keeps_existing_but_unreadable_files(messy):
    dataset, report = load_entity_dataset("jsonl", messy, check_images="none", return_report=True)
    assert "garbage" in dataset["train"]["id"] and "gone" not in dataset["train"]["id"]
    assert report.count("corrupt_image") == 0 and report.count("missing_image") == 1
    with pytest.raises(ValueError, match="check_images"):
        load_entity_dataset("jsonl", messy, check_images="full")


def test_strict_mode_raises_with_the_report(messy):
    with pytest.raises(DataError) as error:
        load_entity_dataset("jsonl", messy, strict=True)
    message = str(error.value)
    assert "strict=True" in message and "missing image file: 1 (e.g. gone" in message
    assert error.value.report.count("corrupt_image") == 2


def test_strict_mode_accepts_clean_data_and_rows_without_explanations(tmp_path):
    root = tmp_path / "clean"
    write_jpeg(root / "a.jpg")
    (root / "test.jsonl").write_text(json.dumps({"image": "a.jpg", "text": "Fine."}) + "\n")
    dataset, report = load_entity_dataset("jsonl", root, strict=True, return_report=True)
    assert len(dataset["test"]) == 1 and report.count("missing_explanation") == 1


def test_max_examples_caps_the_ids_but_not_the_count(tmp_path):
    root = tmp_path / "many"
    lines = [json.dumps({"id": f"r{index}", "image": f"img/{index}.jpg", "text": "Lost."}) for index in range(7)]
    write_jpeg(root / "img" / "ok.jpg")
    lines.append(json.dumps({"id": "ok", "image": "img/ok.jpg", "text": "Kept."}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    dataset, report = load_entity_dataset("jsonl", root, max_examples=3, return_report=True)
    issue = report.splits["train"].issues["missing_image"]
    assert issue.count == 7 and [sample_id for sample_id, _ in issue.examples] == ["r0", "r1", "r2"]
    assert "(e.g. r0 (" in report.summary() and ", ...)" in report.summary()
    assert dataset["train"]["id"] == ["ok"]


def test_a_split_with_every_row_bad_is_empty_not_an_error(tmp_path):
    root = tmp_path / "allbad"
    write_jpeg(root / "a.jpg")
    (root / "train.jsonl").write_text(json.dumps({"image": "a.jpg", "text": "Fine."}) + "\n")
    (root / "test.jsonl").write_text(json.dumps({"image": "gone.jpg", "text": "Lost."}) + "\n")
    dataset, report = load_entity_dataset("jsonl", root, return_report=True)
    assert len(dataset["test"]) == 0 and dataset["test"].column_names == ["id", "image", "text", "explanation"]
    assert report.splits["test"].count("missing_image") == 1


def test_image_check_is_cached_and_redone_when_a_file_changes(messy, tmp_path):
    cache_dir = tmp_path / "cache"
    first = load_entity_dataset("jsonl", messy, cache_dir=str(cache_dir))
    files_after_first = sorted(path.name for path in cache_dir.rglob("*.arrow"))
    second = load_entity_dataset("jsonl", messy, cache_dir=str(cache_dir))
    # Nothing new written: the rows and the image check come from the cache.
    assert sorted(path.name for path in cache_dir.rglob("*.arrow")) == files_after_first
    assert second["train"]["id"] == first["train"]["id"]
    # Replacing an image file (same path) changes its size/mtime: the check runs again and sees it.
    (messy / "img" / "good2.jpg").write_bytes(b"now broken")
    third, report = load_entity_dataset("jsonl", messy, cache_dir=str(cache_dir), return_report=True)
    assert "good2" not in third["train"]["id"]
    assert [sample_id for sample_id, _ in report.splits["train"].issues["corrupt_image"].examples] == [
        "good2",
        "garbage",
        "truncated",
    ]


def test_image_error_reports_instead_of_raising(tmp_path):
    write_jpeg(tmp_path / "ok.jpg")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    assert image_error(str(tmp_path / "ok.jpg"), "header") is None
    assert image_error(str(tmp_path / "ok.jpg"), "decode") is None
    assert image_error(str(tmp_path / "bad.png"), "header") is not None
    assert "FileNotFoundError" in image_error(str(tmp_path / "none.jpg"), "header")


def test_command_line_shows_an_unreadable_first_image_instead_of_crashing(tmp_path, capsys):
    from entityclip_hf.data.cli import main

    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "img" / "broken.jpg").write_bytes(b"not an image")
    (root / "train.jsonl").write_text(json.dumps({"id": "a", "image": "img/broken.jpg", "text": "Alpha."}) + "\n")
    assert main(["jsonl", "--root", str(root), "--check-images", "none"]) == 0
    assert '"image": "unreadable (UnidentifiedImageError' in capsys.readouterr().out


# The same bad rows in each published dataset's own layout: (id, text, image state, has an explanation).
BAD_ROWS = [
    ("a1", "Alpha in Rome.", "ok", True),
    ("a2", "Beta in Oslo.", "ok", False),
    ("a1", "Alpha again.", "ok", True),  # duplicate id: kept, reported
    ("a3", "   ", "ok", True),  # empty text
    ("a4", "Delta.", "missing", True),
    ("a5", "Epsilon.", "garbage", True),
    ("a6", "Zeta.", "truncated", True),
]


def _write_image(path: Path, state: str) -> None:
    if state == "ok":
        write_jpeg(path)
    elif state == "garbage":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not an image")
    elif state == "truncated":
        write_truncated_jpeg(path)


def _write_published_layout(name: str, root: Path) -> None:
    """Write BAD_ROWS as N24News, VisualNews or GoodNews files (train split), with released explanations."""
    records, explanations = [], {}
    for sample_id, text, state, explained in BAD_ROWS:
        if name == "n24news":
            records.append({"image_id": sample_id, "caption": text, "section": "World", "headline": "H"})
            image, key = root / "imgs" / f"{sample_id}.jpg", f"{sample_id}.jpg"
        elif name == "visualnews":
            relative = f"bbc/images/0001/{sample_id}.jpg"
            records.append({"id": sample_id, "caption": text, "topic": "t", "source": "bbc", "image_path": relative})
            image, key = root / "images" / relative, f"/authors/VisualNews/images//{relative}"
        else:
            records.append({"image_id": f"{sample_id}.jpg", "captioning": text, "title": "T"})
            image, key = root / "images" / f"{sample_id}.jpg", f"{sample_id}.jpg"
        _write_image(image, state)
        if explained:
            explanations[key] = f"About {sample_id}."
    files = {
        "n24news": ("news/nytimes_train.json", "news/CapDsc_mistral_train.json"),
        "visualnews": ("train.json", "CapDsc_mistral_train.json"),
        "goodnews": ("new_goodnews_capim_train.json", "train_cap_individual/New_Corr_CapDsc_mistral_train.json"),
    }[name]
    for relative, data in zip(files, (records, explanations), strict=True):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(json.dumps(data), encoding="utf-8")
    (root / "images").mkdir(exist_ok=True)


@pytest.mark.parametrize("name", ["n24news", "visualnews", "goodnews"])
def test_every_bad_data_case_in_each_published_layout(name, tmp_path):
    root = tmp_path / name
    _write_published_layout(name, root)
    dataset, report = load_entity_dataset(name, root, return_report=True)
    suffix = ".jpg" if name == "goodnews" else ""  # GoodNews ids are image file names
    train, split = dataset["train"], report.splits["train"]
    assert train["id"] == [f"a1{suffix}", f"a2{suffix}", f"a1{suffix}"]
    assert train["explanation"] == ["About a1.", None, "About a1."]
    assert split.rows_read == 7 and split.rows_kept == 3
    expected = {"empty_text": ["a3"], "missing_image": ["a4"], "corrupt_image": ["a5", "a6"]}
    expected |= {"duplicate_id": ["a1"], "missing_explanation": ["a2"]}
    for problem, ids in expected.items():
        assert [sample_id for sample_id, _ in split.issues[problem].examples] == [i + suffix for i in ids], problem
    with pytest.raises(DataError):
        load_entity_dataset(name, root, strict=True)
