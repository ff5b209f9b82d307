"""The model's facts for the demo page: architecture, base CLIP, training data and measured R@K, from its folder.

Read from what this package writes, never guessed: `config.json` (architecture); the folder's README.md model card
as `entityclip_hf.hub` renders it (`base_model`, `model-index` results, "Fine-tuned on **X**"); `results.json` of
the run that `examples/finetune.py` trained (beside `best/`, or in the folder itself): test R@K of `best/` and the
validation metrics before and after training; and `data/demo_info.json`, the demo dataset finetune.py builds in
the run folder. Whatever is not recorded is said to be so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["model_facts", "facts_markdown"]

_DIRECTIONS = (("t2i", "text → image"), ("i2t", "image → text"))
_KS = (1, 5, 10)


def model_facts(model_path: str, model) -> list[tuple[str, str]]:
    """(name, value) rows describing `model`, loaded from `model_path` (a folder or a Hub id)."""
    folder = Path(model_path)
    facts = [("model", str(model_path)), ("architecture", _architecture(model))]
    card = _model_card(folder / "README.md") if folder.is_dir() else None
    run_folder = _run_folder(folder) if folder.is_dir() else None
    facts.append(("base CLIP", _base_model(card)))
    facts.append(("training data", _training_data(card, run_folder)))
    measured = _card_results(card) + _run_results(run_folder)
    facts += measured or [("measured retrieval", "no results recorded with the model (entityclip-eval measures them)")]
    return facts


def facts_markdown(facts: list[tuple[str, str]]) -> str:
    """The facts as a two-column Markdown table."""
    rows = "\n".join(f"| {name} | {value.replace('|', '/')} |" for name, value in facts)
    return "| | |\n|---|---|\n" + rows


def _architecture(model) -> str:
    config = model.config
    clip = getattr(config, "clip_config", config)
    vision, text = clip.vision_config, clip.text_config
    kind = "EntityCLIP (CLIP + MMAE experts + GI-ITM head)" if hasattr(model, "match_probability") else "CLIP"
    parameters = sum(p.numel() for p in model.parameters())
    return (
        f"{kind}; embeddings of {clip.projection_dim}; ViT {vision.num_hidden_layers} layers x {vision.hidden_size} "
        f"on {vision.image_size}px images (patch {vision.patch_size}); text {text.num_hidden_layers} layers x "
        f"{text.hidden_size}; {parameters / 1e6:.1f}M parameters"
    )


def _model_card(path: Path):
    if not path.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(str(path))
    except Exception:  # noqa: BLE001 - a hand-written README that is not a model card: no facts from it
        return None


def _run_folder(folder: Path) -> Path | None:
    """The training run the folder belongs to: itself or its parent, whichever holds finetune.py's results.json."""
    for candidate in (folder, folder.parent):
        if (candidate / "results.json").is_file():
            return candidate
    return None


def _base_model(card) -> str:
    base = card.data.to_dict().get("base_model") if card is not None else None
    if base:
        return ", ".join(base) if isinstance(base, list) else str(base)
    return "not recorded in the model folder"


def _training_data(card, run_folder: Path | None) -> str:
    if card is not None:
        match = re.search(r"Fine-tuned on \*\*(.+?)\*\*", card.text)
        if match:
            return match.group(1)
    if run_folder is not None:
        info_file = run_folder / "data" / "demo_info.json"
        if info_file.is_file():
            try:
                info = json.loads(info_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = {}
            parameters = info.get("parameters", info)
            entities = parameters.get("num_entities") if isinstance(parameters, dict) else None
            size = f" ({entities} made-up entities)" if entities else ""
            return f"the package's demo dataset{size}, built by finetune.py in {run_folder / 'data'}"
    return "not recorded in the model folder"


def _recall_summary(metrics: dict) -> str:
    parts = []
    for direction, name in _DIRECTIONS:
        values = [metrics.get(f"{direction}_R@{k}") for k in _KS]
        if any(value is not None for value in values):
            cells = ", ".join(f"R@{k} {value:.1f}" for k, value in zip(_KS, values, strict=True) if value is not None)
            parts.append(f"{name}: {cells}")
    if metrics.get("rsum") is not None:
        parts.append(f"rsum {metrics['rsum']:.1f}")
    return "; ".join(parts)


def _card_results(card) -> list[tuple[str, str]]:
    results = getattr(card.data, "eval_results", None) if card is not None else None
    if not results:
        return []
    by_dataset: dict[tuple, dict] = {}
    for result in results:
        key = (result.dataset_name, result.dataset_split)
        name = result.metric_type.replace("r@", "R@")
        by_dataset.setdefault(key, {})[name] = float(result.metric_value)
    rows = []
    for (dataset, split), metrics in by_dataset.items():
        summary = _recall_summary(metrics)
        if summary:
            rows.append((f"measured on {dataset}" + (f" ({split})" if split else "") + ", model card", summary))
    return rows


def _run_results(run_folder: Path | None) -> list[tuple[str, str]]:
    if run_folder is None:
        return []
    try:
        results = json.loads((run_folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    rows = []
    where = f"{run_folder / 'results.json'}"
    if isinstance(results.get("test"), dict) and _recall_summary(results["test"]):
        rows.append((f"measured on the test split (best/, {where})", _recall_summary(results["test"])))
    for key, title in (("initial", "validation before training"), ("final", "validation after training")):
        if isinstance(results.get(key), dict) and _recall_summary(results[key]):
            rows.append((title, _recall_summary(results[key])))
    return rows
