"""`entityclip-eval` and the retrieval command line, on tiny saved models and JSON-lines splits written here."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel, EntityCLIPProcessor
from entityclip_hf import retrieval as retrieval_module
from entityclip_hf.evaluation import evaluate_split, format_metrics_table, load_split, run
from entityclip_hf.metrics import retrieval_metrics
from entityclip_hf.retrieval import load_embeddings

TEXTS = [
    "Angela Merkel meets Emmanuel Macron in Aachen.",
    "Serena Williams wins at Wimbledon on Saturday.",
    "Firefighters battle a wildfire near Santa Rosa, California.",
    "Pope Francis greets the crowd in St. Peter's Square.",
    "Lionel Messi scores for Barcelona against Real Madrid.",
    "Usain Bolt wins the 100 meters final in Rio de Janeiro.",
    "Refugees arrive on the Greek island of Lesbos.",
]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_clip_config, tiny_processor):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config)).save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


@pytest.fixture
def data_root(tmp_path):
    """A JSON-lines dataset with a 7-pair test split (images relative to the split file)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "test.jsonl", "w") as handle:
        for index, text in enumerate(TEXTS):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{index}.png")
            handle.write(json.dumps({"id": f"pair-{index}", "image": f"images/{index}.png", "text": text}) + "\n")
    return root


def reference_embeddings(model, processor, root, keep):
    images = [Image.open(root / "images" / f"{i}.png") for i in keep]
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        text = processor(text=[TEXTS[i] for i in keep], padding=True, truncation=True, return_tensors="pt")
        image_embeds = _pooled(model.get_image_features(pixel_values=pixels))
        text_embeds = _pooled(
            model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        )
    return F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)


def _pooled(features):
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def run_eval(model_folder, root, tmp_path, *extra):
    output = tmp_path / "out" / "metrics.json"
    args = ["--model", str(model_folder), "--dataset", "jsonl", "--root", str(root), "--split", "test"]
    report = run([*args, "--batch-size", "3", "--chunk-size", "4", "--no-progress", "--output", str(output), *extra])
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    return report


def test_eval_prints_the_table_and_writes_the_metrics(model_folder, data_root, tmp_path, capsys):
    report = run_eval(model_folder, data_root, tmp_path)
    model = EntityCLIPModel.from_pretrained(model_folder).eval()
    processor = EntityCLIPProcessor.from_pretrained(model_folder)
    expected = retrieval_metrics(*reference_embeddings(model, processor, data_root, range(7)))
    assert report["num_pairs"] == 7 and report["skipped"] == [] and report["split"] == "test"
    assert report["metrics"] == pytest.approx(expected)
    # The model is untrained: a sanity check that the metric is not trivially perfect.
    assert report["metrics"]["rsum"] < 600
    printed = capsys.readouterr().out
    assert "image → text" in printed and "text → image" in printed and "rsum" in printed
    assert format_metrics_table(report["metrics"]) in printed


def truncate(path):
    # The header stays readable, the pixels do not.
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_an_unreadable_image_is_left_out_by_the_loader_and_counted(model_folder, data_root, tmp_path, capsys):
    truncate(data_root / "images" / "2.png")
    report = run_eval(model_folder, data_root, tmp_path, "--check-images", "decode")
    assert report["num_pairs"] == 6 and report["rows_excluded_by_loader"] == 1
    model = EntityCLIPModel.from_pretrained(model_folder).eval()
    processor = EntityCLIPProcessor.from_pretrained(model_folder)
    expected = retrieval_metrics(*reference_embeddings(model, processor, data_root, [0, 1, 3, 4, 5, 6]))
    assert report["metrics"] == pytest.approx(expected)
    assert "the loader left out 1 row(s)" in capsys.readouterr().out


def test_an_image_that_fails_during_encoding_drops_its_pair(model_folder, data_root):
    split, _ = load_split("jsonl", data_root, "test")
    truncate(data_root / "images" / "5.png")  # broken after the loader checked it (e.g. a network file system)
    model = EntityCLIPModel.from_pretrained(model_folder).eval()
    processor = EntityCLIPProcessor.from_pretrained(model_folder)
    result = evaluate_split(model, processor, split, batch_size=4, progress=False)
    assert result.num_pairs == 6
    assert result.skipped == [{"index": 5, "id": "pair-5", "reason": "image could not be read"}]
    expected = retrieval_metrics(*reference_embeddings(model, processor, data_root, [0, 1, 2, 3, 4, 6]))
    assert result.metrics == pytest.approx(expected)


