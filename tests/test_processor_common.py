"""transformers' own ProcessorTesterMixin against EntityCLIPProcessor, and our own checks of the same conventions.

The mixin is the installed transformers version's `tests/test_processing_common.py`, fetched at test time by
`tests/transformers_common.py`. The processor's parts are built offline the way the rest of the suite builds them
(a BPE tokenizer trained on the built-in corpus, CLIP's image preprocessing at 32 pixels) and saved in the
tester's temporary folder, from which the mixin loads them back with the Auto classes.

Skips: the mixin skips the video, audio and chat-template checks by itself (no video processor, no feature
extractor, no chat template: CLIP's own run skips the same ones). Two checks are skipped here, each with the reason
it does not apply to EntityCLIP and a pointer to the test of EntityCLIP's behaviour instead.

The functions after the class test what the mixin cannot see: the routing of each kind of keyword, the order of
precedence of saved defaults, and the explanations, EntityCLIP's extra text modality.
"""

import copy
import json
import logging
import unittest

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from entityclip_hf.processing_entityclip import EntityCLIPProcessor
from entityclip_hf.tiny_models import tiny_image_processor, train_bpe_tokenizer
from tests.transformers_common import load_common_tests

_, _, processing_common = load_common_tests()


class EntityCLIPProcessorTest(processing_common.ProcessorTesterMixin, unittest.TestCase):
    processor_class = EntityCLIPProcessor

    @classmethod
    def _setup_tokenizer(cls):
        return train_bpe_tokenizer()

    @classmethod
    def _setup_image_processor(cls):
        return tiny_image_processor(32)

    @staticmethod
    def prepare_processor_dict():
        # Values other than the defaults, so that the save / load / to_json checks see the options round-trip.
        return {"explanation_max_length": 40, "background_color": [0, 128, 255], "max_image_pixels": 50_000_000}

    @unittest.skip(
        reason="The mixin passes only text/images/videos/audio; EntityCLIP's model_input_names also lists the "
        "explanation inputs, which a call returns only when `explanations` are passed (see this module's "
        "test_model_input_names_equal_the_keys_of_a_full_call)."
    )
    def test_model_input_names(self):
        pass

    @unittest.skip(
        reason="A batch of EntityCLIP's processor is image-text pairs (image i goes with text i): it takes one image "
        "per sample, not per-sample lists of images for placeholder tokens, and a sample without an image cannot be "
        "paired (refused with an error naming the sample, tests/test_processor.py"
        "::test_mismatched_lengths_name_the_sample)."
    )
    def test_processor_text_has_no_visual(self):
        pass


# --- EntityCLIP's own checks of the same conventions: routing, saved defaults, explanations ----------------------

TEXTS = ["Angela Merkel speaks to reporters in Berlin.", "Fans at Fenway Park.", "Serena Williams in Melbourne."]
EXPLANATIONS = ["Angela Merkel was the chancellor of Germany.", None, "Serena Williams is an American tennis player."]
LONG_TEXT = " ".join(["Chancellor Angela Merkel visited Washington"] * 40)
KEYS = ["pixel_values", "input_ids", "attention_mask", "explanation_input_ids", "explanation_attention_mask"]


def _processor(tokenizer, **options):
    return EntityCLIPProcessor(tiny_image_processor(32), tokenizer, **options)


def _red_image(width=40, height=32):
    return Image.new("RGB", (width, height), (255, 0, 0))


def _unpadded_length(tokenizer, text):
    return len(tokenizer(text, truncation=True)["input_ids"])


