"""Saving and loading: safetensors round trips, Auto classes, trust_remote_code in a fresh process, CLIP checkpoints."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoProcessor, CLIPModel

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel, EntityCLIPProcessor

from .test_modeling import EXPLANATIONS, TEXTS, make_batch

OUTPUT_NAMES = ("logits_per_image", "expert_image_embeds", "expert_text_embeds", "itm_logits")


@pytest.fixture
def model(tiny_clip_config):
    torch.manual_seed(0)
    return EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config, num_text_experts=3)).eval()


def outputs_of(model, batch):
    with torch.no_grad():
        out = model(**batch, return_loss=True)  # eval mode: deterministic negatives, every output present
    return {name: getattr(out, name) for name in OUTPUT_NAMES}


def assert_same_outputs(a, b):
    for name in OUTPUT_NAMES:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_save_pretrained_writes_safetensors_auto_map_and_code(model, tmp_path):
    model.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    # The code files that trust_remote_code users need, found through the relative imports.
    assert {
        "configuration_entityclip.py",
        "modeling_entityclip.py",
        "modeling_experts.py",
        "modeling_checks.py",
        "losses.py",
    } <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "entityclip"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_entityclip.EntityCLIPConfig",
        "AutoModel": "modeling_entityclip.EntityCLIPModel",
        "AutoModelForZeroShotImageClassification": "modeling_entityclip.EntityCLIPModel",
    }


def test_round_trip_gives_identical_outputs(model, tiny_tokenizer, tmp_path):
    batch = make_batch(tiny_tokenizer, model.config)
    model.save_pretrained(tmp_path)
    for loader in (EntityCLIPModel, AutoModel):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, EntityCLIPModel)
        assert loaded.config.num_text_experts == 3
        assert_same_outputs(outputs_of(model, batch), outputs_of(loaded, batch))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EntityCLIPConfig)


def test_processor_registers_with_auto_processor(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    EntityCLIPConfig().save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, EntityCLIPProcessor)


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    sys.modules["entityclip_hf"] = None  # this process cannot import the package
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoProcessor

    folder, inputs_file, outputs_file = sys.argv[1:4]
    try:
        import entityclip_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the package must not be importable here")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__name__ == "EntityCLIPProcessor", type(processor)
    batch = load_file(inputs_file)
    texts = {"input_ids": batch["input_ids"]}
    encoded = processor(text=["Merkel meets Macron in Aachen."], explanations=[None], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, return_loss=True)
        features = model.get_text_features(encoded["input_ids"], encoded["attention_mask"]).pooler_output
    result = {name: getattr(out, name).contiguous() for name in sys.argv[4].split(",")}
    result["processed_input_ids"] = encoded["input_ids"]
    result["processed_features"] = features
    save_file(result, outputs_file)
    """
)


def test_fresh_process_without_the_package_loads_with_trust_remote_code(
    model, tiny_processor, tiny_tokenizer, tmp_path
):
    folder = tmp_path / "entityclip-tiny"
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    assert "processing_entityclip.py" in {p.name for p in folder.iterdir()}
    batch = make_batch(tiny_tokenizer, model.config, TEXTS, EXPLANATIONS[:3] + [None])
    save_file({k: v.contiguous() for k, v in batch.items()}, tmp_path / "inputs.safetensors")
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(folder),
            str(tmp_path / "inputs.safetensors"),
            str(tmp_path / "out.safetensors"),
            ",".join(OUTPUT_NAMES),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = load_file(tmp_path / "out.safetensors")
    assert_same_outputs(outputs_of(model, batch), fresh)
    encoded = tiny_processor(text=["Merkel meets Macron in Aachen."], explanations=[None], return_tensors="pt")
    torch.testing.assert_close(fresh["processed_input_ids"], encoded["input_ids"], rtol=0, atol=0)
    with torch.no_grad():
        features = model.get_text_features(encoded["input_ids"], encoded["attention_mask"]).pooler_output
    # Another process may split a 1-row matmul across threads differently: equal up to float rounding.
    torch.testing.assert_close(fresh["processed_features"], features, rtol=1e-5, atol=1e-6)


@pytest.fixture
def clip_checkpoint(tiny_clip_config, tmp_path):
    torch.manual_seed(7)
    clip = CLIPModel(tiny_clip_config)
    folder = tmp_path / "tiny-clip"
    clip.save_pretrained(folder)
    return clip, folder


def test_from_clip_pretrained_keeps_clip_weights_bit_for_bit(clip_checkpoint):
    clip, folder = clip_checkpoint
    model, info = EntityCLIPModel.from_clip_pretrained(folder, beta=0.5, num_shared_experts=2, output_loading_info=True)
    assert model.config.beta == 0.5 and model.config.num_shared_experts == 2
    assert model.config.clip_config.projection_dim == clip.config.projection_dim
    clip_state = clip.state_dict()
    for name, tensor in model.clip.state_dict().items():
        assert torch.equal(tensor, clip_state[name]), name
    new = set(info["missing_keys"])
    own = {name for name in model.state_dict() if not name.startswith("clip.")}
    assert new == own, "exactly the EntityCLIP layers are reported as newly initialised"
    assert not info["unexpected_keys"]
    # Newly initialised layers are really initialised (not left as torch.empty garbage).
    assert torch.isfinite(model.vision_experts.query_weight).all()
    assert model.vision_experts.query_weight.std() > 0


def test_from_clip_pretrained_returns_a_model_whose_features_equal_clip(clip_checkpoint, tiny_tokenizer):
    clip, folder = clip_checkpoint
    model = EntityCLIPModel.from_clip_pretrained(folder).eval()
    batch = make_batch(tiny_tokenizer, model.config)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(batch["pixel_values"]).pooler_output,
            clip.eval().get_image_features(pixel_values=batch["pixel_values"]).pooler_output,
            rtol=0,
            atol=0,
        )


def test_from_clip_pretrained_refuses_a_non_clip_checkpoint(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a CLIP checkpoint"):
        EntityCLIPModel.from_clip_pretrained(tmp_path)


def test_from_clip_pretrained_refuses_a_missing_folder(tmp_path):
    with pytest.raises(OSError):
        EntityCLIPModel.from_clip_pretrained(tmp_path / "nowhere", local_files_only=True)
