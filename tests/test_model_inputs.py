"""Bad inputs to the model and to loading get a ValueError/OSError naming the argument or file, not a torch crash."""

import json

import pytest
import torch

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

from .test_modeling import make_batch


@pytest.fixture(scope="module")
def model(tiny_clip_config):
    torch.manual_seed(0)
    return EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config)).eval()


@pytest.fixture
def batch(model, tiny_tokenizer):
    return make_batch(tiny_tokenizer, model.config)


def _vocab(model):
    return model.config.clip_config.text_config.vocab_size


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b, m: b.update(attention_mask=b["attention_mask"][:3]), r"`attention_mask` has shape \(3, "),
        (lambda b, m: b.update(attention_mask=b["attention_mask"][:, :-1]), r"`attention_mask` has shape .* must match"),
        (
            lambda b, m: b.update(explanation_attention_mask=b["explanation_attention_mask"][:2]),
            r"`explanation_attention_mask` has shape \(2, ",
        ),
        (lambda b, m: b["input_ids"].__setitem__((0, 1), _vocab(m)), r"`input_ids` holds ids .* outside the vocabulary"),
        (lambda b, m: b["input_ids"].__setitem__((1, 1), -1), r"`input_ids` holds ids -1\.\..*outside the vocabulary"),
        (
            lambda b, m: b["explanation_input_ids"].__setitem__((0, 1), _vocab(m) + 5),
            r"`explanation_input_ids` holds ids",
        ),
        (lambda b, m: b.update(input_ids=b["input_ids"][0], attention_mask=None), r"`input_ids` must be 2-D.*shape \(\d+,\)"),
        (lambda b, m: b.update(input_ids=b["input_ids"].float()), r"`input_ids` must hold integer token ids.*float32"),
        (lambda b, m: b.update(pixel_values=b["pixel_values"][:, :1]), r"`pixel_values` must be \[batch_size, 3,"),
        (lambda b, m: b.update(pixel_values=b["pixel_values"][0]), r"`pixel_values` must be \[batch_size, 3,"),
        (
            lambda b, m: b.update(pixel_values=(b["pixel_values"] * 50 + 128).clamp(0, 255).to(torch.uint8)),
            r"raw uint8 pixels .* processor",
        ),
        (
            lambda b, m: b.update(
                input_ids=b["input_ids"][:0],
                attention_mask=b["attention_mask"][:0],
                pixel_values=b["pixel_values"][:0],
                explanation_input_ids=None,
                explanation_attention_mask=None,
            ),
            r"empty batch",
        ),
        (lambda b, m: b.update(explanation_input_ids=None), r"`explanation_attention_mask` was given without"),
    ],
)
@pytest.mark.parametrize("return_loss", [False, True])
def test_bad_forward_inputs_name_the_argument(model, batch, change, message, return_loss):
    change(batch, model)
    with pytest.raises(ValueError, match=message):
        model(**batch, return_loss=return_loss)


def test_feature_methods_check_their_inputs(model, batch):
    with pytest.raises(ValueError, match="`input_ids` must be 2-D"):
        model.get_text_features(batch["input_ids"][0])
    with pytest.raises(ValueError, match="raw uint8 pixels"):
        model.get_image_features(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_paired_forward_needs_pairs_but_clip_forward_does_not(model, batch):
    images = batch["pixel_values"][:3]
    texts = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert model(pixel_values=images, **texts).logits_per_image.shape == (3, 4)
    with pytest.raises(ValueError, match="3 images and 4 texts"):
        model(pixel_values=images, **texts, return_loss=True)


def test_a_corrupt_weights_file_is_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\xff" * 16 + weights.read_bytes()[:64])
    with pytest.raises(OSError, match=r"model\.safetensors: not a valid safetensors file"):
        EntityCLIPModel.from_pretrained(tmp_path)


def test_a_config_without_clip_config_is_refused_naming_the_file(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["clip_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json has no `clip_config`"):
        EntityCLIPModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no `clip_config`"):
        EntityCLIPConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("path", ["/no/such/folder", "./missing-model", "runs/a/best"])
def test_a_missing_folder_is_reported_as_missing(path):
    with pytest.raises(OSError, match="model folder not found"):
        EntityCLIPModel.from_pretrained(path)