def test_a_plain_clip_checkpoint_is_evaluated_the_same_way(tiny_clip_config, tiny_tokenizer, data_root, tmp_path):
    from entityclip_hf.tiny_models import tiny_image_processor

    torch.manual_seed(4)
    clip = CLIPModel(tiny_clip_config).eval()
    processor = CLIPProcessor(image_processor=tiny_image_processor(32), tokenizer=tiny_tokenizer)
    folder = tmp_path / "clip"
    clip.save_pretrained(folder)
    processor.save_pretrained(folder)
    report = run_eval(folder, data_root, tmp_path)
    expected = retrieval_metrics(*reference_embeddings(clip, processor, data_root, range(7)))
    assert report["metrics"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--dataset", "jsonl", "--split", "test"], "--dataset jsonl needs --root"),
        (["--dataset", "jsonl", "--split", "train", "--root", "{root}"], "no split file for train"),
        (["--dataset", "jsonl", "--split", "final", "--root", "{root}"], "unknown split 'final'"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(model_folder, data_root, capsys, arguments, message):
    arguments = [a.replace("{root}", str(data_root)) for a in arguments]
    with pytest.raises(SystemExit) as exit_info:
        run(["--model", str(model_folder), "--no-progress", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_numbers_are_refused_by_the_parser(model_folder, capsys):
    with pytest.raises(SystemExit):
        run(["--model", str(model_folder), "--dataset", "demo", "--batch-size", "0"])
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_console_script_runs_in_a_fresh_process(model_folder, data_root, tmp_path):
    output = tmp_path / "metrics.json"
    script = Path(sys.executable).parent / "entityclip-eval"
    # The installed console script (its exit status is main()'s return value); `python -m` if not installed.
    command = [str(script)] if script.exists() else [sys.executable, "-m", "entityclip_hf.evaluation"]
    command += ["--model", str(model_folder), "--dataset", "jsonl", "--root", str(data_root), "--no-progress"]
    completed = subprocess.run([*command, "--output", str(output)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "rsum" in completed.stdout
    assert json.loads(output.read_text())["num_pairs"] == 7


# ------------------------------------------------------------------------------------------------ retrieval CLI
def test_retrieval_cli_encode_then_search(model_folder, data_root, tmp_path, capsys):
    gallery_file = tmp_path / "gallery.safetensors"
    common = ["--model", str(model_folder), "--no-progress"]
    retrieval_module.run(
        ["encode", *common, "--images-from", "jsonl", "--root", str(data_root), "--output", str(gallery_file)]
    )
    stored = load_embeddings(gallery_file)
    assert stored.ids == [f"pair-{i}" for i in range(7)]
    assert stored.metadata == {"model": str(model_folder), "modality": "image", "source": "jsonl", "split": "test"}
    model = EntityCLIPModel.from_pretrained(model_folder).eval()
    processor = EntityCLIPProcessor.from_pretrained(model_folder)
    image_embeds, text_embeds = reference_embeddings(model, processor, data_root, range(7))
    torch.testing.assert_close(stored.embeddings, image_embeds, rtol=1e-5, atol=1e-5)

    results = retrieval_module.run(["search", *common, "--index", str(gallery_file), "--query", TEXTS[3], "--k", "3"])
    expected = (text_embeds[3] @ image_embeds.T).topk(3).indices.tolist()
    assert [hit["id"] for hit in results[0]["hits"]] == [f"pair-{i}" for i in expected]
    printed = capsys.readouterr().out
    assert f'query: "{TEXTS[3]}"' in printed and f"pair-{expected[0]}" in printed


def test_retrieval_cli_search_with_rerank_orders_by_itm(model_folder, data_root, capsys):
    results = retrieval_module.run(
        ["search", "--model", str(model_folder), "--no-progress", "--images-from", "jsonl", "--root", str(data_root)]
        + ["--query", TEXTS[0], "--k", "4", "--rerank", "5"]
    )
    hits = results[0]["hits"]
    assert len(hits) == 4
    probabilities = [hit["match_probability"] for hit in hits]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(hit["text"] == TEXTS[int(hit["id"].split("-")[1])] for hit in hits), "each hit shows its caption"
    assert "itm" in capsys.readouterr().out


def test_retrieval_cli_searches_a_folder_of_images(model_folder, data_root):
    results = retrieval_module.run(
        ["search", "--model", str(model_folder), "--no-progress", "--images-from", str(data_root / "images")]
        + ["--query", "a photo", "--k", "7"]
    )
    assert sorted(hit["id"] for hit in results[0]["hits"]) == [f"{i}.png" for i in range(7)]


def test_retrieval_cli_errors(model_folder, data_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        retrieval_module.run(
            ["search", "--model", str(model_folder), "--images-from", "jsonl", "--root", str(data_root)]
        )
    assert exit_info.value.code == 2 and "give at least one --query" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        retrieval_module.run(
            ["search", "--model", str(model_folder), "--images-from", str(tmp_path / "nowhere"), "--query", "x"]
        )
    assert "neither a dataset" in capsys.readouterr().err


def test_a_gallery_below_the_minimum_size_is_warned_about(model_folder, data_root, tmp_path, capsys):
    report = run_eval(model_folder, data_root, tmp_path, "--max-samples", "1")
    assert report["metrics"]["rsum"] == pytest.approx(600.0), "one pair: every R@K is 100"
    err = capsys.readouterr().err
    assert "entityclip-eval: warning: the gallery has only 1 pair(s), below --min-gallery-size 100" in err
    assert "R@K on 1 items is not meaningful" in err and "R@1 100" in err
    assert report["warnings"] and "not meaningful" in report["warnings"][0]
    report = run_eval(model_folder, data_root, tmp_path, "--min-gallery-size", "7")
    assert report["warnings"] == [] and "warning" not in capsys.readouterr().err


def test_small_gallery_warning_states_chance():
    from entityclip_hf.evaluation import small_gallery_warning

    assert small_gallery_warning(100, 100) is None
    warning = small_gallery_warning(20, 100)
    assert "R@1 5, R@5 25, R@10 50, R@50 100, R@100 100" in warning and "K >= 20" in warning
