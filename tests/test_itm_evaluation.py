"""ITM AUC and GI-ITM reranking recalls (entityclip_hf.itm_evaluation) on hand-made cases."""

import pytest
import torch

from entityclip_hf.itm_evaluation import (
    PairScorer,
    fused_rerank_scores,
    itm_auc,
    rerank_recalls,
    rerank_recalls_by_clip_weight,
    roc_auc,
)


def test_roc_auc_counts_ties_half():
    assert roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert roc_auc([0.1], [0.9]) == 0.0
    assert roc_auc([0.5, 0.9], [0.5, 0.1]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    with pytest.raises(ValueError):
        roc_auc([], [0.1])


class TableScorer:
    """A scorer whose match probability of (image i, text j) is table[i, j]."""

    def __init__(self, table):
        self.table = table

    def __len__(self):
        return self.table.shape[0]

    def __call__(self, image_rows, text_rows):
        return self.table[image_rows, text_rows]


def test_itm_auc_of_a_perfect_and_of_a_blind_head():
    assert itm_auc(TableScorer(torch.eye(5))) == 1.0
    assert itm_auc(TableScorer(torch.full((5, 5), 0.5))) == 0.5


def test_rerank_recalls_by_hand():
    # 3 pairs. Cosines (images x texts): image 0 prefers text 1 (.8 vs .6), image 1 text 0, image 2 text 2.
    image = torch.eye(3)
    text = torch.tensor([[0.6, 0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    # The ITM head knows the truth: probability 1 on the diagonal.
    result = rerank_recalls(TableScorer(torch.eye(3)), image, text, top_k=2, ks=(1, 2))
    assert result["clip_i2t_R@1"] == pytest.approx(100 / 3) and result["clip_i2t_R@2"] == 100.0
    assert result["clip_t2i_R@1"] == pytest.approx(100 / 3)
    assert result["rerank_i2t_R@1"] == 100.0 and result["rerank_t2i_R@1"] == 100.0, "true pairs were in the top 2"
    # A head that prefers the wrong candidate lowers R@1; positives outside the top-k keep their CLIP rank.
    wrong = TableScorer(1 - torch.eye(3))
    worse = rerank_recalls(wrong, image, text, top_k=2, ks=(1, 2))
    assert worse["rerank_i2t_R@1"] == 0.0 and worse["rerank_i2t_R@2"] == 100.0
    assert worse["rerank_top_k"] == 2


def test_fused_rerank_scores_keep_the_first_stage_where_gi_itm_is_unsure():
    # 2 candidates: the first stage prefers candidate 0 (logit 30 vs 28); GI-ITM prefers 1, sure (0.9) or unsure (0.55).
    clip_logits = torch.tensor([[30.0, 28.0]])
    sure, unsure = torch.tensor([[0.1, 0.9]]), torch.tensor([[0.45, 0.55]])
    assert fused_rerank_scores(sure, clip_logits, None).argmax() == 1, "GI-ITM alone"
    assert fused_rerank_scores(sure, clip_logits, 0.5).argmax() == 1, "log-odds 2.2 - (-2.2) > 0.5 x 2"
    assert fused_rerank_scores(unsure, clip_logits, 0.5).argmax() == 0, "log-odds 0.2 - (-0.2) < 0.5 x 2"
    assert fused_rerank_scores(sure, clip_logits, 100.0).argmax() == 0, "a large weight is the CLIP order"
    assert torch.isfinite(fused_rerank_scores(torch.tensor([[1.0, 0.0]]), clip_logits, 1.0)).all()
    with pytest.raises(ValueError, match="clip_weight"):
        fused_rerank_scores(sure, clip_logits, -1.0)


def test_rerank_recalls_by_clip_weight_by_hand():
    # Image 0 prefers text 1 (cosine .8 vs .6). The head is unsure but right on image 0 and text 0 (0.6 vs 0.4).
    image = torch.eye(3)
    text = torch.tensor([[0.6, 0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    table = torch.full((3, 3), 0.4)
    table.fill_diagonal_(0.6)
    results = rerank_recalls_by_clip_weight(
        TableScorer(table), image, text, [None, 1.0, 10.0], top_k=2, logit_scale=10.0
    )
    # log-odds gap 0.81; CLIP logit gap 10 x 0.2 = 2: weight 1 keeps CLIP's (wrong) order, weight 0.1 would not.
    assert results[None]["rerank_i2t_R@1"] == 100.0
    assert results[1.0]["rerank_i2t_R@1"] == results[1.0]["clip_i2t_R@1"] == pytest.approx(100 / 3)
    assert results[10.0]["rerank_t2i_R@1"] == pytest.approx(100 / 3) and results[10.0]["clip_weight"] == 10.0
    low = rerank_recalls(TableScorer(table), image, text, top_k=2, clip_weight=0.1, logit_scale=10.0)
    assert low["rerank_i2t_R@1"] == 100.0 and low["clip_weight"] == 0.1


def test_pair_scorer_scores_index_pairs_with_explanations(tiny_clip_config, tiny_processor):
    import datasets
    import numpy as np
    from PIL import Image

    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

    torch.manual_seed(0)
    model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config)).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    texts = ["Mara Voss speaks.", "A view of Elsra.", "Kestrel Bank reports."]
    explanations = ["Mara Voss wears red.", None, "Kestrel Bank has a logo."]
    data = datasets.Dataset.from_dict({"image": images, "text": texts, "explanation": explanations})
    scorer = PairScorer.from_dataset(model, tiny_processor, data, batch_size=2)
    scores = scorer(torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 2]))
    inputs = tiny_processor(images=[images[0]], text=[texts[2]], explanations=[explanations[2]], return_tensors="pt")
    with torch.no_grad():
        expected = model.match_probability(**inputs)
    torch.testing.assert_close(scores[3:], expected, atol=1e-5, rtol=1e-4)
    assert scores.shape == (4,) and ((scores > 0) & (scores < 1)).all()
