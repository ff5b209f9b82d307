"""transformers' own ModelTesterMixin and ConfigTester on EntityCLIPModel / EntityCLIPConfig.

The tester is built like transformers' `CLIPModelTester` (tests/models/clip/test_modeling_clip.py): the same tiny
text and vision towers, batch 12, with `return_loss=True` in the common inputs, plus explanations. The skips are
CLIP's own (with CLIP's reasons) and the few checks that cannot apply to EntityCLIP (each says why).
"""

import unittest

import pytest
import torch

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

from .transformers_common import load_common_tests

modeling_common, configuration_common, _ = load_common_tests()
ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = configuration_common.ConfigTester
floats_tensor = modeling_common.floats_tensor
ids_tensor = modeling_common.ids_tensor
random_attention_mask = modeling_common.random_attention_mask


class EntityCLIPModelTester:
    """CLIPModelTester's towers (text: 7 tokens, vocab 99; vision: 30 px, patch 2; width 32, 2 layers) + experts."""

    def __init__(self, parent, batch_size=12, seq_length=7, explanation_length=9, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.explanation_length = explanation_length
        self.is_training = is_training
        self.vocab_size = 99
        self.image_size = 30
        self.num_channels = 3
        self.num_hidden_layers = 2  # both towers: what the common tests expect in hidden states and attentions

    def get_clip_config(self):
        from transformers import CLIPConfig

        tower = dict(
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            dropout=0.1,
            attention_dropout=0.1,
            initializer_range=0.02,
        )
        text = dict(tower, vocab_size=self.vocab_size, max_position_embeddings=512)
        vision = dict(tower, image_size=self.image_size, patch_size=2, num_channels=self.num_channels)
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)

    def get_config(self):
        return EntityCLIPConfig(
            clip_config=self.get_clip_config(), num_vision_experts=2, num_text_experts=2, num_shared_experts=2
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        explanation_input_ids = ids_tensor([self.batch_size, self.explanation_length], self.vocab_size)
        explanation_attention_mask = random_attention_mask([self.batch_size, self.explanation_length])
        explanation_attention_mask[0] = 0  # one sample without an explanation
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return (
            self.get_config(),
            input_ids,
            attention_mask,
            pixel_values,
            explanation_input_ids,
            explanation_attention_mask,
        )

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask, pixel_values, explanation_ids, explanation_mask = (
            self.prepare_config_and_inputs()
        )
        return config, {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "explanation_input_ids": explanation_ids,
            "explanation_attention_mask": explanation_mask,
            "return_loss": True,
        }

    def create_and_check_model(self, config, input_ids, attention_mask, pixel_values, *_):
        model = EntityCLIPModel(config).eval()
        with torch.no_grad():
            result = model(input_ids, pixel_values, attention_mask)
        self.parent.assertEqual(result.logits_per_image.shape, (self.batch_size, self.batch_size))
        self.parent.assertEqual(result.logits_per_text.shape, (self.batch_size, self.batch_size))


class EntityCLIPModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (EntityCLIPModel,)
    additional_model_inputs = ["pixel_values", "explanation_input_ids", "explanation_attention_mask"]
    fx_compatible = False
    test_head_masking = False
    test_pruning = False
    test_resize_embeddings = False
    test_attention_outputs = False
    test_torchscript = False
    _is_composite = True
    # The configuration file carries its addition year (2026): transformers checks every weight's init.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = EntityCLIPModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=EntityCLIPConfig,
            has_text_modality=False,
            common_properties=["projection_dim", "num_vision_experts", "num_text_experts", "num_shared_experts"],
        )

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_config(self):
        self.config_tester.run_common_tests()

    # ---- CLIP's own skips (CLIPModelTest), with CLIP's reasons
    @unittest.skip(reason="Hidden_states is tested in individual model tests")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="Inputs_embeds is tested in individual model tests")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Retain_grad is tested in individual model tests")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason="CLIPModel does not have input/output embeddings")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(reason="CLIP text tower has two attention masks: `causal_attention_mask` and `attention_mask`")
    def test_sdpa_can_dispatch_on_flash(self):
        pass

    @unittest.skip(reason="CLIP model can't be compiled dynamic, error in clip_loss`")
    def test_sdpa_can_compile_dynamic(self):
        pass


@pytest.mark.parametrize("return_dict", [True, False])
def test_get_features_match_clipmodel(return_dict):
    """get_*_features return what CLIPModel's return: the same object type (or tuple), the same tensors."""
    from transformers import CLIPModel

    tester = EntityCLIPModelTester(None)
    config, input_ids, attention_mask, pixel_values, *_ = tester.prepare_config_and_inputs()
    torch.manual_seed(0)
    model = EntityCLIPModel(config).eval()
    clip = CLIPModel(config.clip_config).eval()
    clip.load_state_dict(model.clip.state_dict())
    kwargs = dict(return_dict=return_dict, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        ours = model.get_text_features(input_ids, attention_mask, **kwargs)
        theirs = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        ours_image = model.get_image_features(pixel_values, **kwargs)
        theirs_image = clip.get_image_features(pixel_values=pixel_values, **kwargs)
    for a, b in ((ours, theirs), (ours_image, theirs_image)):
        assert type(a) is type(b)
        flat_a = a.to_tuple() if return_dict else a
        flat_b = b.to_tuple() if return_dict else b
        assert len(flat_a) == len(flat_b) >= 3  # last hidden state, pooled embedding, hidden states (+ attentions)
        torch.testing.assert_close(flat_a, flat_b, rtol=0, atol=0)
