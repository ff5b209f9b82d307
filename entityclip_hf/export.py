"""Export a fine-tuned EntityCLIP as what the ecosystem already runs: a plain CLIP folder, and ONNX towers.

    entityclip-export outputs/entityclip/best exported-clip            # CLIPModel + CLIPProcessor files
    entityclip-export outputs/entityclip/best exported-clip --onnx     # + image_encoder.onnx, text_encoder.onnx

The CLIP folder loads with `CLIPModel.from_pretrained`, `pipeline("zero-shot-image-classification")` and
`sentence_transformers.SentenceTransformer`, and gives exactly the fine-tuned model's embeddings: EntityCLIP's extra
layers are training-time only. The ONNX files hold one tower each (images -> embeddings, token ids + mask ->
embeddings), with dynamic batch (and text length) axes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPModel

IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"


class ImageEncoder(nn.Module):
    """CLIP's image tower + projection as one module: pixel_values [B, 3, H, W] -> image_embeds [B, D] (unnormalised)."""

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.get_image_features(pixel_values=pixel_values).pooler_output


class TextEncoder(nn.Module):
    """CLIP's text tower + projection: input_ids, attention_mask [B, L] -> text_embeds [B, D] (unnormalised)."""

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _as_clip(model) -> CLIPModel:
    clip = getattr(model, "clip", model)
    if not isinstance(clip, CLIPModel):
        raise ValueError(f"expected an EntityCLIPModel or a CLIPModel, got {type(model).__name__}")
    return clip


def export_onnx(model, output_dir: str | os.PathLike, opset_version: int = 18) -> dict[str, Path]:
    """Write the image and text towers of `model` (EntityCLIP or CLIP) as two ONNX files; returns their paths.

    The towers are exported in eval mode with eager attention (the ONNX graph of SDPA is the same math) and float32.
    """
    clip = _as_clip(model).eval()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    vision, text = clip.config.vision_config, clip.config.text_config
    pixel_values = torch.zeros(2, vision.num_channels, vision.image_size, vision.image_size)
    length = min(8, text.max_position_embeddings)
    input_ids = torch.ones(2, length, dtype=torch.long)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1)
    sequence = torch.export.Dim("sequence", min=2, max=text.max_position_embeddings)
    paths = {"image": output_dir / IMAGE_ONNX, "text": output_dir / TEXT_ONNX}
    with torch.no_grad():
        torch.onnx.export(
            ImageEncoder(clip).eval(),
            (pixel_values,),
            paths["image"],
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_shapes={"pixel_values": {0: batch}},
            opset_version=opset_version,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        torch.onnx.export(
            TextEncoder(clip).eval(),
            (input_ids, attention_mask),
            paths["text"],
            input_names=["input_ids", "attention_mask"],
            output_names=["text_embeds"],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
            opset_version=opset_version,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return paths


def export_clip(model_dir: str | os.PathLike, output_dir: str | os.PathLike, onnx: bool = False) -> Path:
    """Load an EntityCLIP folder (model + processor) and write it as a plain CLIP folder (+ ONNX towers)."""
    from . import EntityCLIPModel, EntityCLIPProcessor

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved model folder (no config.json)")
    model = EntityCLIPModel.from_pretrained(model_dir, dtype=torch.float32)
    processor = None
    if (model_dir / "processor_config.json").is_file() or (model_dir / "preprocessor_config.json").is_file():
        processor = EntityCLIPProcessor.from_pretrained(model_dir)
    model.save_clip_pretrained(output_dir, processor=processor)
    if processor is None:
        print(f"note: {model_dir} has no processor files; copy CLIP's tokenizer/image processor next to the export")
    if onnx:
        export_onnx(model, output_dir)
    return output_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="entityclip-export", description="Write a fine-tuned EntityCLIP as a plain CLIPModel folder (and ONNX)."
    )
    parser.add_argument("model_dir", help="an EntityCLIP folder (save_pretrained: best/, final/)")
    parser.add_argument("output_dir", help="where the CLIP folder is written")
    parser.add_argument("--onnx", action="store_true", help=f"also write {IMAGE_ONNX} and {TEXT_ONNX}")
    args = parser.parse_args(argv)
    try:
        output_dir = export_clip(args.model_dir, args.output_dir, onnx=args.onnx)
    except (FileNotFoundError, ValueError, OSError) as error:
        parser.error(str(error))
    print(f"wrote a CLIPModel folder to {output_dir}" + (" with ONNX towers" if args.onnx else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ImageEncoder", "TextEncoder", "export_clip", "export_onnx", "main"]
