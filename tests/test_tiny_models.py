"""tiny_models: the BPE CLIP tokenizer, the tiny CLIP config and image processor, and that they fit together."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPModel, CLIPTokenizer

from entityclip_hf.processing_entityclip import EntityCLIPProcessor
from entityclip_hf.tiny_models import (
    DEFAULT_CORPUS,
    tiny_image_processor,
    tiny_processor,
    train_bpe_tokenizer,
)
from entityclip_hf.tiny_models import tiny_clip_config as make_tiny_clip_config

ENTITY_TEXTS = [
    "Chancellor Angela Merkel speaks to reporters in Berlin after talks with President Emmanuel Macron.",
    "Zelensky's 2022 visit to Washington — “a historic day” 🙂 Ünïcödé 東京",
    "LeBron James dunks against the Golden State Warriors.",
]


def test_tokenizer_is_a_clip_tokenizer_with_clip_special_tokens(tiny_tokenizer):
    assert isinstance(tiny_tokenizer, CLIPTokenizer)
    assert tiny_tokenizer.bos_token == "<|startoftext|>"
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.model_max_length == 77
    # CLIP's layout: 256 bytes, 256 bytes + "</w>", merges, then the two special tokens last.
    assert tiny_tokenizer.bos_token_id == len(tiny_tokenizer) - 2
    assert tiny_tokenizer.eos_token_id == len(tiny_tokenizer) - 1


def test_entity_text_becomes_merged_tokens_between_bos_and_eos(tiny_tokenizer):
    ids = tiny_tokenizer(ENTITY_TEXTS[0])["input_ids"]
    tokens = tiny_tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) > 2
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[-1] == tiny_tokenizer.eos_token_id
    # Learnt merges are used: far fewer tokens than characters, with whole words such as the frequent "merkel".
    assert len(ids) < len(ENTITY_TEXTS[0]) / 2
    assert "merkel</w>" in tokens
    # "</w>" marks the last piece of each word, as in CLIP's vocabulary.
    word_pieces = tiny_tokenizer.tokenize("Tuesday")
    assert word_pieces[-1].endswith("</w>") and not any(piece.endswith("</w>") for piece in word_pieces[:-1])


def test_every_byte_is_in_vocabulary_so_no_text_is_unknown(tiny_tokenizer):
    ids = tiny_tokenizer(ENTITY_TEXTS[1])["input_ids"]
    # The unknown token is <|endoftext|>: it must appear only once, at the end.
    assert ids.count(tiny_tokenizer.eos_token_id) == 1
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == (
        ENTITY_TEXTS[1].lower().replace(" ", "")
    )


def test_tokenizer_lowercases_like_clip(tiny_tokenizer):
    assert tiny_tokenizer("ANGELA MERKEL")["input_ids"] == tiny_tokenizer("angela merkel")["input_ids"]


def test_padding_and_truncation(tiny_tokenizer):
    batch = tiny_tokenizer(["Berlin", ENTITY_TEXTS[0]], padding="longest", truncation=True)
    lengths = [len(ids) for ids in tiny_tokenizer(["Berlin", ENTITY_TEXTS[0]])["input_ids"]]
    assert len(batch["input_ids"][0]) == len(batch["input_ids"][1]) == max(lengths)
    assert batch["attention_mask"][0] == [1] * lengths[0] + [0] * (max(lengths) - lengths[0])
    assert batch["input_ids"][0][lengths[0] :] == [tiny_tokenizer.pad_token_id] * (max(lengths) - lengths[0])
    long_ids = tiny_tokenizer(" ".join(ENTITY_TEXTS * 10), truncation=True)["input_ids"]
    assert len(long_ids) == 77 and long_ids[-1] == tiny_tokenizer.eos_token_id


def test_tokenizer_save_load_round_trip_is_exact(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    for loader in (AutoTokenizer, CLIPTokenizer):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, CLIPTokenizer)
        assert loaded.get_vocab() == tiny_tokenizer.get_vocab()
        assert loaded.model_max_length == 77
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
            tiny_tokenizer.bos_token_id,
            tiny_tokenizer.eos_token_id,
            tiny_tokenizer.pad_token_id,
        )
        texts = ENTITY_TEXTS + list(DEFAULT_CORPUS[:5])
        assert loaded(texts, padding="longest")["input_ids"] == tiny_tokenizer(texts, padding="longest")["input_ids"]
        assert loaded.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()


def test_vocab_size_bound_and_custom_corpus():
    small = train_bpe_tokenizer(vocab_size=600)
    assert 514 < len(small) <= 600
    corpus = ["Zyxwvut Qrstuv met Zyxwvut Qrstuv in Xanadu."] * 5
    custom = train_bpe_tokenizer(corpus, vocab_size=700)
    assert "zyxwvut</w>" in custom.get_vocab() and "zyxwvut</w>" not in small.get_vocab()


def test_training_is_deterministic():
    """Same corpus, same ids: a model saved with one tiny tokenizer must fit the next one built."""
    reference = train_bpe_tokenizer().backend_tokenizer.to_str()
    for _ in range(5):
        assert train_bpe_tokenizer().backend_tokenizer.to_str() == reference


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 514}, "vocab_size must exceed 514"),
        ({"texts": ["fine", None]}, "item 1 is NoneType"),
    ],
)
def test_bad_tokenizer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_bpe_tokenizer(**kwargs)


def test_tiny_clip_config_matches_the_tokenizer(tiny_tokenizer, tiny_clip_config):
    text = tiny_clip_config.text_config
    assert text.vocab_size == len(tiny_tokenizer)
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        tiny_tokenizer.bos_token_id,
        tiny_tokenizer.eos_token_id,
        tiny_tokenizer.pad_token_id,
    )
    assert text.max_position_embeddings == 77
    assert (text.hidden_size, text.num_hidden_layers) == (32, 2)
    vision = tiny_clip_config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (32, 8, 32)
    assert tiny_clip_config.projection_dim == 32
    assert tiny_clip_config._attn_implementation == "sdpa"
    assert make_tiny_clip_config(tiny_tokenizer, attn_implementation="eager")._attn_implementation == "eager"


def test_tiny_parts_run_a_clip_model_end_to_end(tiny_processor, tiny_clip_config):
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config).eval()
    images = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.fromarray(np.zeros((32, 32, 3), np.uint8))]
    texts = ["Angela Merkel in Berlin.", "Serena Williams wins the Australian Open in Melbourne."]
    batch = tiny_processor(images=images, text=texts)
    with torch.no_grad():
        out = model(
            pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        pooled = model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.logits_per_image.shape == (2, 2)
    assert torch.isfinite(out.logits_per_image).all()
    # CLIP pools each text at its <|endoftext|>: the padded (shorter) text must pool at its own eos, not the last slot.
    eos_positions = batch["attention_mask"].sum(dim=1) - 1
    expected = pooled.last_hidden_state[torch.arange(2), eos_positions]
    assert torch.allclose(pooled.pooler_output, expected)


def test_tiny_image_processor_and_tiny_processor(tmp_path):
    pixels = tiny_image_processor(48)([Image.new("RGB", (100, 60))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 48, 48)
    processor = tiny_processor()
    assert isinstance(processor, EntityCLIPProcessor)
    assert processor(images=[Image.new("RGB", (64, 64))])["pixel_values"].shape == (1, 3, 32, 32)
    custom = tiny_processor(["Zyxwvut Qrstuv met Zyxwvut Qrstuv."] * 5, image_size=16)
    assert "zyxwvut</w>" in custom.tokenizer.get_vocab()
    assert custom(images=[Image.new("RGB", (64, 64))])["pixel_values"].shape == (1, 3, 16, 16)
