"""EntityCLIPProcessor: batching, padding, truncation, missing explanations, image conversion, bad input, save/load."""

import io
import json
import re
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import entityclip_hf
from entityclip_hf.processing_entityclip import EntityCLIPProcessor
from entityclip_hf.tiny_models import tiny_image_processor

ALL_KEYS = {"pixel_values", "input_ids", "attention_mask", "explanation_input_ids", "explanation_attention_mask"}
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])

TEXTS = [
    "Angela Merkel speaks to reporters in Berlin.",
    "Fans at Fenway Park.",
    "Serena Williams celebrates at the Australian Open in Melbourne on Saturday night.",
]
EXPLANATIONS = ["Angela Merkel was the chancellor of Germany.", None, "Serena Williams is an American tennis player."]


def _images(count=3):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)]
    return [Image.new("RGB", (40 + 8 * i, 32), colours[i % len(colours)]) for i in range(count)]


def _unpadded_lengths(tokenizer, texts):
    return [len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"]]


def _expected_pixel(rgb):
    """pixel_values of a uniform image of colour `rgb` after CLIP's rescale and normalisation."""
    return (np.asarray(rgb) / 255.0 - CLIP_MEAN) / CLIP_STD


# --- batching, padding, truncation -------------------------------------------------------------------------------


def test_full_batch_has_all_keys_with_consistent_shapes(tiny_processor):
    out = tiny_processor(images=_images(), text=TEXTS, explanations=EXPLANATIONS)
    assert set(out.keys()) == ALL_KEYS
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    assert out["pixel_values"].dtype == torch.float32
    assert out["input_ids"].shape == out["attention_mask"].shape
    assert out["explanation_input_ids"].shape == out["explanation_attention_mask"].shape
    tokenizer = tiny_processor.tokenizer
    assert (out["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    # The last attended token of every text is <|endoftext|>, where CLIP pools the text.
    last = out["attention_mask"].sum(dim=1) - 1
    assert (out["input_ids"][torch.arange(3), last] == tokenizer.eos_token_id).all()


def test_padding_is_dynamic_to_the_longest_sample(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    out = tiny_processor(text=TEXTS, explanations=EXPLANATIONS)
    text_lengths = _unpadded_lengths(tokenizer, TEXTS)
    assert out["input_ids"].shape[1] == max(text_lengths) < 77
    assert out["attention_mask"].sum(dim=1).tolist() == text_lengths
    present = [e for e in EXPLANATIONS if e is not None]
    assert out["explanation_input_ids"].shape[1] == max(_unpadded_lengths(tokenizer, present))
    # Short batches stay short: the length follows the batch, not the model maximum.
    short = tiny_processor(text=["Berlin", "Paris"])
    assert short["input_ids"].shape[1] == max(_unpadded_lengths(tokenizer, ["Berlin", "Paris"]))
    fixed = tiny_processor(text=["Berlin", "Paris"], padding="max_length")
    assert fixed["input_ids"].shape[1] == 77


def test_over_long_texts_and_explanations_are_truncated_to_77(tiny_processor):
    long_text = " ".join(["Chancellor Angela Merkel visited Washington"] * 40)
    assert len(tiny_processor.tokenizer(long_text)["input_ids"]) > 77
    out = tiny_processor(text=[long_text, "Berlin"], explanations=[long_text, None])
    eos = tiny_processor.tokenizer.eos_token_id
    for ids_key, mask_key in [("input_ids", "attention_mask"), ("explanation_input_ids", "explanation_attention_mask")]:
        assert out[ids_key].shape == (2, 77)
        assert out[mask_key][0].sum() == 77
        assert out[ids_key][0, -1] == eos  # truncation keeps the end-of-text token


def test_max_length_options_of_processor_and_call(tiny_tokenizer):
    processor = EntityCLIPProcessor(tiny_image_processor(32), tiny_tokenizer, max_length=12, explanation_max_length=20)
    long_text = " ".join(["Barack Obama in the White House"] * 10)
    out = processor(text=[long_text], explanations=[long_text])
    assert out["input_ids"].shape == (1, 12)
    assert out["explanation_input_ids"].shape == (1, 20)
    out = processor(text=[long_text], explanations=[long_text], max_length=8)
    assert out["input_ids"].shape == (1, 8)
    assert out["explanation_input_ids"].shape == (1, 20)
    # Without an explanation length of its own, explanations follow the text length.
    plain = EntityCLIPProcessor(tiny_image_processor(32), tiny_tokenizer, max_length=10)
    assert plain(text=[long_text], explanations=[long_text])["explanation_input_ids"].shape == (1, 10)


def test_return_tensors_none_and_np(tiny_processor):
    as_lists = tiny_processor(text=TEXTS, explanations=EXPLANATIONS, return_tensors=None)
    as_np = tiny_processor(text=TEXTS, explanations=EXPLANATIONS, return_tensors="np")
    assert isinstance(as_lists["input_ids"], list)
    assert isinstance(as_np["input_ids"], np.ndarray)
    assert as_np["explanation_attention_mask"].tolist() == as_lists["explanation_attention_mask"]


def test_model_input_names_lists_all_five_keys(tiny_processor):
    assert set(tiny_processor.model_input_names) == ALL_KEYS


# --- missing explanations ----------------------------------------------------------------------------------------


def test_missing_explanation_has_an_all_zero_mask_row(tiny_processor):
    out = tiny_processor(text=TEXTS, explanations=EXPLANATIONS)
    mask = out["explanation_attention_mask"]
    assert mask[1].sum() == 0
    assert (mask[0].sum() > 2) and (mask[2].sum() > 2)
    tokenizer = tiny_processor.tokenizer
    assert out["explanation_input_ids"][1, :2].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id]


def test_all_explanations_missing_still_returns_both_tensors(tiny_processor):
    out = tiny_processor(text=TEXTS[:2], explanations=[None, None])
    assert out["explanation_input_ids"].shape == out["explanation_attention_mask"].shape == (2, 2)
    assert out["explanation_attention_mask"].sum() == 0


def test_blank_explanation_counts_as_missing(tiny_processor):
    out = tiny_processor(text=TEXTS[:3], explanations=["", "   \n", "Berlin is the capital of Germany."])
    assert out["explanation_attention_mask"][:2].sum() == 0
    assert out["explanation_attention_mask"][2].sum() > 2


# --- partial calls and single inputs -----------------------------------------------------------------------------


def test_image_only_text_only_and_explanation_only_calls(tiny_processor):
    assert set(tiny_processor(images=_images(2)).keys()) == {"pixel_values"}
    assert set(tiny_processor(text=TEXTS).keys()) == {"input_ids", "attention_mask"}
    assert set(tiny_processor(explanations=EXPLANATIONS).keys()) == {
        "explanation_input_ids",
        "explanation_attention_mask",
    }
    with_images = tiny_processor(images=_images(3), explanations=EXPLANATIONS)
    assert set(with_images.keys()) == {"pixel_values", "explanation_input_ids", "explanation_attention_mask"}


def test_partial_call_outputs_equal_the_full_call(tiny_processor):
    full = tiny_processor(images=_images(), text=TEXTS, explanations=EXPLANATIONS)
    assert torch.equal(tiny_processor(images=_images())["pixel_values"], full["pixel_values"])
    assert torch.equal(tiny_processor(text=TEXTS)["input_ids"], full["input_ids"])


def test_single_image_and_string_are_a_batch_of_one(tiny_processor, tmp_path):
    image = _images(1)[0]
    path = tmp_path / "one.png"
    image.save(path)
    batched = tiny_processor(images=[image], text=[TEXTS[0]], explanations=[EXPLANATIONS[0]])
    for single_image in (image, str(path), path, np.asarray(image)):
        single = tiny_processor(images=single_image, text=TEXTS[0], explanations=EXPLANATIONS[0])
        for key in ALL_KEYS:
            assert torch.equal(single[key], batched[key]), key


def test_numpy_arrays_and_paths_give_the_same_pixels_as_pil(tiny_processor, tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(36, 48, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    path = tmp_path / "noise.png"
    image.save(path)
    reference = tiny_processor(images=[image])["pixel_values"]
    variants = [
        array,  # H x W x C
        array.transpose(2, 0, 1),  # C x H x W
        array.astype(np.float32) / 255.0,  # floats in [0, 1]
        path,
        str(path),
    ]
    for variant in variants:
        assert torch.allclose(tiny_processor(images=[variant])["pixel_values"], reference, atol=1e-6)
    stacked = tiny_processor(images=np.stack([array, array]))["pixel_values"]  # a 4-D array is a batch
    assert stacked.shape[0] == 2 and torch.allclose(stacked[1], reference[0], atol=1e-6)


# --- image modes -------------------------------------------------------------------------------------------------


def _palette_image(transparent):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    if transparent:
        image.info["transparency"] = 0
    return image


MODE_CASES = {
    # Transparent pixels show the background (white), not the colour stored under them (black here).
    "RGBA transparent": (lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
    "RGBA half transparent": (lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 128)), (127, 127, 127)),
    "RGBA opaque": (lambda: Image.new("RGBA", (8, 8), (200, 100, 50, 255)), (200, 100, 50)),
    "LA transparent": (lambda: Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),
    "P": (lambda: _palette_image(transparent=False), (10, 20, 30)),
    "P transparent": (lambda: _palette_image(transparent=True), (255, 255, 255)),
    "L": (lambda: Image.new("L", (8, 8), 100), (100, 100, 100)),
    "1": (lambda: Image.new("1", (8, 8), 1), (255, 255, 255)),
    "CMYK": (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
    # 16-bit: scaled by 255/65535, where PIL's own convert("L") would clip everything above 255 to white.
    "I;16 white": (lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), (255, 255, 255)),
    # 40000 / 257 = 155.6 -> 156; keeping the low byte instead would give 64, clipping 255.
    "I;16 grey": (lambda: Image.fromarray(np.full((8, 8), 40000, np.uint16)), (156, 156, 156)),
    "I;16 dark": (lambda: Image.fromarray(np.full((8, 8), 300, np.uint16)), (1, 1, 1)),
    "I 32-bit holding 16-bit": (lambda: Image.fromarray(np.full((8, 8), 40000, np.int32)), (156, 156, 156)),
    "F": (lambda: Image.new("F", (8, 8), 200.0), (200, 200, 200)),
    "numpy uint16 RGB": (lambda: np.full((8, 8, 3), (65535, 40000, 300), np.uint16), (255, 156, 1)),
    "numpy uint16 grey": (lambda: np.full((8, 8), 65535, np.uint16), (255, 255, 255)),
    "numpy RGBA transparent": (lambda: np.zeros((8, 8, 4), np.uint8), (255, 255, 255)),
    "numpy bool": (lambda: np.ones((8, 8), bool), (255, 255, 255)),
    "numpy float": (lambda: np.full((8, 8, 3), 0.5, np.float64), (128, 128, 128)),
    "numpy one channel": (lambda: np.full((8, 8, 1), 77, np.uint8), (77, 77, 77)),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_non_rgb_images_are_converted_correctly(tiny_processor, case):
    make, expected = MODE_CASES[case]
    rgb = tiny_processor.load_rgb_image(make())
    assert rgb.mode == "RGB"
    assert np.all(np.asarray(rgb) == np.asarray(expected, dtype=np.uint8)), np.asarray(rgb)[0, 0]


def test_converted_pixels_reach_pixel_values(tiny_processor, tmp_path):
    path = tmp_path / "sixteen_bit.png"
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")  # the file really is 16-bit
    images = [Image.new("RGBA", (40, 40), (0, 0, 0, 0)), path, Image.new("CMYK", (40, 40), (0, 255, 255, 0))]
    pixels = tiny_processor(images=images)["pixel_values"].numpy()
    for index, rgb in enumerate([(255, 255, 255), (156, 156, 156), (255, 0, 0)]):
        expected = _expected_pixel(rgb)[:, None, None]
        assert np.allclose(pixels[index], expected, atol=1e-5), index


def test_background_color_option(tiny_tokenizer):
    processor = EntityCLIPProcessor(tiny_image_processor(32), tiny_tokenizer, background_color=(0, 128, 255))
    rgb = processor.load_rgb_image(Image.new("RGBA", (8, 8), (255, 0, 0, 0)))
    assert rgb.getpixel((0, 0)) == (0, 128, 255)


# --- bad input: each names the sample ----------------------------------------------------------------------------


def _write_truncated_jpeg(path):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_non_image_object_names_its_index(tiny_processor):
    with pytest.raises(ValueError, match=r"image 1: expected a PIL image.*got dict"):
        tiny_processor(images=[_images(1)[0], {"not": "an image"}])
    with pytest.raises(ValueError, match=r"`images` must be"):
        tiny_processor(images=42)


def test_missing_file_names_index_and_path(tiny_processor, tmp_path):
    good = tmp_path / "good.png"
    _images(1)[0].save(good)
    missing = tmp_path / "nowhere.jpg"
    with pytest.raises(ValueError, match=r"image 2: file not found: '.*nowhere\.jpg'"):
        tiny_processor(images=[good, good, missing])


def test_corrupt_files_name_index_and_path(tiny_processor, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match=r"image 1: cannot read image file '.*garbage\.png'"):
        tiny_processor(images=[_images(1)[0], garbage])
    truncated = _write_truncated_jpeg(tmp_path / "truncated.jpg")
    with pytest.raises(ValueError, match=r"image 0: cannot read image file '.*truncated\.jpg'.*truncated"):
        tiny_processor(images=[truncated])
    with pytest.raises(ValueError, match=r"image 0: cannot read image file"):
        tiny_processor(images=[tmp_path])  # a directory


def test_lazily_opened_corrupt_pil_image_names_its_index(tiny_processor, tmp_path):
    truncated = Image.open(_write_truncated_jpeg(tmp_path / "lazy.jpg"))
    with pytest.raises(ValueError, match=r"image 1: cannot decode the PIL image"):
        tiny_processor(images=[_images(1)[0], truncated])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((8, 8, 2), np.uint8), r"image 0: array of shape \(8, 8, 2\) is not an image"),
        (np.zeros((8,), np.uint8), r"image 0: array of shape \(8,\) is not an image"),
        (np.zeros((0, 8, 3), np.uint8), r"image 0: array of shape \(0, 8, 3\) is not an image"),
        (np.full((8, 8, 3), 2.0), r"image 0: float arrays must hold values in \[0, 1\]"),
        (np.full((8, 8, 3), np.nan), r"image 0: float arrays must hold values in \[0, 1\]"),
        (np.full((8, 8), 300, np.int64), r"image 0: int64 array values must lie in 0\.\.255"),
        (np.full((8, 8), "x"), r"image 0: unsupported array dtype"),
    ],
)
def test_bad_arrays_name_their_index(tiny_processor, array, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor.load_rgb_image(array, index=0)


def test_bad_array_in_a_batch_names_its_index(tiny_processor):
    with pytest.raises(ValueError, match=r"image 2: float arrays"):
        tiny_processor(images=[_images(1)[0], np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), -1.0)])


def test_out_of_range_32_bit_image_names_its_index(tiny_processor):
    huge = Image.fromarray(np.full((8, 8), 70000, np.int32))
    with pytest.raises(ValueError, match=r"image 1: 32-bit integer image with values 70000\.\.70000"):
        tiny_processor(images=[_images(1)[0], huge])


def test_out_of_range_float_image_names_its_index(tiny_processor):
    with pytest.raises(ValueError, match=r"image 0: float \('F'\) image values must lie in 0\.\.255"):
        tiny_processor(images=Image.new("F", (8, 8), 300.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": ["Berlin", None, "Paris"]}, r"text 1: expected a string, got NoneType"),
        ({"text": [3.5]}, r"text 0: expected a string, got float"),
        ({"text": 17}, r"`text` must be a string or a list of strings, got int"),
        ({"explanations": ["ok", None, 5]}, r"explanations 2: expected a string or None, got int"),
        ({"images": [], "text": []}, r"Empty batch: `images` has no items"),
        ({"text": []}, r"Empty batch: `text` has no items"),
        ({}, r"needs at least one of `images`, `text` or `explanations`"),
    ],
)
def test_bad_texts_and_batches(tiny_processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(**kwargs)


def test_mismatched_lengths_name_the_sample(tiny_processor):
    with pytest.raises(ValueError, match=r"got 3 images, 2 text: sample 2 has no text entry"):
        tiny_processor(images=_images(3), text=TEXTS[:2])
    with pytest.raises(ValueError, match=r"got 2 text, 3 explanations: sample 2 has no text entry"):
        tiny_processor(text=TEXTS[:2], explanations=EXPLANATIONS)
    with pytest.raises(ValueError, match=r"sample 1 has no explanations entry"):
        tiny_processor(images=_images(2), text=TEXTS[:2], explanations=[None])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 1}, "max_length must be None or an int >= 2"),
        ({"explanation_max_length": "77"}, "explanation_max_length must be None or an int >= 2"),
        ({"background_color": (255, 255)}, "background_color must be three ints"),
        ({"background_color": (0, 0, 256)}, "background_color must be three ints"),
        ({"max_image_pixels": 0}, "max_image_pixels must be an int >= 1"),
        ({"max_image_pixels": 1.5e6}, "max_image_pixels must be an int >= 1"),
        ({"max_image_pixels": True}, "max_image_pixels must be an int >= 1"),
    ],
)
def test_invalid_options_are_rejected(tiny_tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EntityCLIPProcessor(tiny_image_processor(32), tiny_tokenizer, **kwargs)


# --- image size: empty images and the pixel limit (issue 11) -----------------------------------------------------


def _png_claiming_size(path, width, height):
    """A PNG file whose header claims `width x height` pixels but holds the data of a 1 x 1 image.

    PIL reads the size from the header; decoding the pixels would fail. A refusal that names the size therefore shows
    that the size was checked before anything was decoded.
    """
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("size", [(0, 0), (1, 0), (0, 1)])
def test_empty_pil_image_names_its_index(tiny_processor, size):
    # transformers' resize divided by the zero side: ZeroDivisionError, without the sample.
    with pytest.raises(ValueError, match=rf"image 1: the PIL image is empty \({size[0]}x{size[1]} pixels\)"):
        tiny_processor(images=[_images(1)[0], Image.new("RGB", size)])


@pytest.mark.parametrize("shape", [(0, 0), (1, 0, 3), (0, 1), (3, 0, 5), (0, 0, 1)])
def test_empty_array_names_its_index(tiny_processor, shape):
    with pytest.raises(
        ValueError, match=rf"image 1: array of shape {re.escape(str(shape))} is not an image: it has no"
    ):
        tiny_processor(images=[_images(1)[0], np.zeros(shape, np.uint8)])


def test_empty_image_file_names_its_index_and_path(tiny_processor, tmp_path):
    empty = _png_claiming_size(tmp_path / "empty.png", 0, 5)
    with pytest.raises(ValueError, match=r"image 1: cannot read image file '.*empty\.png'"):
        tiny_processor(images=[_images(1)[0], empty])


def test_pixel_limit_applies_to_pil_images_arrays_and_files(tiny_tokenizer, tmp_path):
    processor = EntityCLIPProcessor(tiny_image_processor(32), tiny_tokenizer, max_image_pixels=40 * 30)
    at_limit = Image.new("RGB", (40, 30), (255, 0, 0))
    assert processor(images=[at_limit, np.asarray(at_limit)])["pixel_values"].shape == (2, 3, 32, 32)
    over = Image.new("RGB", (41, 30), (255, 0, 0))
    limit = r"41x30 = 1,230 pixels, more than the processor's max_image_pixels = 1,200"
    with pytest.raises(ValueError, match=rf"image 1: the PIL image has {limit}"):
        processor(images=[at_limit, over])
    with pytest.raises(ValueError, match=rf"image 0: the array of shape \(30, 41, 3\) has {limit}"):
        processor(images=[np.asarray(over)])
    with pytest.raises(ValueError, match=rf"image 0: the array of shape \(3, 30, 41\) has {limit}"):
        processor(images=[np.asarray(over).transpose(2, 0, 1)])  # channels first
    over.save(tmp_path / "over.png")
    with pytest.raises(ValueError, match=rf"image 0: the image file '.*over\.png' has {limit}"):
        processor(images=[tmp_path / "over.png"])


def test_pixel_limit_is_checked_before_decoding_a_file(tiny_tokenizer, tmp_path):
    processor = EntityCLIPProcessor(tiny_image_processor(32), tiny_tokenizer, max_image_pixels=1_000_000)
    claims_big = _png_claiming_size(tmp_path / "big.png", 2000, 1000)
    with pytest.raises(ValueError, match=r"image 0: the image file '.*big\.png' has 2000x1000 = 2,000,000 pixels"):
        processor(images=[claims_big])
    with pytest.raises(ValueError, match=r"image 0: the PIL image has 2000x1000 = 2,000,000 pixels"):
        processor(images=[Image.open(claims_big)])  # opened lazily: not decoded either


def test_huge_in_memory_images_are_refused_before_any_conversion(tiny_processor, monkeypatch):
    """20000 x 20000 = 400 M pixels, over the default limit: as RGB, one copy is 1.2 GB (the issue saw 5.7-6.8 GB)."""
    message = r"image 0: the {} has 20000x20000 = 400,000,000 pixels, more than the processor's max_image_pixels = "
    message += "178,956,970"
    conversions = []
    monkeypatch.setattr(Image.Image, "convert", lambda image, *args, **kwargs: conversions.append(image.mode))
    monkeypatch.setattr(Image.Image, "load", lambda image: conversions.append("load"))
    huge_image = Image.new("1", (20000, 20000))  # one bit per pixel: 50 MB
    with pytest.raises(ValueError, match=message.format("PIL image")):
        tiny_processor(images=[huge_image])
    assert conversions == []
    huge_array = np.broadcast_to(np.uint8(0), (20000, 20000, 3))  # a read-only view: no memory at all
    with pytest.raises(ValueError, match=message.format(r"array of shape \(20000, 20000, 3\)")):
        tiny_processor(images=[huge_array])


def test_over_large_array_costs_no_copy(tiny_tokenizer):
    """The size is checked before the dtype checks and conversions, which copy the array (tracemalloc sees numpy)."""
    processor = EntityCLIPProcessor(tiny_image_processor(32), tiny_tokenizer, max_image_pixels=1_000_000)
    over_limit = np.broadcast_to(np.float64(0.5), (2000, 1000, 3))  # as float64 copies: 48 MB each
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"image 0: the array of shape \(2000, 1000, 3\) has 1000x2000"):
            processor(images=[over_limit])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_file_over_pils_own_limit_names_its_index_and_the_limit(tiny_processor, tmp_path):
    bomb = _png_claiming_size(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(
        ValueError, match=r"image 0: cannot read image file '.*bomb\.png' \(DecompressionBombError: .*178956970 pixels"
    ):
        tiny_processor(images=[bomb])


# --- save / load -------------------------------------------------------------------------------------------------


def _custom_processor(tokenizer):
    return EntityCLIPProcessor(
        tiny_image_processor(32),
        tokenizer,
        max_length=24,
        explanation_max_length=40,
        background_color=(0, 128, 255),
        max_image_pixels=4_000_000,
    )


def _mixed_batch(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((30, 50), 40000, np.uint16)).save(path)
    images = [Image.new("RGBA", (40, 40), (255, 0, 0, 0)), path, _images(1)[0]]
    return {"images": images, "text": TEXTS, "explanations": EXPLANATIONS}


def test_save_load_round_trip_keeps_options_and_outputs(tiny_tokenizer, tmp_path):
    processor = _custom_processor(tiny_tokenizer)
    processor.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    assert config["processor_class"] == "EntityCLIPProcessor"
    assert config["explanation_max_length"] == 40 and config["max_image_pixels"] == 4_000_000
    assert config["background_color"] == [0, 128, 255]
    # The texts' default length is a tokenizer default (ProcessorMixin's convention), saved with the tokenizer.
    assert "max_length" not in config
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["max_length"] == 24
    assert config["auto_map"]["AutoProcessor"] == "processing_entityclip.EntityCLIPProcessor"
    assert (tmp_path / "saved" / "processing_entityclip.py").is_file()

    loaded = EntityCLIPProcessor.from_pretrained(tmp_path / "saved")
    assert (loaded.max_length, loaded.explanation_max_length, loaded.max_image_pixels) == (24, 40, 4_000_000)
    assert tuple(loaded.background_color) == (0, 128, 255)
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.tokenizer.model_max_length == 77
    batch = _mixed_batch(tmp_path)
    expected, actual = processor(**batch), loaded(**batch)
    assert set(actual.keys()) == ALL_KEYS
    for key in ALL_KEYS:
        assert torch.equal(actual[key], expected[key]), key


def test_processor_file_runs_alone_with_trust_remote_code(tiny_tokenizer, tmp_path):
    """A fresh process that cannot import entityclip_hf loads the saved processor through auto_map."""
    processor = _custom_processor(tiny_tokenizer)
    processor.save_pretrained(tmp_path / "saved")
    batch = _mixed_batch(tmp_path)
    expected = processor(**batch, return_tensors="np")
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["entityclip_hf"] = None  # the saved files must not need the package
        import numpy as np
        from PIL import Image
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained({str(tmp_path / "saved")!r}, trust_remote_code=True)
        images = [
            Image.new("RGBA", (40, 40), (255, 0, 0, 0)),
            {str(batch["images"][1])!r},
            Image.new("RGB", (40, 32), (255, 0, 0)),
        ]
        out = processor(images=images, text={TEXTS!r}, explanations={EXPLANATIONS!r}, return_tensors="np")
        result = {{key: value.tolist() for key, value in out.items()}}
        result["class"] = type(processor).__name__
        result["module"] = type(processor).__module__
        result["options"] = [
            processor.max_length,
            processor.explanation_max_length,
            list(processor.background_color),
            processor.max_image_pixels,
        ]
        print(json.dumps(result))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["class"] == "EntityCLIPProcessor"
    assert result["module"].startswith("transformers_modules.")
    assert result["options"] == [24, 40, [0, 128, 255], 4_000_000]
    for key in ALL_KEYS:
        assert np.array_equal(np.asarray(result[key], dtype=expected[key].dtype), expected[key]), key


def test_auto_processor_round_trip_without_remote_code(tiny_tokenizer, tmp_path):
    """Importing entityclip_hf registers the processor, so AutoProcessor needs no trust_remote_code."""
    processor = _custom_processor(tiny_tokenizer)
    processor.save_pretrained(tmp_path / "saved")
    loaded = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert type(loaded) is entityclip_hf.processing_entityclip.EntityCLIPProcessor
    assert (loaded.max_length, loaded.explanation_max_length, tuple(loaded.background_color)) == (24, 40, (0, 128, 255))
    assert loaded.max_image_pixels == 4_000_000
    batch = _mixed_batch(tmp_path)
    expected, actual = processor(**batch), loaded(**batch)
    for key in ALL_KEYS:
        assert torch.equal(actual[key], expected[key]), key


def test_processor_module_imports_only_standalone_dependencies():
    """processing_entityclip.py is copied to the Hub: only the standard library, transformers, PIL, numpy, torch."""
    import ast

    source = Path(entityclip_hf.processing_entityclip.__file__).read_text()
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports would pull package files into the Hub copy"
            roots.add(node.module.split(".")[0])
    allowed = {"transformers", "PIL", "numpy", "torch"} | set(sys.stdlib_module_names)
    assert roots <= allowed, roots - allowed
