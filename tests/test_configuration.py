"""EntityCLIPConfig: nested CLIP sub-config, exact round trips, validation of every hyper-parameter."""

import math

import pytest
from transformers import AutoConfig, CLIPConfig

from entityclip_hf import EntityCLIPConfig


def test_defaults_follow_the_paper():
    config = EntityCLIPConfig()
    assert (config.num_vision_experts, config.num_shared_experts, config.num_text_experts) == (4, 4, 4)
    assert config.beta == 0.1 and config.gamma == 0.1
    assert config.expert_num_heads == 1 and config.expert_mlp_ratio == 4.0
    assert config.use_hard_negatives is True
    assert math.isclose(config.logit_scale_max, math.log(100))
    assert isinstance(config.clip_config, CLIPConfig)


@pytest.mark.parametrize("as_dict", [False, True])
def test_clip_config_accepted_as_config_or_dict(tiny_clip_config, as_dict):
    clip_config = tiny_clip_config.to_dict() if as_dict else tiny_clip_config
    config = EntityCLIPConfig(clip_config=clip_config, beta=0.3)
    assert isinstance(config.clip_config, CLIPConfig)
    assert config.clip_config.projection_dim == tiny_clip_config.projection_dim
    assert config.clip_config.text_config.eos_token_id == tiny_clip_config.text_config.eos_token_id


def test_dict_round_trip_is_exact(tiny_clip_config):
    config = EntityCLIPConfig(clip_config=tiny_clip_config, num_shared_experts=2, gamma=0.5, use_hard_negatives=False)
    as_dict = config.to_dict()
    again = EntityCLIPConfig.from_dict(as_dict)
    assert again.to_dict() == as_dict
    assert again.num_shared_experts == 2 and again.gamma == 0.5 and again.use_hard_negatives is False


def test_save_load_and_auto_config(tiny_clip_config, tmp_path):
    config = EntityCLIPConfig(clip_config=tiny_clip_config, num_text_experts=3)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, EntityCLIPConfig)
    saved, original = loaded.to_dict(), config.to_dict()
    saved.pop("_name_or_path"), original.pop("_name_or_path")  # where it was loaded from
    assert saved == original


def test_attn_implementation_reaches_the_nested_clip(tiny_clip_config):
    config = EntityCLIPConfig(clip_config=tiny_clip_config, attn_implementation="eager")
    assert config.clip_config._attn_implementation == "eager"
    assert config.clip_config.text_config._attn_implementation == "eager"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_vision_experts": 0, "num_text_experts": 0, "num_shared_experts": 0}, "at least one expert"),
        ({"num_vision_experts": 0, "num_shared_experts": 0}, "Both sides need an expert"),
        ({"num_text_experts": -1}, "num_text_experts"),
        ({"num_vision_experts": 2.5}, "num_vision_experts"),
        ({"beta": -0.1}, "beta"),
        ({"gamma": -1}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"expert_num_heads": 3}, "must divide"),
        ({"expert_num_heads": 0}, "expert_num_heads"),
        ({"expert_mlp_ratio": 0}, "expert_mlp_ratio"),
        ({"logit_scale_max": -1.0}, "logit_scale_max"),
    ],
)
def test_invalid_values_raise_naming_the_field(tiny_clip_config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EntityCLIPConfig(clip_config=tiny_clip_config, **kwargs)


def test_shared_experts_alone_are_valid(tiny_clip_config):
    config = EntityCLIPConfig(clip_config=tiny_clip_config, num_vision_experts=0, num_text_experts=0)
    assert config.num_image_side_experts == 4 and config.num_text_side_experts == 4
