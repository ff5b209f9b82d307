"""EntityCLIP is a CLIP wherever the ecosystem expects one: pipelines, remote code, export, sentence-transformers, ONNX,
torch.export. Each row of the README's "works with" table is backed by a test here (or named in its docstring)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, pipeline

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel
from entityclip_hf.export import IMAGE_ONNX, TEXT_ONNX, export_onnx
from entityclip_hf.export import main as export_main

LABELS = ["a navy square", "a gold circle", "Angela Merkel in Aachen"]


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (48, 40), "navy"), Image.new("RGB", (40, 48), "gold")]


@pytest.fixture(scope="module")
def saved(tiny_processor, tiny_clip_config, tmp_path_factory):
    """A trained-looking EntityCLIP folder (random weights, real processor) and its plain-CLIP export."""
    torch.manual_seed(0)
    model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config)).eval()
    folder = tmp_path_factory.mktemp("entityclip")
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    exported = tmp_path_factory.mktemp("exported")
    assert export_main([str(folder), str(exported)]) == 0
    return model, folder, exported


def scores(results):
    return {entry["label"]: entry["score"] for entry in results}


def test_export_is_a_plain_clipmodel_with_identical_features_and_forward(saved, tiny_processor, images):
    model, _, exported = saved
    names = {path.name for path in exported.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= names
    assert not any(name.endswith(".py") for name in names)  # no remote code: transformers' own CLIP
    clip = CLIPModel.from_pretrained(exported).eval()
    batch = {**tiny_processor(images=images), **tiny_processor(text=LABELS)}
    texts = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        for ours, theirs in (
            (model.get_image_features(batch["pixel_values"]), clip.get_image_features(pixel_values=batch["pixel_values"])),
            (model.get_text_features(**texts), clip.get_text_features(**texts)),
        ):
            torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, rtol=0, atol=0)
        ours, theirs = model(pixel_values=batch["pixel_values"], **texts), clip(pixel_values=batch["pixel_values"], **texts)
    assert ours.logits_per_image.shape == (2, 3)
    torch.testing.assert_close(ours.logits_per_image, theirs.logits_per_image, rtol=0, atol=0)


def test_zero_shot_pipeline_on_the_entityclip_folder_scores_as_the_exported_clip(saved, images):
    _, folder, exported = saved
    ours = pipeline("zero-shot-image-classification", model=str(folder), device="cpu")
    theirs = pipeline("zero-shot-image-classification", model=str(exported), device="cpu")
    assert isinstance(ours.model, EntityCLIPModel) and isinstance(theirs.model, CLIPModel)
    for image in images:
        a, b = scores(ours(image, candidate_labels=LABELS)), scores(theirs(image, candidate_labels=LABELS))
        assert set(a) == set(LABELS)
        for label in LABELS:
            assert a[label] == pytest.approx(b[label], abs=1e-6)


FRESH_PIPELINE = textwrap.dedent(
    """
    import json, sys
    sys.modules["entityclip_hf"] = None  # the package is not importable in this process
    from PIL import Image
    from transformers import pipeline

    folder, labels = sys.argv[1], json.loads(sys.argv[2])
    classify = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True, device="cpu")
    assert type(classify.model).__module__.startswith("transformers_modules"), type(classify.model).__module__
    results = classify(Image.new("RGB", (48, 40), "navy"), candidate_labels=labels)
    print(json.dumps({entry["label"]: entry["score"] for entry in results}))
    """
)


def test_zero_shot_pipeline_with_remote_code_in_a_process_without_the_package(saved, images, tmp_path):
    import json

    _, folder, exported = saved
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PIPELINE)
    done = subprocess.run(
        [sys.executable, str(script), str(folder), json.dumps(LABELS)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    remote = json.loads(done.stdout.strip().splitlines()[-1])
    expected = scores(pipeline("zero-shot-image-classification", model=str(exported))(images[0], candidate_labels=LABELS))
    for label in LABELS:
        assert remote[label] == pytest.approx(expected[label], abs=1e-6)


def _our_embeddings(model, processor, images, texts):
    batch = processor(images=images, text=texts)
    with torch.no_grad():
        image_embeds = model.get_image_features(batch["pixel_values"]).pooler_output
        text_embeds = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
    return image_embeds, text_embeds


@pytest.mark.parametrize("which", ["exported", "entityclip"])
def test_sentence_transformers_embeds_images_and_texts_like_the_model(saved, tiny_processor, images, which):
    sentence_transformers = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    model, folder, exported = saved
    encoder = sentence_transformers.SentenceTransformer(str(exported if which == "exported" else folder), device="cpu")
    image_embeds, text_embeds = _our_embeddings(model, tiny_processor, images, LABELS[:2])
    st_images = encoder.encode(images, convert_to_tensor=True)
    st_texts = encoder.encode(LABELS[:2], convert_to_tensor=True)
    for ours, theirs in ((image_embeds, st_images), (text_embeds, st_texts)):
        cosine = torch.nn.functional.cosine_similarity(ours, theirs.float(), dim=-1)
        torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=0, atol=1e-5)


def test_onnx_towers_match_the_model(saved, tiny_processor, images, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript")
    model, _, _ = saved
    paths = export_onnx(model, tmp_path)
    assert {path.name for path in paths.values()} == {IMAGE_ONNX, TEXT_ONNX}
    # Other batch sizes and text lengths than the export's sample inputs (dynamic axes).
    texts = ["Merkel", "Angela Merkel meets Emmanuel Macron in Aachen on a rainy Tuesday", "a gold circle"]
    batch = tiny_processor(images=images + images[:1], text=texts)
    image_embeds, text_embeds = _our_embeddings(model, tiny_processor, images + images[:1], texts)
    image_session = onnxruntime.InferenceSession(str(paths["image"]))
    text_session = onnxruntime.InferenceSession(str(paths["text"]))
    onnx_images = image_session.run(None, {"pixel_values": batch["pixel_values"].numpy()})[0]
    onnx_texts = text_session.run(
        None, {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
    )[0]
    np.testing.assert_allclose(onnx_images, image_embeds.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(onnx_texts, text_embeds.numpy(), rtol=1e-5, atol=1e-5)


def test_export_cli_writes_onnx_and_names_a_missing_folder(saved, tmp_path, capsys):
    pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript")
    _, folder, _ = saved
    assert export_main([str(folder), str(tmp_path / "out"), "--onnx"]) == 0
    assert {IMAGE_ONNX, TEXT_ONNX} <= {path.name for path in (tmp_path / "out").iterdir()}
    with pytest.raises(SystemExit) as raised:
        export_main([str(tmp_path / "nowhere"), str(tmp_path / "out2")])
    assert raised.value.code == 2 and "nowhere" in capsys.readouterr().err


def test_torch_export_of_the_clip_forward_and_features(saved, tiny_processor, images):
    model, _, _ = saved
    batch = {**tiny_processor(images=images), **tiny_processor(text=LABELS)}
    inputs = {key: batch[key] for key in ("input_ids", "pixel_values", "attention_mask")}  # 2 images x 3 texts
    program = torch.export.export(model, args=(), kwargs=inputs)
    with torch.no_grad():
        expected = model(**inputs)
        exported = program.module()(**inputs)
    torch.testing.assert_close(exported["logits_per_image"], expected.logits_per_image)

    class Images(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner.get_image_features(pixel_values).pooler_output

    program = torch.export.export(Images(model), args=(inputs["pixel_values"],))
    with torch.no_grad():
        torch.testing.assert_close(
            program.module()(inputs["pixel_values"]), model.get_image_features(inputs["pixel_values"]).pooler_output
        )


def test_from_pretrained_of_a_plain_clip_checkpoint_starts_entityclip(saved):
    model, _, exported = saved
    started = EntityCLIPModel.from_pretrained(exported)  # a CLIP folder: all CLIP weights, new heads
    assert isinstance(started, EntityCLIPModel)
    for name, parameter in model.clip.state_dict().items():
        torch.testing.assert_close(started.clip.state_dict()[name], parameter, rtol=0, atol=0)
