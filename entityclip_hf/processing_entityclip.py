"""EntityCLIP processor: CLIP's image processor and tokenizer, plus tokenised LLM explanations of the texts.

This file is copied beside saved processors for `trust_remote_code` users: it imports only transformers, PIL, numpy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

# Modes whose pixels carry an alpha channel; PIL's plain convert("RGB") drops alpha, which turns the (often black)
# colour under transparent pixels into visible content.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# 16-bit greyscale modes; PIL's convert("L") clips them at 255 instead of scaling.
_HIGH_BIT_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class EntityCLIPProcessor(ProcessorMixin):
    r"""
    Prepares EntityCLIP inputs: images, texts and the texts' explanations, in one call.

    One CLIP tokenizer serves both the texts and the explanations (EntityCLIP encodes both with the same CLIP text
    encoder). A sample whose explanation is `None` (or blank) gets an all-zero row in `explanation_attention_mask`:
    that is how the model knows the explanation is missing.

    Images may be PIL images, numpy arrays (`H x W`, `H x W x C` or `C x H x W`; uint8, uint16, bool, or floats in
    [0, 1]) or paths to image files. They are converted to RGB first: transparency is composited over
    `background_color`, 16-bit images are scaled (not clipped) to 8 bits, greyscale/palette/CMYK are converted.

    Args:
        image_processor ([`CLIPImageProcessor`]): CLIP's image preprocessing.
        tokenizer ([`CLIPTokenizer`]): CLIP's tokenizer, used for texts and explanations.
        max_length (`int`, *optional*):
            Default maximum length of the texts; `None` means the tokenizer's `model_max_length` (77 for CLIP).
        explanation_max_length (`int`, *optional*):
            Default maximum length of the explanations; `None` means the same as the texts.
        background_color (`tuple[int, int, int]`, defaults to white):
            Colour under transparent pixels. White, because transparent regions of logos and cut-outs are meant to
            be seen on a light page, and black would be read as image content.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        max_length: int | None = None,
        explanation_max_length: int | None = None,
        background_color: Sequence[int] = (255, 255, 255),
        **kwargs,
    ):
        # Set before ProcessorMixin.__init__ so that to_dict() saves them and from_pretrained() restores them.
        self.max_length = _check_length("max_length", max_length)
        self.explanation_max_length = _check_length("explanation_max_length", explanation_max_length)
        self.background_color = _check_color(background_color)
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        explanations: str | Sequence[str | None] | None = None,
        padding: bool | str = "longest",
        truncation: bool = True,
        max_length: int | None = None,
        explanation_max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Turn a batch of images, texts and explanations (any of them may be omitted) into model inputs.

        Args:
            images: One image or a list of images (PIL image, numpy array, or path to an image file).
            text: One string or a list of strings.
            explanations: One string or a list of strings or `None` (no explanation for that sample; a blank
                string counts as `None`).
            padding: Padding strategy of the tokenizer; the default pads to the longest sequence of the batch.
            truncation: Cut sequences longer than the maximum length.
            max_length: Maximum text length for this call; defaults to the processor's `max_length`.
            explanation_max_length: Maximum explanation length for this call; defaults to the processor's.
            return_tensors: `"pt"`, `"np"` or `None` (lists).

        Returns:
            [`BatchFeature`] with `pixel_values` (if images), `input_ids` and `attention_mask` (if text),
            `explanation_input_ids` and `explanation_attention_mask` (if explanations).

        Raises:
            ValueError: for an empty batch, batches of different lengths, or a bad sample (named by its index).
        """
        if images is None and text is None and explanations is None:
            raise ValueError("EntityCLIPProcessor needs at least one of `images`, `text` or `explanations`.")
        images = _as_image_batch(images)
        texts = _as_text_batch(text, "text", allow_none=False)
        explanations = _as_text_batch(explanations, "explanations", allow_none=True)
        _check_batch_sizes(images=images, text=texts, explanations=explanations)

        text_max_length = max_length if max_length is not None else self.max_length
        if explanation_max_length is None:
            explanation_max_length = self.explanation_max_length
        if explanation_max_length is None:
            explanation_max_length = text_max_length

        data = {}
        if images is not None:
            rgb_images = [self.load_rgb_image(image, index) for index, image in enumerate(images)]
            data["pixel_values"] = self.image_processor(rgb_images, return_tensors=return_tensors)["pixel_values"]
        if texts is not None:
            encoded = self.tokenizer(texts, padding=padding, truncation=truncation, max_length=text_max_length)
            data["input_ids"] = encoded["input_ids"]
            data["attention_mask"] = encoded["attention_mask"]
        if explanations is not None:
            # A blank explanation says nothing either, so it counts as missing. A missing one is tokenised as ""
            # (just <|startoftext|><|endoftext|>) so the batch stays rectangular, and its mask row is zeroed: the
            # model reads an all-zero row as "no explanation".
            missing = [explanation is None or not explanation.strip() for explanation in explanations]
            encoded = self.tokenizer(
                ["" if absent else explanation for explanation, absent in zip(explanations, missing, strict=True)],
                padding=padding,
                truncation=truncation,
                max_length=explanation_max_length,
            )
            data["explanation_input_ids"] = encoded["input_ids"]
            data["explanation_attention_mask"] = [
                [0] * len(mask) if absent else mask
                for mask, absent in zip(encoded["attention_mask"], missing, strict=True)
            ]
        return BatchFeature(data, tensor_type=return_tensors)

    def load_rgb_image(self, image, index: int = 0) -> Image.Image:
        """Return `image` (PIL image, numpy array or file path) as an 8-bit RGB PIL image.

        `index` is the sample's position in the batch, used in error messages.
        """
        if isinstance(image, (str, os.PathLike)):
            image = _open_image_file(image, index)
        elif isinstance(image, np.ndarray):
            image = _array_to_image(image, index)
        elif isinstance(image, Image.Image):
            try:
                # An image from Image.open() is decoded lazily; a damaged file must fail here, where its index is known.
                image.load()
            except (OSError, SyntaxError, ValueError) as error:
                raise ValueError(
                    f"image {index}: cannot decode the PIL image ({type(error).__name__}: {error})."
                ) from error
        else:
            raise ValueError(
                f"image {index}: expected a PIL image, a numpy array or a path to an image file, "
                f"got {type(image).__name__}."
            )
        return _to_rgb(image, index, tuple(self.background_color))

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask", "explanation_input_ids", "explanation_attention_mask"]


def _check_length(name: str, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise ValueError(
            f"{name} must be None or an int >= 2 (room for <|startoftext|> and <|endoftext|>), got {value!r}"
        )
    return value


def _check_color(color) -> tuple[int, int, int]:
    color = tuple(color)
    if len(color) != 3 or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color):
        raise ValueError(f"background_color must be three ints in 0..255, got {color!r}")
    return color


def _as_image_batch(images):
    """A list of images; a single image (PIL, path, 2-D/3-D array) becomes a batch of one, a 4-D array a batch."""
    if images is None:
        return None
    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise ValueError(f"`images` must be an image, a path or a list of them, got {type(images).__name__}.")


def _as_text_batch(texts, field: str, allow_none: bool):
    """A list of strings (and `None`s where `allow_none`); a single string becomes a batch of one."""
    if texts is None:
        return None
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise ValueError(f"`{field}` must be a string or a list of strings, got {type(texts).__name__}.")
    for index, item in enumerate(texts):
        if item is None and allow_none:
            continue
        if not isinstance(item, str):
            expected = "a string or None" if allow_none else "a string"
            raise ValueError(f"{field} {index}: expected {expected}, got {type(item).__name__}.")
    return list(texts)


def _check_batch_sizes(**batches):
    sizes = {field: len(batch) for field, batch in batches.items() if batch is not None}
    for field, size in sizes.items():
        if size == 0:
            raise ValueError(f"Empty batch: `{field}` has no items.")
    if len(set(sizes.values())) > 1:
        shortest = min(sizes, key=sizes.get)
        counts = ", ".join(f"{size} {field}" for field, size in sizes.items())
        raise ValueError(
            f"images, text and explanations must have one entry per sample, got {counts}: "
            f"sample {sizes[shortest]} has no {shortest} entry."
        )


def _open_image_file(path, index: int) -> Image.Image:
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            # Decode now, inside the try: PIL opens lazily, so a truncated file would only fail later.
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise ValueError(f"image {index}: file not found: '{path}'.") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"image {index}: cannot read image file '{path}' ({type(error).__name__}: {error})."
        ) from error


def _array_to_image(array: np.ndarray, index: int) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels first -> channels last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))) or array.size == 0:
        raise ValueError(
            f"image {index}: array of shape {array.shape} is not an image (expected H x W, H x W x C or C x H x W "
            "with 1, 3 or 4 channels)."
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = _scale_16_bit(array)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"image {index}: float arrays must hold values in [0, 1], got {array.min()}..{array.max()}."
            )
        array = np.round(array * 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"image {index}: {array.dtype} array values must lie in 0..255 (use uint16 for 16-bit images), "
                f"got {array.min()}..{array.max()}."
            )
        array = array.astype(np.uint8)
    else:
        raise ValueError(f"image {index}: unsupported array dtype {array.dtype}.")
    return Image.fromarray(np.ascontiguousarray(array))


def _scale_16_bit(values: np.ndarray) -> np.ndarray:
    # 65535 / 257 == 255 exactly: the full 16-bit range maps onto the full 8-bit range.
    return np.round(values.astype(np.float64) / 257.0).astype(np.uint8)


def _to_rgb(image: Image.Image, index: int, background_color: tuple[int, int, int]) -> Image.Image:
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, background_color + (255,))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(
                f"image {index}: 32-bit integer image with values {values.min()}..{values.max()} outside the "
                "16-bit range 0..65535; convert it to 8 bits first."
            )
        return Image.fromarray(_scale_16_bit(values)).convert("RGB")
    if image.mode == "F":
        # PIL's float mode keeps the 0..255 scale of the 8-bit modes (convert("F") from "L" does not rescale).
        values = np.asarray(image)
        if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 255:
            raise ValueError(f"image {index}: float ('F') image values must lie in 0..255.")
        return Image.fromarray(np.round(values).astype(np.uint8)).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"image {index}: cannot convert mode {image.mode!r} to RGB ({error}).") from error


EntityCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["EntityCLIPProcessor"]
