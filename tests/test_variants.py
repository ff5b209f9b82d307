"""The opt-in variants that carry explanations into retrieval and reranking: config fields, losses, model paths."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel
from entityclip_hf.losses import pairwise_contrastive_loss
from entityclip_hf.modeling_variants import fused_text_embeddings

VARIANT_FIELDS = {
    "explanation_contrastive_weight": 0.0,
    "explanation_fusion_weight": 0.5,
    "expert_loss_reads_candidate_explanation": False,
    "itm_cross_attention": False,
    "itm_negatives_from_fused_texts": False,
}
TEXTS = ["Mara Voss speaks.", "A view of Elsra.", "Kestrel Bank reports.", "The Lumen Festival opens."]
EXPLANATIONS = ["Mara Voss wears a red jacket.", None, "Kestrel Bank has a gold logo.", "A purple stage."]


@pytest.fixture(scope="module")
def batch(tiny_processor):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in TEXTS]
    return tiny_processor(images=images, text=TEXTS, explanations=EXPLANATIONS, return_tensors="pt")


def model_with(tiny_clip_config, **fields):
    torch.manual_seed(0)
    return EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config, **fields))


def test_variant_fields_default_to_the_paper_and_round_trip(tiny_clip_config):
    config = EntityCLIPConfig(clip_config=tiny_clip_config)
    assert {name: getattr(config, name) for name in VARIANT_FIELDS} == VARIANT_FIELDS
    on = EntityCLIPConfig(
        clip_config=tiny_clip_config, explanation_contrastive_weight=0.5, explanation_fusion_weight=0.3,
        expert_loss_reads_candidate_explanation=True, itm_cross_attention=True, itm_negatives_from_fused_texts=True,
    )  # fmt: skip
    again = EntityCLIPConfig.from_dict(on.to_dict())
    assert {name: getattr(again, name) for name in VARIANT_FIELDS} == {
        name: getattr(on, name) for name in VARIANT_FIELDS
    }
    for name, bad in (("explanation_fusion_weight", 1.5), ("explanation_contrastive_weight", -1.0),
                      ("itm_cross_attention", "yes"), ("expert_loss_reads_candidate_explanation", 1),
                      ("itm_negatives_from_fused_texts", "true")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            EntityCLIPConfig(clip_config=tiny_clip_config, **{name: bad})


def test_paper_model_has_no_variant_layers_and_the_same_loss(tiny_clip_config, batch):
    paper = model_with(tiny_clip_config)
    assert paper.itm_cross_modal is None
    output = paper(**batch, return_loss=True)
    assert output.explanation_contrastive_loss is None
    expected = output.contrastive_loss + 0.1 * output.expert_contrastive_loss + 0.1 * output.itm_loss
    torch.testing.assert_close(output.loss, expected)


def test_pairwise_contrastive_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    rows = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.exp(3) / (math.exp(1) + math.exp(3)))) / 2
    cols = -(math.log(math.exp(2) / (math.exp(2) + math.exp(1))) + math.log(math.exp(3) / (1 + math.exp(3)))) / 2
    assert float(pairwise_contrastive_loss(logits)) == pytest.approx((rows + cols) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="square"):
        pairwise_contrastive_loss(torch.zeros(2, 3))


def test_fused_text_embeddings_by_hand():
    text = torch.tensor([[3.0, 4.0], [2.0, 0.0]])
    explanation = torch.tensor([[0.0, 5.0], [0.0, 7.0]])
    fused = fused_text_embeddings(text, explanation, torch.tensor([True, False]), 0.5)
    by_hand = torch.tensor([0.3, 0.9]) / math.hypot(0.3, 0.9)
    torch.testing.assert_close(fused, torch.stack([by_hand, torch.tensor([1.0, 0.0])]))


def test_explanation_contrastive_term_is_added_with_its_weight(tiny_clip_config, batch):
    model = model_with(tiny_clip_config, explanation_contrastive_weight=0.7, explanation_fusion_weight=0.4)
    output = model(**batch, return_loss=True)
    paper = output.contrastive_loss + 0.1 * output.expert_contrastive_loss + 0.1 * output.itm_loss
    torch.testing.assert_close(output.loss, paper + 0.7 * output.explanation_contrastive_loss)
    # By hand: the CLIP image embeddings against normalize(0.6 t + 0.4 e) (t alone for the text without one).
    with torch.no_grad():
        text = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
        present = [0, 2, 3]
        explanation_ids = batch["explanation_input_ids"][present]
        explanation_mask = batch["explanation_attention_mask"][present]
        length = int(explanation_mask.sum(1).max())
        explained = model.get_text_features(explanation_ids[:, :length], explanation_mask[:, :length]).pooler_output
    fused = F.normalize(text, dim=-1)
    fused[present] = F.normalize(0.6 * fused[present] + 0.4 * F.normalize(explained, dim=-1), dim=-1)
    scale = model.clip.logit_scale.exp()
    logits = scale * output.image_embeds @ fused.t()
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(output.explanation_contrastive_loss, expected, atol=1e-5, rtol=1e-5)


def test_leak_free_expert_loss_reads_the_candidate_explanation(tiny_clip_config, batch):
    model = model_with(tiny_clip_config, expert_loss_reads_candidate_explanation=True)
    model.eval()  # deterministic ITM negatives
    output = model(**batch, return_loss=True)
    # Its diagonal is the paper's positive pair (image i with its own explanation): V*_i . T*_i.
    positive = (output.expert_image_embeds * output.expert_text_embeds).sum(-1)
    from entityclip_hf.modeling_variants import candidate_explanation_expert_logits

    image, _ = model._image_token_features(batch["pixel_values"])
    explanation, has_explanation = model._explanation_token_features(
        batch["explanation_input_ids"], batch["explanation_attention_mask"], 4
    )
    keys = model.shared_experts.keys_values(explanation.tokens, explanation.key_mask)
    vision = model._run_experts(model.vision_experts, image, image)
    logits, _ = candidate_explanation_expert_logits(
        model.shared_experts, model.image_gate, image, vision, keys, has_explanation, output.expert_text_embeds,
        model.clip.logit_scale,
    )  # fmt: skip
    scale = model.clip.logit_scale.exp()
    torch.testing.assert_close(logits.diagonal() / scale, positive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.expert_contrastive_loss, pairwise_contrastive_loss(logits))
    # Off the diagonal, image 0 read text 2's explanation: not its own expert embedding.
    assert not torch.allclose(logits[0, 2] / scale, output.expert_image_embeds[0] @ output.expert_text_embeds[2])
    # The paper's loss on the same model differs: it scores V*_i (own explanation) against every T*_j.
    paper = model_with(tiny_clip_config).eval()(**batch, return_loss=True)
    assert not torch.allclose(paper.expert_contrastive_loss, output.expert_contrastive_loss)


def test_cross_attention_itm_trains_and_saves(tiny_clip_config, batch, tmp_path):
    model = model_with(tiny_clip_config, itm_cross_attention=True)
    output = model(**batch, return_loss=True)
    output.loss.backward()
    assert model.itm_cross_modal.block.query_weight.grad.abs().sum() > 0, "the block learns from the ITM loss"
    model.save_pretrained(tmp_path)
    reloaded = EntityCLIPModel.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.match_probability(**batch), model.match_probability(**batch))
    assert (tmp_path / "modeling_variants.py").exists(), "copied beside the weights for trust_remote_code"


@pytest.mark.parametrize("from_fused", [False, True])
def test_itm_negatives_are_mined_from_the_similarity_retrieval_reranks(tiny_clip_config, batch, from_fused):
    from unittest import mock

    from entityclip_hf import modeling_entityclip

    model = model_with(
        tiny_clip_config, itm_negatives_from_fused_texts=from_fused, explanation_fusion_weight=0.4
    ).eval()
    with mock.patch.object(
        modeling_entityclip, "hardest_negatives", wraps=modeling_entityclip.hardest_negatives
    ) as mined:
        model(**batch, return_loss=True)
    similarity = mined.call_args_list[0].args[0]  # the images' negatives: rows are images
    with torch.no_grad():
        image = F.normalize(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, dim=-1)
        text = model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
        if from_fused:
            has = batch["explanation_attention_mask"].bool().any(dim=1)
            explanation = model.get_text_features(
                input_ids=batch["explanation_input_ids"], attention_mask=batch["explanation_attention_mask"]
            ).pooler_output
            text = fused_text_embeddings(text, explanation, has, 0.4)
        expected = model.clip.logit_scale.exp() * image @ F.normalize(text, dim=-1).T
    # Rows without an explanation keep the text's similarity; the others move.
    torch.testing.assert_close(similarity, expected, rtol=1e-4, atol=1e-4)
