"""Bytes that are not UTF-8: named by file and byte offset; in JSON lines one bad line is one bad record."""

import json
from pathlib import Path

import pytest
from PIL import Image

from entityclip_hf.data import load_entity_dataset
from entityclip_hf.data.cli import main as data_main
from entityclip_hf.data.formats import first_utf8_error, read_utf8_file

LATIN1_CAPTION = "Caf\xe9 in Z\xfcrich.".encode("latin-1")  # b"Caf\xe9 ..." : 0xE9 starts no UTF-8 character


def write_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (10, 200, 90)).save(path, format="JPEG")


def n24news_with_train_file(root: Path, train_bytes: bytes) -> Path:
    for image_id in ("a", "b"):
        write_jpeg(root / "imgs" / f"{image_id}.jpg")
    (root / "news").mkdir(parents=True, exist_ok=True)
    (root / "news" / "nytimes_train.json").write_bytes(train_bytes)
    return root


def test_a_split_file_with_bad_bytes_names_the_file_and_the_byte_offset(tmp_path, capsys):
    good = json.dumps([{"image_id": "a", "caption": "Alpha."}]).encode()
    data = good[:-1] + b', {"image_id": "b", "caption": "' + LATIN1_CAPTION + b'"}]'
    root = n24news_with_train_file(tmp_path / "n24", data)
    offset = data.index(b"\xe9")
    with pytest.raises(ValueError, match=rf"nytimes_train.json: not UTF-8 text at byte offset {offset} \(line 1\)"):
        load_entity_dataset("n24news", root)
    # The command says the same on one line, with argparse's "error:", and exits 2: no traceback.
    assert data_main(["n24news", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("entityclip-data: error: ") and f"byte offset {offset}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_released_explanation_file_with_bad_bytes_is_named(tmp_path):
    root = n24news_with_train_file(tmp_path / "n24", json.dumps([{"image_id": "a", "caption": "Alpha."}]).encode())
    explanations = b'{"a.jpg": "' + LATIN1_CAPTION + b'"}'
    (root / "news" / "CapDsc_mistral_train.json").write_bytes(explanations)
    offset = explanations.index(b"\xe9")
    with pytest.raises(ValueError, match=rf"CapDsc_mistral_train.json: not UTF-8 text at byte offset {offset} "):
        load_entity_dataset("n24news", root)


def test_broken_images_txt_with_bad_bytes_is_named(tmp_path):
    root = tmp_path / "goodnews"
    write_jpeg(root / "images" / "1_0.jpg")
    (root / "new_goodnews_capim_train.json").write_text(json.dumps([{"image_id": "1_0.jpg", "captioning": "A."}]))
    (root / "broken_images.txt").write_bytes(b"2_0.jpg\n3_\xff.jpg\n")
    with pytest.raises(ValueError, match=r"broken_images.txt: not UTF-8 text at byte offset 10 \(line 2\)"):
        load_entity_dataset("goodnews", root)


def test_a_json_lines_line_with_bad_bytes_or_bad_json_is_one_bad_record(tmp_path):
    root = tmp_path / "mine"
    write_jpeg(root / "img" / "a.jpg")
    lines = [
        json.dumps({"id": "first", "image": "img/a.jpg", "text": "Alpha."}).encode(),
        b'{"id": "latin", "image": "img/a.jpg", "text": "' + LATIN1_CAPTION + b'"}',
        b'{"id": "torn", "image": "img/',
        json.dumps({"id": "last", "image": "img/a.jpg", "text": "Omega."}).encode(),
    ]
    data = b"\n".join(lines) + b"\n"
    (root / "train.jsonl").write_bytes(data)
    dataset, report = load_entity_dataset("jsonl", root, return_report=True)
    assert dataset["train"]["id"] == ["first", "last"], "the load goes on past the bad lines"
    reasons = dict(report.splits["train"].issues["bad_record"].examples)
    assert set(reasons) == {"train-2", "train-3"}
    bad_byte = data.index(b"\xe9")
    assert f"train.jsonl: not UTF-8 text at byte offset {bad_byte}" in reasons["train-2"]
    assert "line 2" in reasons["train-2"] and "line 3 is not valid JSON" in reasons["train-3"]
    assert "train.jsonl" in reasons["train-3"]


def test_read_utf8_file_and_first_utf8_error(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes("\ufeffgr\xfc\xdfe\n".encode())  # a byte-order mark, then valid UTF-8
    assert read_utf8_file(path) == "gr\xfc\xdfe\n" and first_utf8_error(path) is None
    # A bad byte after a character cut by a block boundary: the offset is the file's, not the block's.
    data = "\xfc".encode() * 5 + b"\xff" + b"tail"
    path.write_bytes(data)
    bad_byte = data.index(b"\xff")
    for block_size in (1, 3, 1 << 20):
        assert f"byte offset {bad_byte}:" in first_utf8_error(path, block_size=block_size)
    path.write_bytes(b"ends inside a character \xc3")
    assert "byte offset 24:" in first_utf8_error(path, block_size=4)
