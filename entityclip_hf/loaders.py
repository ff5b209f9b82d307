"""What evaluation, search and the demo page load: a saved model with its processor, and one split of a dataset.

Kept apart from `evaluation.py` and `retrieval/` so that both use it without importing each other.
"""

from __future__ import annotations

import os

import torch

__all__ = ["load_model_and_processor", "load_split"]


def load_model_and_processor(
    model_path: str | os.PathLike, device: str | torch.device = "cpu", trust_remote_code: bool = False
):
    """Load a saved model and its processor with the Auto classes, in float32, on `device`, in eval mode.

    EntityCLIP loads with this package's classes (registered on import) and plain CLIP with transformers' own, so
    `trust_remote_code` is needed only for other architectures that ship their code.
    """
    from transformers import AutoModel, AutoProcessor

    import entityclip_hf  # noqa: F401  (registers EntityCLIP with the Auto classes)

    text = str(model_path)
    # A Hub id is 'name' or 'user/name': anything else that does not exist is a missing folder.
    looks_local = os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(text)):
        # transformers would answer "Repo id must be in the form ...": say what is wrong instead.
        raise FileNotFoundError(f"{model_path}: no such model folder (nor a Hub id: those are 'name' or 'user/name')")
    try:
        model = AutoModel.from_pretrained(model_path, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except OSError as error:  # no config.json, no weights, an id the Hub (or the offline cache) does not have
        raise OSError(f"cannot load a model from {model_path}: {str(error).splitlines()[0]}") from error
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ValueError(
            f"{model_path} holds a {type(model).__name__}, which has no get_image_features/get_text_features: "
            "not an image-text model."
        )
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), processor


def load_split(
    dataset: str,
    root: str | os.PathLike | None,
    split: str,
    max_samples: int | None = None,
    check_images: str = "header",
    explanations=None,
):
    """One split of a supported dataset via `entityclip_hf.data.load_entity_dataset`, by default without
    explanations (`explanations="auto"`: with those found, for explanation-aware retrieval or reranking).

    Returns `(split, DataReport)`. Rows with a missing or unreadable image are left out by the loader and counted in
    the report. For "demo", `root` is where the demo dataset is (or is built on first use); None means the loader's
    default folder.
    """
    from .data import load_entity_dataset
    from .data.formats import canonical_split

    if root is None and dataset != "demo":
        raise ValueError(f"--dataset {dataset} needs --root, the folder holding its files.")
    # Retrieval uses only the CLIP embeddings: explanations are not needed to evaluate.
    splits, report = load_entity_dataset(
        dataset, root, explanations=explanations, splits=[split], check_images=check_images, return_report=True
    )
    data = splits[canonical_split(split)]
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    return data, report
