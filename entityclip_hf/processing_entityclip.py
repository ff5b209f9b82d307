"""EntityCLIP processor: CLIP's image processor and tokenizer, plus tokenised LLM explanations of the texts.

It follows ProcessorMixin's calling convention: `processor(images=..., text=..., explanations=..., **kwargs)`, where
`kwargs` are merged by `ProcessorMixin._merge_kwargs` and routed to the tokenizer (`text_kwargs`), the image processor
(`images_kwargs`) or both (`common_kwargs`, or flat keywords that one of them accepts). Explanations are one more text
modality, tokenised with the same tokenizer: their arguments are the texts' ones, overridden by `explanations_kwargs`.

This file is copied beside saved processors for `trust_remote_code` users: it imports only transformers, PIL, numpy.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack

logger = logging.getLogger(__name__)

# Modes whose pixels carry an alpha channel; PIL's plain convert("RGB") drops alpha, which turns the (often black)
# colour under transparent pixels into visible content.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# 16-bit greyscale modes; PIL's convert("L") clips them at 255 instead of scaling.
_HIGH_BIT_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

# PIL's own decompression-bomb threshold (2 x Image.MAX_IMAGE_PIXELS, the size at which Image.open refuses a file):
# the same limit then holds for images given in memory as for files. It is above the largest camera photos (150 Mpx),
# and one image at the limit costs CLIP's preprocessing about 1.6 GB (RGB) to 2.3 GB (RGBA) of memory on top of the
# image itself and ~10 s of one core (measured): bearable once in a long job, where 20000 x 20000 (400 Mpx) was not.
# Jobs that need less set the processor's `max_image_pixels` lower.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

# Text arguments that describe the texts themselves, not how to tokenise: they never apply to the explanations.
_TEXT_ONLY_KWARGS = ("text_pair", "text_target", "text_pair_target")
# ProcessorMixin's placeholder-token outputs: EntityCLIP has no placeholder tokens, so they are never produced.
_PLACEHOLDER_OUTPUT_KWARGS = ("return_mm_token_type_ids", "return_text_replacement_offsets")


class EntityCLIPProcessorKwargs(ProcessingKwargs, total=False):
    """The keyword groups of `EntityCLIPProcessor.__call__`: ProcessingKwargs' plus `explanations_kwargs`.

    `explanations_kwargs` (tokenizer arguments, like `text_kwargs`): applied to the explanations on top of the merged
    `text_kwargs`, e.g. `explanations_kwargs={"max_length": 128}`.
    """

    explanations_kwargs: TextKwargs


class EntityCLIPProcessor(ProcessorMixin):
    r"""
    Prepares EntityCLIP inputs: images, texts and the texts' explanations, in one call.

    One CLIP tokenizer serves both the texts and the explanations (EntityCLIP encodes both with the same CLIP text
    encoder). A sample whose explanation is `None` (or blank) gets an all-zero row in `explanation_attention_mask`:
    that is how the model knows the explanation is missing.

    Images may be PIL images, numpy arrays (`H x W`, `H x W x C` or `C x H x W`; uint8, uint16, bool, or floats in
    [0, 1]) or paths to image files. They are converted to RGB first: transparency is composited over
    `background_color`, 16-bit images are scaled (not clipped) to 8 bits, greyscale/palette/CMYK are converted.

    The texts' default maximum length is a tokenizer default, as everywhere in transformers: `max_length=...` here
    (or `EntityCLIPProcessor.from_pretrained(path, max_length=...)`) stores it in a copy of the tokenizer, whose
    `tokenizer_config.json` saves it; a call's `max_length` wins over it. Without one, texts are truncated at the
    tokenizer's `model_max_length` (77 for CLIP).

    Args:
        image_processor ([`CLIPImageProcessor`]): CLIP's image preprocessing.
        tokenizer ([`CLIPTokenizer`]): CLIP's tokenizer, used for texts and explanations.
        max_length (`int`, *optional*, keyword only):
            Default maximum length of the texts, kept with the tokenizer (see above).
        explanation_max_length (`int`, *optional*):
            Default maximum length of the explanations; `None` means the same as the texts.
        background_color (`tuple[int, int, int]`, defaults to white):
            Colour under transparent pixels. White, because transparent regions of logos and cut-outs are meant to
            be seen on a light page, and black would be read as image content.
        max_image_pixels (`int`, defaults to 178,956,970):
            Largest image (width x height) accepted, as a file, a PIL image or an array; larger ones are refused
            before any conversion, so that one huge image cannot exhaust the memory of a long job.
    """

    valid_processor_kwargs = EntityCLIPProcessorKwargs

    # Our defaults, below the tokenizer's saved ones and the call's (ProcessorMixin._merge_kwargs' order): pad to the
    # longest sample of the batch (much faster than padding every text to 77), truncate at the model's maximum length,
    # and return PyTorch tensors, which is what the model takes.
    text_kwargs = {"padding": "longest", "truncation": True, "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}
    explanations_kwargs = {}

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        explanation_max_length: int | None = None,
        background_color: Sequence[int] = (255, 255, 255),
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        if "max_length" in kwargs:
            # The texts' default length is a tokenizer default in ProcessorMixin's order of precedence (saved in
            # tokenizer_config.json, below the call's own kwargs). On a copy: the caller's tokenizer stays as it was.
            max_length = _check_length("max_length", kwargs.pop("max_length"))
            if max_length is not None and tokenizer is not None:
                tokenizer = copy.deepcopy(tokenizer)
                tokenizer.init_kwargs["max_length"] = max_length
        # Set before ProcessorMixin.__init__ so that to_dict() saves them and from_pretrained() restores them.
        self.explanation_max_length = _check_length("explanation_max_length", explanation_max_length)
        # A list, as JSON gives it back: a processor built in memory and one loaded from disk compare equal.
        self.background_color = list(_check_color(background_color))
        self.max_image_pixels = _check_max_image_pixels(max_image_pixels)
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_args_and_dict(cls, args, processor_dict: dict, **kwargs):
        # entityclip-hf 0.1.0 saved the texts' `max_length` in processor_config.json. It now lives with the tokenizer
        # (ProcessorMixin would drop the unknown key silently and truncate at 77): move it there.
        processor_dict = dict(processor_dict)
        legacy_max_length = processor_dict.pop("max_length", None)
        result = super().from_args_and_dict(args, processor_dict, **kwargs)
        if legacy_max_length is not None:
            processor = result[0] if isinstance(result, tuple) else result
            saved = processor.tokenizer.init_kwargs.setdefault("max_length", legacy_max_length)
            logger.warning(
                "processor_config.json has the texts' max_length=%s of entityclip-hf 0.1.0; it now belongs to the "
                "tokenizer, which uses max_length=%s (save the processor again to store it there).",
                legacy_max_length,
                saved,
            )
        return result

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # A tokenizers-backed tokenizer keeps the truncation and padding of its last call, and tokenizer.json saves
        # them: reloaded, the last call's max_length would become the tokenizer's default (its init_kwargs), which
        # ProcessorMixin applies to every later call. Defaults the tokenizer came with are in its init_kwargs, which
        # tokenizer_config.json saves; so the backend is saved without the call's state, which is put back after.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        call_state = None if backend is None else (backend.truncation, backend.padding)
        if backend is not None:
            backend.no_truncation()
            backend.no_padding()
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            # transformers' custom_object_save leaves `auto_map` on this object once it is in the saved file (it cleans
            # the tokenizer only): to_dict() would then change by saving, and differ from the processor loaded back.
            self.__dict__.pop("auto_map", None)
            if backend is not None:
                _restore_backend_state(backend, call_state)

    def __call__(
        self,
        images: Image.Image | np.ndarray | str | os.PathLike | Sequence | None = None,
        text: str | Sequence[str] | None = None,
        explanations: str | Sequence[str | None] | None = None,
        **kwargs: Unpack[EntityCLIPProcessorKwargs],
    ) -> BatchFeature:
        """Turn a batch of images, texts and explanations (any of them may be omitted) into model inputs.

        Args:
            images: One image or a list of images (PIL image, numpy array, or path to an image file).
            text: One string or a list of strings.
            explanations: One string or a list of strings or `None` (no explanation for that sample; a blank
                string counts as `None`).
            kwargs: ProcessorMixin's keyword groups (`text_kwargs`, `images_kwargs`, `common_kwargs`, and
                `explanations_kwargs`) or flat keywords of the tokenizer (`padding`, `max_length`, `truncation`,
                ...) and of the image processor (`do_resize`, `size`, `do_rescale`, ...); `return_tensors` is
                `"pt"` (the default), `"np"` or `None` (lists). `explanation_max_length=n` is short for
                `explanations_kwargs={"max_length": n}`; `max_length=None` and `explanation_max_length=None` mean
                the defaults.

        Returns:
            [`BatchFeature`] with `pixel_values` (if images), the tokenizer's outputs for the texts (`input_ids`,
            `attention_mask`) and for the explanations, prefixed with `explanation_` (`explanation_input_ids`,
            `explanation_attention_mask`).

        Raises:
            ValueError: for an empty batch, batches of different lengths, a bad sample (named by its index), or
                keyword arguments that contradict each other.
        """
        if images is None and text is None and explanations is None:
            raise ValueError("EntityCLIPProcessor needs at least one of `images`, `text` or `explanations`.")
        explanation_max_length = _check_length("explanation_max_length", kwargs.pop("explanation_max_length", None))
        if "max_length" in kwargs and kwargs["max_length"] is None:
            # `max_length=None` meant "the processor's default" before this processor followed ProcessorMixin (the
            # collator still passes it); merged as a value, it would override the tokenizer's saved default.
            del kwargs["max_length"]
        merged = self._merge_kwargs(
            EntityCLIPProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        images = _as_image_batch(images)
        texts = _as_text_batch(text, "text", allow_none=False)
        explanations = _as_text_batch(explanations, "explanations", allow_none=True)
        _check_batch_sizes(images=images, text=texts, explanations=explanations)

        text_kwargs = merged["text_kwargs"]
        for key in _PLACEHOLDER_OUTPUT_KWARGS:
            if text_kwargs.pop(key, None) or merged.get(key):
                raise ValueError(f"`{key}=True`: EntityCLIP's texts have no multimodal placeholder tokens.")
        # One conversion at the end for every field: the explanation masks are edited as lists first.
        return_tensors = text_kwargs.pop("return_tensors", None)

        data = {}
        if images is not None:
            rgb_images = [self.load_rgb_image(image, index) for index, image in enumerate(images)]
            data.update(self.image_processor(rgb_images, **merged["images_kwargs"]))
        if texts is not None:
            data.update(self.tokenizer(texts, **text_kwargs))
        if explanations is not None:
            explanation_kwargs = self._explanation_tokenizer_kwargs(
                text_kwargs, merged["explanations_kwargs"], explanation_max_length
            )
            data.update(self._tokenize_explanations(explanations, explanation_kwargs))
        return BatchFeature(data, tensor_type=return_tensors)

    def _explanation_tokenizer_kwargs(self, text_kwargs: dict, explanations_kwargs: dict, call_max_length) -> dict:
        """The tokenizer arguments of the explanations: the texts' merged ones, then the explanations' own."""
        if "return_tensors" in explanations_kwargs:
            raise ValueError(
                "`return_tensors` in `explanations_kwargs`: one tensor type applies to the whole batch; pass it flat "
                "or in `common_kwargs`."
            )
        if call_max_length is not None and "max_length" in explanations_kwargs:
            raise ValueError(
                "The explanations' max_length was passed two times: as `explanation_max_length` and in "
                "`explanations_kwargs`."
            )
        tokenizer_kwargs = {key: value for key, value in text_kwargs.items() if key not in _TEXT_ONLY_KWARGS}
        # The explanations' length: this call's, else the processor's, else the texts' (already in text_kwargs).
        max_length = call_max_length if call_max_length is not None else self.explanation_max_length
        if max_length is not None:
            tokenizer_kwargs["max_length"] = max_length
        tokenizer_kwargs.update(explanations_kwargs)
        # The model reads an all-zero mask row as "no explanation": the mask is needed even if the texts skip theirs.
        tokenizer_kwargs["return_attention_mask"] = True
        return tokenizer_kwargs

    def _tokenize_explanations(self, explanations: list[str | None], tokenizer_kwargs: dict) -> dict:
        # A blank explanation says nothing either, so it counts as missing. A missing one is tokenised as ""
        # (just <|startoftext|><|endoftext|>) so the batch stays rectangular, and its mask row is zeroed.
        missing = [explanation is None or not explanation.strip() for explanation in explanations]
        encoded = self.tokenizer(
            ["" if absent else explanation for explanation, absent in zip(explanations, missing, strict=True)],
            **tokenizer_kwargs,
        )
        encoded["attention_mask"] = [
            [0] * len(mask) if absent else mask for mask, absent in zip(encoded["attention_mask"], missing, strict=True)
        ]
        return {f"explanation_{key}": value for key, value in encoded.items()}

    def load_rgb_image(self, image, index: int = 0) -> Image.Image:
        """Return `image` (PIL image, numpy array or file path) as an 8-bit RGB PIL image.

        `index` is the sample's position in the batch, used in error messages. Empty images and images larger than
        `max_image_pixels` are refused from their size alone, before anything is decoded or converted.
        """
        if isinstance(image, (str, os.PathLike)):
            image = _open_image_file(image, index, self.max_image_pixels)
        elif isinstance(image, np.ndarray):
            image = _array_to_image(image, index, self.max_image_pixels)
        elif isinstance(image, Image.Image):
            _check_image_size(image.size, index, self.max_image_pixels, "PIL image")
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
    def max_length(self) -> int | None:
        """The texts' default maximum length, saved with the tokenizer; `None`: the tokenizer's `model_max_length`."""
        return self.tokenizer.init_kwargs.get("max_length")

    @property
    def model_input_names(self) -> list[str]:
        text_names = list(self.tokenizer.model_input_names)
        return list(self.image_processor.model_input_names) + text_names + [f"explanation_{n}" for n in text_names]


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


def _check_max_image_pixels(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_image_pixels must be an int >= 1 (width x height), got {value!r}")
    return value


def _check_image_size(size: tuple[int, int], index: int, max_pixels: int, what: str) -> None:
    """Refuse an empty image or one over the pixel limit, from its (width, height) alone."""
    width, height = size
    if width <= 0 or height <= 0:
        # transformers' resize would divide by the zero side (ZeroDivisionError), far from the sample's index.
        raise ValueError(f"image {index}: the {what} is empty ({width}x{height} pixels).")
    if width * height > max_pixels:
        raise ValueError(
            f"image {index}: the {what} has {width}x{height} = {width * height:,} pixels, more than the processor's "
            f"max_image_pixels = {max_pixels:,}; shrink it first, or raise the limit if this size is expected."
        )


def _restore_backend_state(backend, state) -> None:
    """Put back the truncation and padding settings of a `tokenizers.Tokenizer`."""
    truncation, padding = state
    if truncation is not None:
        backend.enable_truncation(**truncation)
    if padding is not None:
        backend.enable_padding(**padding)


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


def _open_image_file(path, index: int, max_pixels: int) -> Image.Image:
    path = os.fspath(path)
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise ValueError(f"image {index}: file not found: '{path}'.") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # DecompressionBombError: over PIL's own limit (Image.MAX_IMAGE_PIXELS), which it checks on opening.
        raise ValueError(
            f"image {index}: cannot read image file '{path}' ({type(error).__name__}: {error})."
        ) from error
    with image:
        # Image.open reads only the header: the size is known before any pixel is decoded.
        _check_image_size(image.size, index, max_pixels, f"image file '{path}'")
        try:
            # Decode now, inside the try: PIL opens lazily, so a truncated file would only fail later.
            image.load()
            return image.copy()
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(
                f"image {index}: cannot read image file '{path}' ({type(error).__name__}: {error})."
            ) from error


def _array_to_image(array: np.ndarray, index: int, max_pixels: int) -> Image.Image:
    shape = array.shape
    # Only views until the size is checked: a huge array must be refused before anything copies it.
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels first -> channels last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(
            f"image {index}: array of shape {shape} is not an image (expected H x W, H x W x C or C x H x W "
            "with 1, 3 or 4 channels)."
        )
    height, width = array.shape[:2]
    if array.size == 0:
        raise ValueError(f"image {index}: array of shape {shape} is not an image: it has no pixels ({width}x{height}).")
    _check_image_size((width, height), index, max_pixels, f"array of shape {shape}")
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
