"""Checks of what EntityCLIP is given, with errors that name the problem: model inputs, and checkpoints to load.

Without them, bad inputs fail deep inside torch ("index out of range in self", a shape error in a matmul) or, for
raw uint8 pixels, run silently wrong. This file is copied beside saved models for `trust_remote_code` users: it
imports only torch, safetensors and transformers.
"""

import os

import torch
from safetensors import SafetensorError
from transformers import CLIPConfig


def _describe(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)} ({str(tensor.dtype).replace('torch.', '')})"


def _is_tracing() -> bool:
    # Value checks read tensor data (a device sync, a graph break): skipped under torch.compile / torch.export.
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def check_model_inputs(
    config,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    explanation_input_ids: torch.Tensor | None,
    explanation_attention_mask: torch.Tensor | None,
    paired: bool,
) -> None:
    """Reject inputs that would fail deep inside torch (or, worse, run silently wrong), naming argument and shape."""
    vocab_size = config.clip_config.text_config.vocab_size
    max_positions = config.clip_config.text_config.max_position_embeddings
    num_channels = config.clip_config.vision_config.num_channels
    for name, ids, mask in (
        ("input_ids", input_ids, attention_mask),
        ("explanation_input_ids", explanation_input_ids, explanation_attention_mask),
    ):
        if ids is None:
            continue
        mask_name = name.replace("input_ids", "attention_mask")
        if ids.ndim != 2:
            raise ValueError(
                f"`{name}` must be 2-D [batch_size, sequence_length], got {_describe(ids)}; "
                "a single text is a batch of one (`ids[None]`)."
            )
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"`{name}` must hold integer token ids, got {_describe(ids)}.")
        if ids.shape[0] == 0:
            raise ValueError(f"`{name}` is an empty batch ({_describe(ids)}).")
        if ids.shape[1] > max_positions:
            raise ValueError(
                f"`{name}` has {ids.shape[1]} tokens but the text encoder has {max_positions} positions: truncate "
                "(the processor does)."
            )
        if not _is_tracing() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(
                f"`{name}` holds ids {int(ids.min())}..{int(ids.max())} outside the vocabulary 0..{vocab_size - 1}: "
                "was it made by another tokenizer?"
            )
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"`{mask_name}` has {_describe(mask)} but `{name}` has {_describe(ids)}: they must match.")
    if pixel_values is not None:
        if pixel_values.dtype == torch.uint8:
            raise ValueError(
                f"`pixel_values` are raw uint8 pixels ({_describe(pixel_values)}): normalise them with the model's "
                "processor (EntityCLIPProcessor / CLIPImageProcessor), which also resizes and crops."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"`pixel_values` must be a float tensor, got {_describe(pixel_values)}.")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
            raise ValueError(
                f"`pixel_values` must be [batch_size, {num_channels}, height, width], got {_describe(pixel_values)}."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError(f"`pixel_values` is an empty batch ({_describe(pixel_values)}).")
    if paired and input_ids is not None and pixel_values is not None and input_ids.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            "matching pairs are needed here (row i of the texts describes image i: return_loss=True, "
            f"match_probability), but got {pixel_values.shape[0]} images and {input_ids.shape[0]} texts."
        )
    if explanation_input_ids is not None and input_ids is not None:
        if explanation_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"`explanation_input_ids` has {explanation_input_ids.shape[0]} rows but `input_ids` has "
                f"{input_ids.shape[0]}: one explanation row per text (an all-zero mask row for none)."
            )
    if explanation_attention_mask is not None and explanation_input_ids is None:
        raise ValueError("`explanation_attention_mask` was given without `explanation_input_ids`.")


def read_config_dict(pretrained_model_name_or_path, hub_kwargs: dict) -> dict:
    """The checkpoint's config.json as a dict (CLIP's or ours), with errors that name the folder and file."""
    name = os.fspath(pretrained_model_name_or_path)
    # A Hub id is "name" or "owner/name"; anything else that is not a folder here is a local path that is missing
    # (transformers would report it as a malformed repo id).
    looks_like_a_path = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_a_path and not os.path.isdir(os.path.expanduser(name)):
        raise OSError(f"model folder not found: '{name}'")
    config_dict, _ = CLIPConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
    if config_dict.get("model_type") not in ("clip", None) and "clip_config" not in config_dict:
        raise ValueError(
            f"{os.path.join(name, hub_kwargs.get('subfolder', ''), 'config.json')} has no `clip_config` (the CLIP "
            f"backbone's shapes) for its {config_dict.get('model_type')!r} model: the file is incomplete or not an "
            "EntityCLIP config."
        )
    return config_dict


def load_or_name_the_file(load, pretrained_model_name_or_path):
    """Run `load()`; a damaged weights file is reported with its path instead of safetensors' bare header error."""
    try:
        return load()
    except SafetensorError as error:
        folder = os.fspath(pretrained_model_name_or_path)
        weights = [name for name in os.listdir(folder) if name.endswith(".safetensors")] if os.path.isdir(folder) else []
        where = ", ".join(os.path.join(folder, name) for name in sorted(weights)) or folder
        raise OSError(f"cannot read the weights in {where}: not a valid safetensors file ({error})") from error


__all__ = ["check_model_inputs", "load_or_name_the_file", "read_config_dict"]
