"""Share EntityCLIP models on the Hugging Face Hub: weights, code, processor and a filled model card in one commit.

transformers' own `push_to_hub` uploads the model and the processor in separate commits and writes a generic
README.md. Here everything is saved into one folder (`save_pretrained` of the model and the processor, which also
copies the code files named in `auto_map`, plus the model card rendered from the top-level `model_card.md`
template) and uploaded with ONE `HfApi.create_commit`, so the repository is never seen half-written and people
without this package can load it with `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .modeling_entityclip import EntityCLIPModel
from .processing_entityclip import EntityCLIPProcessor

__all__ = [
    "DEFAULT_COMMIT_MESSAGE",
    "MODEL_CARD_TEMPLATE",
    "REQUIRED_CODE_FILES",
    "push_entityclip_to_hub",
    "push_folder_to_hub",
    "render_model_card",
    "save_hub_folder",
]

#: The card template: `model_card.md` at the top of the source tree, shipped in wheels as `templates/model_card.md`
#: (a symbolic link in the source tree, so the two never differ).
MODEL_CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"

DEFAULT_COMMIT_MESSAGE = "Upload EntityCLIP model, processor, code and model card"

#: Code files a `trust_remote_code` user needs (the registered classes and what they import relatively).
REQUIRED_CODE_FILES = (
    "configuration_entityclip.py",
    "modeling_entityclip.py",
    "losses.py",
    "processing_entityclip.py",
)

_DIRECTIONS = (("i2t", "Image → text"), ("t2i", "Text → image"))
_RECALL_KS = (1, 5, 10, 50, 100)
_RETRIEVAL_TASK = ("image-text-retrieval", "Image-Text Retrieval")
# Training arguments whose names contain one of these are never published: they hold credentials.
_SECRET_MARKERS = ("token", "secret", "password", "api_key", "apikey", "credential")


def push_entityclip_to_hub(
    model: EntityCLIPModel,
    processor: EntityCLIPProcessor,
    repo_id: str,
    metrics: Mapping[str, float] | None = None,
    dataset_name: str | None = None,
    training_args: Mapping[str, Any] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    dataset_split: str | None = "test",
    base_model: str | None = None,
    license: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    template_path: str | os.PathLike | None = None,
):
    """Upload an EntityCLIP model, its processor, its code files and a filled model card to the Hub in one commit.

    The repository is created if needed (`private` applies only then). The commit holds the safetensors weights,
    `config.json` with `auto_map`, the `.py` files that `trust_remote_code` needs, the processor's files and a
    README.md rendered from `model_card.md` whose `model-index` metadata carries `metrics`.

    Args:
        model: The model to share (unwrapped: not a DDP/Accelerate wrapper).
        processor: Its processor.
        repo_id: `"user/name"` or `"org/name"`.
        metrics: Measured results, as returned by `entityclip_hf.metrics.retrieval_metrics` (`i2t_R@1`, ...,
            `rsum`); other numeric entries (e.g. a validation loss) are listed in the card too.
        dataset_name: The data the model was trained and evaluated on (required with `metrics`).
        training_args: The run's hyper-parameters (e.g. `vars(args)`). Entries whose name suggests a credential,
            and absolute local paths, are left out of the card.
        private: Create the repository as private.
        token: Hub token; defaults to the logged-in user's.
        commit_message: Message of the single commit.
        dataset_split: The split `metrics` were measured on.
        base_model: Hub id of the CLIP checkpoint fine-tuned (inferred from `training_args["model"]` when that is
            a Hub id).
        license: License identifier for the card metadata (e.g. `"mit"`); none is claimed by default.
        revision: Branch to commit to.
        create_pr: Open a pull request instead of committing to the branch.
        template_path: Another card template (Jinja2, same variables as `model_card.md`).

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.
    """
    _check_repo_id(repo_id)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="entityclip-push-") as folder:
        files = save_hub_folder(
            model,
            processor,
            folder,
            repo_id,
            metrics=metrics,
            dataset_name=dataset_name,
            dataset_split=dataset_split,
            training_args=training_args,
            base_model=base_model,
            license=license,
            template_path=template_path,
        )
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name)) for name in files
        ]
        return api.create_commit(
            getattr(repo_url, "repo_id", None) or repo_id,
            operations,
            commit_message=commit_message,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
        )


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, **kwargs):
    """Push a model folder saved by `save_pretrained` (model and processor, e.g. a training run's `best/`).

    The folder is loaded (`EntityCLIPModel` and `EntityCLIPProcessor`, in the dtype it was saved in) and pushed with
    [`push_entityclip_to_hub`], so the commit is complete even if the folder lacks the code files or `auto_map`.
    Keyword arguments are those of [`push_entityclip_to_hub`].
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: not a folder written by save_pretrained.")
    model = EntityCLIPModel.from_pretrained(folder)
    try:
        processor = EntityCLIPProcessor.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{folder} holds no EntityCLIP processor ({error}); save the processor into the same folder."
        ) from error
    return push_entityclip_to_hub(model, processor, repo_id, **kwargs)


