"""Shared test fixtures: an isolated, offline Hugging Face cache and tiny models built from scratch."""

import atexit
import os
import shutil
import tempfile

import pytest

# huggingface_hub and transformers read these when first imported (cache paths, offline flag), so they are set
# here, before any test module imports them: no test may reach the Hub or write into the user's cache.
_SESSION_HF_HOME = tempfile.mkdtemp(prefix="entityclip-hf-home-")
atexit.register(shutil.rmtree, _SESSION_HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _SESSION_HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path_factory, monkeypatch):
    """Give each test its own HF_HOME (seen by subprocesses and by code that reads the variable late), offline."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return hf_home


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE CLIPTokenizer trained on the built-in entity-news corpus (77 tokens max)."""
    from entityclip_hf.tiny_models import train_bpe_tokenizer

    return train_bpe_tokenizer()


@pytest.fixture(scope="session")
def tiny_processor(tiny_tokenizer):
    """An EntityCLIPProcessor with the tiny tokenizer and 32-pixel CLIP image preprocessing."""
    from entityclip_hf.processing_entityclip import EntityCLIPProcessor
    from entityclip_hf.tiny_models import tiny_image_processor

    return EntityCLIPProcessor(image_processor=tiny_image_processor(32), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_clip_config(tiny_tokenizer):
    """A 2-layer, 32-wide CLIPConfig for 32-pixel images (patch 8), matched to the tiny tokenizer."""
    from entityclip_hf.tiny_models import tiny_clip_config as make_tiny_clip_config

    return make_tiny_clip_config(tiny_tokenizer)