def test_image_processor_arguments_reach_the_image_processor(tiny_processor):
    unscaled = tiny_processor(images=_red_image(), do_rescale=False, do_normalize=False)["pixel_values"]
    assert unscaled[0, 0].eq(255).all() and unscaled[0, 1:].eq(0).all()  # raw 0..255 red, not CLIP-normalised
    nested = tiny_processor(images=_red_image(), images_kwargs={"do_rescale": False, "do_normalize": False})
    assert torch.equal(nested["pixel_values"], unscaled)
    resized = tiny_processor(images=_red_image(), size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    assert resized["pixel_values"].shape == (1, 3, 48, 48)
    as_is = tiny_processor(images=_red_image(), do_resize=False, do_center_crop=False)
    assert as_is["pixel_values"].shape == (1, 3, 32, 40)


def test_tokenizer_arguments_reach_the_tokenizer(tiny_processor):
    fixed = tiny_processor(text=TEXTS, padding="max_length", max_length=30)
    assert fixed["input_ids"].shape == (3, 30)
    nested = tiny_processor(text=TEXTS, text_kwargs={"padding": "max_length", "max_length": 30})
    assert torch.equal(nested["input_ids"], fixed["input_ids"])
    cut = tiny_processor(text=[LONG_TEXT], max_length=10)
    assert cut["input_ids"].shape == (1, 10) and cut["input_ids"][0, -1] == tiny_processor.tokenizer.eos_token_id
    uncut = tiny_processor(text=[LONG_TEXT], truncation=False, return_tensors=None)
    assert len(uncut["input_ids"][0]) > 77
    without_mask = tiny_processor(text=TEXTS, return_attention_mask=False)
    assert set(without_mask.keys()) == {"input_ids"}


def test_return_tensors_flat_and_in_common_kwargs(tiny_processor):
    for call in ({"return_tensors": "np"}, {"common_kwargs": {"return_tensors": "np"}}):
        out = tiny_processor(images=[_red_image()] * 3, text=TEXTS, explanations=EXPLANATIONS, **call)
        assert sorted(out.keys()) == sorted(KEYS)
        assert all(isinstance(out[key], np.ndarray) for key in KEYS), call
    default = tiny_processor(images=[_red_image()] * 3, text=TEXTS, explanations=EXPLANATIONS)
    assert all(isinstance(default[key], torch.Tensor) for key in KEYS)  # ours: the model takes tensors


def test_sentence_transformers_style_call_with_every_kwargs_group(tiny_processor):
    """sentence-transformers (v5 path) passes all four modality groups and common_kwargs, most of them empty."""
    out = tiny_processor(
        images=[_red_image()] * 3,
        text=TEXTS,
        text_kwargs={"padding": True},
        images_kwargs={},
        audio_kwargs={},
        videos_kwargs={},
        common_kwargs={"return_tensors": "pt"},
    )
    expected = tiny_processor(images=[_red_image()] * 3, text=TEXTS)
    assert set(out.keys()) == {"pixel_values", "input_ids", "attention_mask"}
    for key in out:
        assert torch.equal(out[key], expected[key]), key


def test_saved_tokenizer_defaults_win_over_ours_and_the_call_wins_over_them(tiny_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.init_kwargs.update(padding="max_length", max_length=20)
    _processor(tokenizer).save_pretrained(tmp_path)
    loaded = EntityCLIPProcessor.from_pretrained(tmp_path)
    assert loaded(text=["Berlin"])["input_ids"].shape == (1, 20)  # the tokenizer's padding and length, not ours
    assert loaded(text=["Berlin"], explanations=["Berlin"])["explanation_input_ids"].shape == (1, 20)
    assert loaded(text=[LONG_TEXT])["input_ids"].shape == (1, 20)
    assert loaded(text=["Berlin"], padding="longest")["input_ids"].shape == (1, _unpadded_length(tokenizer, "Berlin"))
    assert loaded(text=["Berlin"], max_length=12)["input_ids"].shape == (1, 12)


def test_processor_max_length_is_saved_with_a_copy_of_the_tokenizer(tiny_tokenizer, tmp_path):
    processor = _processor(tiny_tokenizer, max_length=12)
    assert "max_length" not in tiny_tokenizer.init_kwargs  # the caller's tokenizer is left as it was
    assert _processor(tiny_tokenizer)(text=[LONG_TEXT])["input_ids"].shape == (1, 77)
    assert processor.max_length == 12
    assert processor(text=[LONG_TEXT])["input_ids"].shape == (1, 12)
    assert processor(text=[LONG_TEXT], max_length=30)["input_ids"].shape == (1, 30)
    processor.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["max_length"] == 12
    loaded = EntityCLIPProcessor.from_pretrained(tmp_path / "saved")
    assert loaded.max_length == 12 and loaded(text=[LONG_TEXT])["input_ids"].shape == (1, 12)
    # from_pretrained's kwargs reach the tokenizer: the same default, set at load time.
    _processor(tiny_tokenizer).save_pretrained(tmp_path / "plain")
    reloaded = EntityCLIPProcessor.from_pretrained(tmp_path / "plain", max_length=9)
    assert reloaded.max_length == 9 and reloaded(text=[LONG_TEXT])["input_ids"].shape == (1, 9)


def test_max_length_saved_by_version_0_1_0_moves_to_the_tokenizer(tiny_tokenizer, tmp_path, caplog):
    """entityclip-hf 0.1.0 wrote the texts' max_length into processor_config.json; it must not be dropped silently."""
    _processor(tiny_tokenizer).save_pretrained(tmp_path)
    config_file = tmp_path / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["max_length"] = 12
    config_file.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="entityclip_hf.processing_entityclip"):
        loaded = EntityCLIPProcessor.from_pretrained(tmp_path)
    assert "max_length=12 of entityclip-hf 0.1.0" in caplog.text
    assert loaded.max_length == 12 and loaded(text=[LONG_TEXT])["input_ids"].shape == (1, 12)


def test_explanation_length_options(tiny_tokenizer):
    processor = _processor(tiny_tokenizer, explanation_max_length=20)
    default = processor(text=[LONG_TEXT], explanations=[LONG_TEXT])
    assert default["input_ids"].shape == (1, 77) and default["explanation_input_ids"].shape == (1, 20)
    grouped = processor(text=[LONG_TEXT], explanations=[LONG_TEXT], explanations_kwargs={"max_length": 8})
    assert grouped["input_ids"].shape == (1, 77) and grouped["explanation_input_ids"].shape == (1, 8)
    shorthand = processor(text=[LONG_TEXT], explanations=[LONG_TEXT], explanation_max_length=10)
    assert shorthand["explanation_input_ids"].shape == (1, 10)
    # None (what the collator passes when it has no option of its own) means the processor's default.
    assert processor(explanations=[LONG_TEXT], explanation_max_length=None)["explanation_input_ids"].shape == (1, 20)
    # The explanations' own padding; the texts keep ours.
    padded = processor(text=TEXTS, explanations=EXPLANATIONS, explanations_kwargs={"padding": "max_length"})
    assert padded["explanation_input_ids"].shape == (3, 20)
    assert padded["input_ids"].shape[1] == max(_unpadded_length(tiny_tokenizer, text) for text in TEXTS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"explanation_max_length": 10, "explanations_kwargs": {"max_length": 8}},
            r"explanations' max_length was passed two times",
        ),
        ({"explanations_kwargs": {"return_tensors": "np"}}, r"`return_tensors` in `explanations_kwargs`"),
        ({"explanation_max_length": 1}, r"explanation_max_length must be None or an int >= 2"),
        ({"return_mm_token_type_ids": True}, r"`return_mm_token_type_ids=True`: EntityCLIP's texts have no"),
        ({"text_kwargs": {"padding": "longest"}, "padding": "max_length"}, r"padding was passed two times"),
    ],
)
def test_contradicting_kwargs_are_refused(tiny_processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(text=TEXTS, explanations=EXPLANATIONS, **kwargs)


def test_explanations_keep_their_mask_and_ignore_text_pairs(tiny_processor):
    without_text_mask = tiny_processor(text=TEXTS, explanations=EXPLANATIONS, return_attention_mask=False)
    assert "attention_mask" not in without_text_mask
    # The model reads an all-zero row as "no explanation": the explanations' mask is always there.
    assert without_text_mask["explanation_attention_mask"][1].sum() == 0
    assert without_text_mask["explanation_attention_mask"][0].sum() > 2
    paired = tiny_processor(text=TEXTS, explanations=EXPLANATIONS, text_pair=["Berlin"] * 3)
    alone = tiny_processor(text=TEXTS, explanations=EXPLANATIONS)
    assert not torch.equal(paired["input_ids"], alone["input_ids"])
    assert torch.equal(paired["explanation_input_ids"], alone["explanation_input_ids"])


def test_model_input_names_equal_the_keys_of_a_full_call(tiny_processor):
    """The counterpart of the mixin's test_model_input_names, with the explanations it cannot pass."""
    out = tiny_processor(images=[_red_image()] * 3, text=TEXTS, explanations=EXPLANATIONS)
    assert tiny_processor.model_input_names == KEYS
    assert list(out.keys()) == KEYS


def test_decode_and_batch_decode_use_the_tokenizer(tiny_processor):
    out = tiny_processor(text=TEXTS[:2], explanations=EXPLANATIONS[:1] + ["Fenway Park is in Boston."])
    decoded = tiny_processor.batch_decode(out["input_ids"], skip_special_tokens=True)
    assert decoded == tiny_processor.tokenizer.batch_decode(out["input_ids"], skip_special_tokens=True)
    assert decoded[0].startswith("angela merkel speaks to reporters in berlin")  # CLIP lower-cases
    explanation = tiny_processor.decode(out["explanation_input_ids"][0], skip_special_tokens=True)
    assert explanation.startswith("angela merkel was the chancellor of germany")


def test_calls_do_not_change_the_defaults_a_save_stores(tiny_processor, tmp_path):
    """The tokenizers backend keeps the last call's truncation; saved, it would become the reloaded default."""
    tiny_processor(text=[LONG_TEXT], max_length=10)
    tiny_processor(text=TEXTS, padding="max_length", max_length=30)
    tiny_processor.save_pretrained(tmp_path)
    loaded = EntityCLIPProcessor.from_pretrained(tmp_path)
    assert loaded.max_length is None
    assert loaded(text=[LONG_TEXT])["input_ids"].shape == (1, 77)
    assert loaded(text=["Berlin"])["input_ids"].shape == (1, _unpadded_length(loaded.tokenizer, "Berlin"))


def test_a_truncation_the_tokenizer_came_with_is_saved(tiny_tokenizer, tmp_path):
    """A tokenizer.json with a truncation of its own (some Hub tokenizers have one) keeps it through our save."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.backend_tokenizer.enable_truncation(max_length=20)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())["truncation"]["max_length"] == 20
    processor = _processor(CLIPTokenizer.from_pretrained(tmp_path / "tokenizer"))
    assert processor.max_length == 20
    processor(text=[LONG_TEXT], max_length=10)
    processor.save_pretrained(tmp_path / "processor")
    loaded = EntityCLIPProcessor.from_pretrained(tmp_path / "processor")
    assert loaded.max_length == 20 and loaded(text=[LONG_TEXT])["input_ids"].shape == (1, 20)
    # The live tokenizer keeps its state through the save.
    assert processor.tokenizer.backend_tokenizer.truncation["max_length"] == 10


def test_sentence_transformers_loads_a_saved_entityclip_folder(tiny_processor, tiny_clip_config, tmp_path):
    """Issue 9: SentenceTransformer(<EntityCLIP folder>) works, through the processor's kwargs groups."""
    from sentence_transformers import SentenceTransformer

    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

    torch.manual_seed(0)
    model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config)).eval()
    model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    sentence_model = SentenceTransformer(str(tmp_path), device="cpu")
    images = [_red_image(), Image.new("RGB", (32, 48), (0, 0, 255))]
    text_embeddings = sentence_model.encode(TEXTS[:2], convert_to_tensor=True)
    image_embeddings = sentence_model.encode(images, convert_to_tensor=True)
    batch = tiny_processor(images=images, text=TEXTS[:2])
    with torch.no_grad():
        text_features = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        image_features = model.get_image_features(pixel_values=batch["pixel_values"])
    # CLIPModel's features are an output object in transformers 5 (the embedding in .pooler_output).
    text_features = getattr(text_features, "pooler_output", text_features)
    image_features = getattr(image_features, "pooler_output", image_features)
    torch.testing.assert_close(text_embeddings, text_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image_embeddings, image_features, atol=1e-5, rtol=1e-5)


def test_max_length_none_in_a_call_means_the_default(tiny_tokenizer):
    """EntityCLIPCollator passes max_length=None and explanation_max_length=None when it has no option of its own."""
    processor = _processor(tiny_tokenizer, max_length=12, explanation_max_length=20)
    out = processor(text=[LONG_TEXT], explanations=[LONG_TEXT], max_length=None, explanation_max_length=None)
    assert out["input_ids"].shape == (1, 12) and out["explanation_input_ids"].shape == (1, 20)