def save_hub_folder(
    model: EntityCLIPModel,
    processor: EntityCLIPProcessor,
    folder: str | os.PathLike,
    repo_id: str,
    **card_kwargs,
) -> list[str]:
    """Write into `folder` exactly what [`push_entityclip_to_hub`] uploads, and return the file names (sorted).

    Useful to inspect a repository before publishing it. `card_kwargs` are those of [`render_model_card`]. Raises
    `RuntimeError` if the saved folder would not load with `trust_remote_code` (no `auto_map`, a missing code file).
    """
    config = getattr(model, "config", None)
    if not hasattr(model, "save_pretrained") or getattr(config, "model_type", None) != "entityclip":
        raise TypeError(
            f"model must be an EntityCLIPModel (unwrapped from DDP/Accelerate), got {type(model).__name__}"
            + (f" with model_type {config.model_type!r}" if config is not None else "")
        )
    if not hasattr(processor, "save_pretrained") or not hasattr(processor, "tokenizer"):
        raise TypeError(f"processor must be an EntityCLIPProcessor, got {type(processor).__name__}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    card = render_model_card(model, repo_id, **card_kwargs)
    # Written last and by us: nothing that transformers may write as README.md survives.
    (folder / "README.md").write_text(str(card), encoding="utf-8")
    _check_hub_folder(folder)
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def render_model_card(
    model: EntityCLIPModel,
    repo_id: str,
    metrics: Mapping[str, float] | None = None,
    dataset_name: str | None = None,
    dataset_split: str | None = "test",
    training_args: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    license: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Fill the model card template for `model`: metadata (with `model-index` results), usage, data, metrics.

    Arguments are those of [`push_entityclip_to_hub`]. Returns a `huggingface_hub.ModelCard` (its `.data` holds the
    parsed metadata; `str(card)` is the README.md text).
    """
    _check_repo_id(repo_id)
    metrics = _check_metrics(metrics)
    if metrics and not dataset_name:
        raise ValueError("metrics were given without dataset_name: the card must say what they were measured on.")
    public_args = _public_training_args(training_args)
    if base_model is None and training_args is not None:
        base_model = _hub_id_or_none(training_args.get("model"))
    model_name = repo_id.split("/")[-1]

    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        license=license,
        base_model=base_model,
        tags=["entityclip", "clip", "image-text-retrieval", "entity-centric", "custom_code"],
        eval_results=_eval_results(metrics, dataset_name, dataset_split) or None,
    )
    template_file = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATE
    if not template_file.is_file():
        raise FileNotFoundError(
            f"model card template not found at {template_file}; pass template_path= (the package's template is "
            "entityclip_hf/templates/model_card.md, a link to model_card.md at the top of its source tree)."
        )
    # StrictUndefined: a misspelt variable in the template fails here instead of leaving a hole in a published card.
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    template = environment.from_string(template_file.read_text(encoding="utf-8"))
    content = template.render(
        card_data=card_data.to_yaml(),
        repo_id=repo_id,
        model_name=model_name,
        base_model=base_model,
        dataset_name=dataset_name,
        dataset_split=dataset_split,
        metric_rows=_metric_rows(metrics),
        rsum=_format_number(metrics["rsum"], 2) if "rsum" in metrics else None,
        other_metrics=_other_metrics(metrics),
        training_args=public_args,
        architecture=_architecture(model.config),
        num_parameters=_format_count(sum(parameter.numel() for parameter in model.parameters())),
        package_version=_package_version(),
        license=license,
    )
    return ModelCard(content)


# ---------------------------------------------------------------------------------------------------- helpers
def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo_id must look like 'user/name' or 'org/name', got {repo_id!r}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repository id: {error}") from error


def _check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}.")
    checked = {}
    for name, value in metrics.items():
        if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"metric {name!r} must be a finite number, got {value!r}.")
        checked[str(name)] = float(value)
    return checked


def _eval_results(metrics: dict[str, float], dataset_name: str | None, split: str | None) -> list[EvalResult]:
    results = []
    for name, value in metrics.items():
        if not _is_retrieval_metric(name):
            continue
        results.append(
            EvalResult(
                task_type=_RETRIEVAL_TASK[0],
                task_name=_RETRIEVAL_TASK[1],
                dataset_type=_slug(dataset_name),
                dataset_name=dataset_name,
                dataset_split=split,
                metric_type=name.lower(),
                metric_name=_metric_title(name),
                metric_value=round(value, 4),
            )
        )
    return results


def _is_retrieval_metric(name: str) -> bool:
    return name == "rsum" or re.fullmatch(r"(i2t|t2i)_(R@\d+|median_rank|mean_rank)", name) is not None


def _metric_title(name: str) -> str:
    if name == "rsum":
        return "rsum (R@1+R@5+R@10, both directions)"
    direction, measure = name.split("_", 1)
    return f"{dict(_DIRECTIONS)[direction]} {measure.replace('_', ' ')}"


def _metric_rows(metrics: dict[str, float]) -> list[dict[str, str]]:
    rows = []
    for direction, title in _DIRECTIONS:
        if not any(name.startswith(direction + "_") for name in metrics):
            continue
        row = {"direction": title}
        for k in _RECALL_KS:
            value = metrics.get(f"{direction}_R@{k}")
            row[f"R@{k}"] = _format_number(value, 2) if value is not None else "–"
        for measure, digits in (("median_rank", 0), ("mean_rank", 2)):
            value = metrics.get(f"{direction}_{measure}")
            row[measure] = _format_number(value, digits) if value is not None else "–"
        rows.append(row)
    return rows


def _other_metrics(metrics: dict[str, float]) -> list[tuple[str, str]]:
    return [(name, _format_number(value, 4)) for name, value in metrics.items() if not _is_retrieval_metric(name)]


def _format_number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def _format_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit} ({count:,})"
    return str(count)


def _public_training_args(training_args: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """The hyper-parameters worth publishing: no credentials, no absolute paths of the publisher's machine."""
    if not training_args:
        return []
    rows = []
    for name, value in sorted(training_args.items()):
        lowered = str(name).lower()
        if any(marker in lowered for marker in _SECRET_MARKERS):
            continue
        if isinstance(value, (str, os.PathLike)) and os.path.isabs(os.fspath(value)):
            continue
        if isinstance(value, (list, tuple, dict)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        # Keep a Markdown table cell intact.
        rows.append((str(name), text.replace("|", "\\|").replace("\n", " ").replace("`", "'")))
    return rows


def _hub_id_or_none(value: Any) -> str | None:
    """`value` if it names a Hub repository ("org/name") rather than a local folder, else None."""
    if not isinstance(value, str) or value.count("/") != 1 or os.path.exists(value):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _slug(name: str | None) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (name or "").lower()).strip("-") or "unknown"


def _architecture(config) -> dict[str, Any]:
    clip = config.clip_config
    return {
        "projection_dim": clip.projection_dim,
        "image_size": clip.vision_config.image_size,
        "patch_size": clip.vision_config.patch_size,
        "vision_layers": clip.vision_config.num_hidden_layers,
        "text_layers": clip.text_config.num_hidden_layers,
        "max_text_length": clip.text_config.max_position_embeddings,
        "num_vision_experts": config.num_vision_experts,
        "num_text_experts": config.num_text_experts,
        "num_shared_experts": config.num_shared_experts,
        "beta": config.beta,
        "gamma": config.gamma,
    }


def _package_version() -> str:
    try:
        return importlib_metadata.version("entityclip-hf")
    except importlib_metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _check_hub_folder(folder: Path) -> None:
    """Fail before uploading if the folder would not load with `trust_remote_code` in a fresh environment."""
    problems = []
    names = {path.name for path in folder.iterdir()}
    if "model.safetensors" not in names and "model.safetensors.index.json" not in names:
        problems.append("no safetensors weights (model.safetensors)")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    auto_map = config.get("auto_map") or {}
    for auto_class in ("AutoConfig", "AutoModel"):
        if auto_class not in auto_map:
            problems.append(f"config.json auto_map lacks {auto_class}")
    processor_config = folder / "processor_config.json"
    processor_map = (
        json.loads(processor_config.read_text(encoding="utf-8")).get("auto_map") or {}
        if processor_config.is_file()
        else {}
    )
    if "AutoProcessor" not in processor_map:
        problems.append("processor_config.json auto_map lacks AutoProcessor")
    missing_code = [name for name in REQUIRED_CODE_FILES if name not in names]
    if missing_code:
        problems.append("code files missing: " + ", ".join(missing_code))
    if problems:
        raise RuntimeError(
            f"the folder to push ({folder}) would not load with trust_remote_code: " + "; ".join(problems) + ". "
            "Import entityclip_hf (it registers the classes for the Auto classes) before saving."
        )
