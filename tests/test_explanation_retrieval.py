"""Explanation-aware retrieval (opt-in): texts fused with their explanations, in encoding, metrics and commands."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel
from entityclip_hf.evaluation import run as run_eval
from entityclip_hf.metrics import retrieval_metrics
from entityclip_hf.retrieval import encode_explanations, encode_texts, fuse_explanation_embeddings
from entityclip_hf.retrieval import run as run_search

TEXTS = ["Oren Halloran arrives in Tessaly.", "Storm clouds over Elsra.", "Kestrel Bank opens a branch."]
EXPLANATIONS = ["Oren Halloran wears a red jacket.", None, "Kestrel Bank has a gold star logo."]


@pytest.fixture(scope="module")
def model(tiny_clip_config):
    torch.manual_seed(0)
    return EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config)).eval()


def test_fusion_is_the_normalised_weighted_sum_and_falls_back_without_explanation():
    text = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    explanation = torch.tensor([[0.0, 2.0], [float("nan"), float("nan")]])
    fused = fuse_explanation_embeddings(text, explanation, 0.25)
    by_hand = 0.75 * torch.tensor([0.6, 0.8]) + 0.25 * torch.tensor([0.0, 1.0])  # both normalised first
    torch.testing.assert_close(fused[0], by_hand / by_hand.norm())
    torch.testing.assert_close(fused[1], torch.tensor([1.0, 0.0]), msg="no explanation: the plain text embedding")
    torch.testing.assert_close(fuse_explanation_embeddings(text, explanation, 0.0), F.normalize(text, dim=-1))
    torch.testing.assert_close(fuse_explanation_embeddings(text, explanation, 1.0)[0], torch.tensor([0.0, 1.0]))
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="explanation weight"):
            fuse_explanation_embeddings(text, explanation, bad)


def test_encode_texts_with_explanations_fuses_each_text_with_its_own(model, tiny_processor):
    plain = encode_texts(model, tiny_processor, TEXTS, progress=False)
    explained = encode_explanations(model, tiny_processor, EXPLANATIONS)
    assert torch.isnan(explained[1]).all() and torch.isfinite(explained[[0, 2]]).all()
    fused = encode_texts(
        model, tiny_processor, TEXTS, progress=False, explanations=EXPLANATIONS, explanation_weight=0.4
    )
    torch.testing.assert_close(fused, fuse_explanation_embeddings(plain, explained, 0.4))
    torch.testing.assert_close(fused[1], plain[1], msg="the text without an explanation keeps its embedding")
    assert not torch.allclose(fused[0], plain[0])
    with pytest.raises(ValueError, match="2 explanations for 3 texts"):
        encode_texts(model, tiny_processor, TEXTS, progress=False, explanations=EXPLANATIONS[:2])


def test_the_metric_scores_fused_texts_in_both_directions():
    generator = torch.Generator().manual_seed(0)
    images, texts, explanations = (torch.randn(6, 8, generator=generator) for _ in range(3))
    explanations[2] = float("nan")
    fused = fuse_explanation_embeddings(texts, explanations, 0.6)
    expected = retrieval_metrics(images, fused)
    assert retrieval_metrics(images, texts, explanation_embeds=explanations, explanation_weight=0.6) == expected
    # Text queries (t2i) and the text gallery (i2t) both changed: a near-copy of the image as explanation wins.
    perfect = retrieval_metrics(images, texts, explanation_embeds=images, explanation_weight=1.0)
    assert perfect["i2t_R@1"] == 100.0 and perfect["t2i_R@1"] == 100.0
    import evaluate

    from entityclip_hf.metrics import RETRIEVAL_METRIC_PATH

    metric = evaluate.load(RETRIEVAL_METRIC_PATH)
    result = metric.compute(
        image_embeds=images.tolist(), text_embeds=texts.tolist(), explanation_embeds=explanations.tolist(),
        explanation_weight=0.6,
    )  # fmt: skip
    assert result["rsum"] == pytest.approx(expected["rsum"])


@pytest.fixture
def model_folder(tmp_path, model, tiny_processor):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "test.jsonl", "w") as handle:
        for index, (text, explanation) in enumerate(zip(TEXTS * 2, EXPLANATIONS * 2, strict=True)):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{index}.png")
            row = {"id": f"p{index}", "image": f"images/{index}.png", "text": f"{text} ({index})"}
            if explanation:
                row["explanation"] = explanation
            handle.write(json.dumps(row) + "\n")
    return root


def test_eval_with_explanation_weight_and_rerank_top_k(model_folder, data_root, model, tiny_processor, capsys):
    base = ["--model", str(model_folder), "--dataset", "jsonl", "--root", str(data_root), "--no-progress"]
    plain = run_eval(base)
    fused = run_eval([*base, "--explanation_weight", "0.5", "--rerank_top_k", "3"])
    assert plain["explanation_weight"] == 0.0 and "rerank" not in plain
    assert fused["metrics"] != plain["metrics"]
    rerank = fused["rerank"]
    assert rerank["rerank_top_k"] == 3
    assert rerank["clip_i2t_R@1"] == fused["metrics"]["i2t_R@1"], "the CLIP order is the fused first stage"
    assert all(0 <= rerank[f"rerank_{d}_R@{k}"] <= 100 for d in ("i2t", "t2i") for k in (1, 5, 10))
    # R@K with K >= top_k cannot change: reranking only reorders the top_k.
    assert rerank["rerank_t2i_R@5"] == rerank["clip_t2i_R@5"]
    out = capsys.readouterr().out
    assert "GI-ITM reranking of the top 3" in out and "text → image, reranked" in out


def test_eval_reports_the_fused_rerank_for_each_clip_weight(model_folder, data_root, capsys):
    base = ["--model", str(model_folder), "--dataset", "jsonl", "--root", str(data_root), "--no-progress"]
    report = run_eval([*base, "--rerank_top_k", "4", "--rerank_clip_weight", "0", "1000"])
    by_weight = report["rerank_by_clip_weight"]
    assert sorted(by_weight) == ["0.0", "1000.0"]
    # A huge CLIP weight is the CLIP order again; GI-ITM alone stays reported under "rerank".
    for direction in ("i2t", "t2i"):
        assert by_weight["1000.0"][f"rerank_{direction}_R@1"] == by_weight["1000.0"][f"clip_{direction}_R@1"]
    assert report["rerank"]["clip_weight"] is None
    assert "by GI-ITM's log-odds + 1000 x the CLIP logit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_eval([*base, "--rerank_clip_weight", "1"])  # without --rerank_top_k
    with pytest.raises(SystemExit):
        run_eval([*base, "--rerank_top_k", "4", "--rerank_clip_weight", "-1"])


def test_search_reranks_by_the_fused_score(model_folder, data_root):
    base = ["search", "--model", str(model_folder), "--images-from", "jsonl", "--root", str(data_root), "--k", "5"]
    base += ["--no-progress", "--device", "cpu", "--query", TEXTS[0], "--rerank", "5"]
    first_stage = run_search(base[:-2])[0]["hits"]
    kept = run_search([*base, "--rerank-clip-weight", "1000"])[0]["hits"]
    assert [h["id"] for h in kept] == [h["id"] for h in first_stage], "a huge CLIP weight keeps the CLIP order"
    fused = run_search([*base, "--rerank-clip-weight", "0.5"])[0]["hits"]
    scores = [h["rerank_score"] for h in fused]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(SystemExit):
        run_search([*base, "--rerank-clip-weight", "-1"])


def test_search_with_query_explanations(model_folder, data_root, model, tiny_processor):
    base = ["search", "--model", str(model_folder), "--images-from", "jsonl", "--root", str(data_root), "--k", "6"]
    base += ["--no-progress", "--device", "cpu", "--query", TEXTS[0]]
    plain = run_search(base)
    fused = run_search([*base, "--explanation", EXPLANATIONS[0], "--explanation-weight", "1.0"])
    only_explanation = run_search(["search", *base[1:-1], EXPLANATIONS[0]])  # the explanation alone as the query
    assert [h["id"] for h in fused[0]["hits"]] == [h["id"] for h in only_explanation[0]["hits"]]
    assert [h["score"] for h in plain[0]["hits"]] != [h["score"] for h in fused[0]["hits"]]
    with pytest.raises(SystemExit):
        run_search([*base, "--explanation", EXPLANATIONS[0]])  # no weight given
