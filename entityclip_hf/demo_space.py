"""`entityclip-demo --export-space DIR`: the demo page as a Hugging Face Space folder, runnable with `python app.py`.

The folder holds everything the page needs and nothing it must fetch, apart from the pip requirements:

    DIR/README.md             Space card: front matter with `sdk: gradio`, `app_file: app.py`, the gradio version
    DIR/app.py                starts `entityclip_hf.demo_app` on the bundled files
    DIR/requirements.txt      this package's dependencies and gradio, pinned to what wrote the folder where it matters
    DIR/entityclip_hf/        this package's source (the page's code; the Space has no other way to get it)
    DIR/model/                a copy of --model (or, with --space-model-id, a reference to that Hub model)
    DIR/gallery/test.jsonl    the gallery's items in the package's JSON-lines format: id, image, text
    DIR/gallery/images/       their images
    DIR/gallery/image_embeddings.safetensors, text_embeddings.safetensors   so the Space opens without encoding

The embeddings are encoded here once, so a Space on a small CPU opens its gallery at once.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata as importlib_metadata
from pathlib import Path

__all__ = ["export_space"]

SPLIT = "test"
_SPACE_FILES = ("README.md", "app.py", "requirements.txt", "entityclip_hf", "model", "gallery")

_APP = '''"""EntityCLIP search demo: a Hugging Face Space written by `entityclip-demo --export-space`.

Run it with `python app.py` (Spaces do): it serves the bundled model and gallery with the bundled entityclip_hf.
Locally the page listens on 127.0.0.1:7860; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT change that (Spaces set them).
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the entityclip_hf copied beside this file, whatever else is installed
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from entityclip_hf.demo_app import main  # noqa: E402

MODEL = {model!r}  # a folder beside this file, or a Hub model id
GALLERY = HERE / "gallery"

if __name__ == "__main__":
    model = str(HERE / MODEL) if (HERE / MODEL).is_dir() else MODEL
    sys.exit(
        main(
            [
                "--model", model,
                "--index", str(GALLERY / "image_embeddings.safetensors"),
                "--text-index", str(GALLERY / "text_embeddings.safetensors"),
                "--dataset", "jsonl", "--root", str(GALLERY), "--split", "{split}",
                "--title", {title!r},
            ]
        )
    )
'''


def export_space(args) -> Path:
    """Write the Space folder for the parsed `entityclip-demo` arguments and return it."""
    import gradio

    from .demo_app import prepare
    from .retrieval import save_embeddings

    folder = Path(args.export_space)
    if folder.exists() and any(folder.iterdir()):
        found = {path.name for path in folder.iterdir()}
        if not found <= set(_SPACE_FILES):
            raise FileExistsError(
                f"{folder} holds files that are not a Space written by entityclip-demo ({sorted(found)[:5]}); "
                "choose an empty folder."
            )
    if args.dataset is None:
        raise ValueError("--export-space needs --dataset (and --root): the Space shows the split's images.")
    _, _, loader, _ = prepare(args)
    loader.start().done.wait()
    search = loader.ready()
    if search.text_index is None:
        raise ValueError("the split has no captions: a Space needs them for image → text search.")
    for name in _SPACE_FILES:  # a previous export is replaced as a whole, never mixed with this one
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    gallery = folder / "gallery"
    (gallery / "images").mkdir(parents=True)
    records, image_ids = _write_items(search, gallery)
    save_embeddings(
        gallery / "image_embeddings.safetensors",
        search.image_index.embeddings.cpu(),
        image_ids,
        {"modality": "image", "model": str(args.model), "source": "gallery", "split": SPLIT},
    )
    text_rows = [search.text_index_row(item_id) for item_id in image_ids]
    save_embeddings(
        gallery / "text_embeddings.safetensors",
        search.text_index.embeddings[text_rows].cpu(),
        image_ids,
        {"modality": "text", "model": str(args.model), "source": "gallery", "split": SPLIT},
    )
    (gallery / f"{SPLIT}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    model_reference = args.space_model_id or "model"
    if args.space_model_id is None:
        _copy_model(Path(args.model), folder / "model")
    package = Path(__file__).resolve().parent
    shutil.copytree(package, folder / "entityclip_hf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (folder / "app.py").write_text(_APP.format(model=model_reference, split=SPLIT, title=args.title), encoding="utf-8")
    (folder / "requirements.txt").write_text("\n".join(_requirements(gradio.__version__)) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(_space_card(args, gradio.__version__, len(records)), encoding="utf-8")
    return folder


def _write_items(search, gallery: Path) -> tuple[list[dict], list]:
    """The gallery's pairs as JSON lines with their images copied; only items that have an image and a caption."""
    records, ids = [], []
    for row, item_id in enumerate(search.image_index.ids):
        text_row = search.text_index_row(item_id)
        if text_row is None:
            continue
        name = _copy_image(search, row, gallery / "images", f"{len(records):06d}")
        records.append({"id": item_id, "image": name, "text": search.texts[text_row]})
        ids.append(item_id)
    if not records:
        raise ValueError("no item of the gallery has both an image and a caption: nothing to put in a Space.")
    return records, ids


def _copy_image(search, row: int, folder: Path, stem: str) -> str:
    """Copy a gallery image byte for byte (its embedding stays exact); an image known only in memory goes as PNG."""
    source = search.images.source(row) if hasattr(search.images, "source") else {}
    if source.get("path") and Path(source["path"]).is_file():
        target = folder / (stem + Path(source["path"]).suffix.lower())
        shutil.copyfile(source["path"], target)
    elif source.get("bytes"):
        target = folder / (stem + ".img")
        target.write_bytes(source["bytes"])
    else:
        target = folder / (stem + ".png")
        search.image(row).save(target)
    return f"images/{target.name}"


def _copy_model(source: Path, target: Path) -> None:
    if not (source / "config.json").is_file():
        raise ValueError(
            f"--model {source} is not a local model folder: give --space-model-id HUB_ID to reference a Hub model."
        )
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "checkpoints"))


def _requirements(gradio_version: str) -> list[str]:
    """This package's own dependencies (no extras), then gradio at the version that wrote the folder."""
    try:
        requirements = importlib_metadata.requires("entityclip-hf") or []
    except importlib_metadata.PackageNotFoundError as error:
        raise ImportError("entityclip-hf is not installed (pip install -e .): its dependencies are unknown") from error
    base = [line for line in requirements if "extra ==" not in line]
    return base + [f"gradio=={gradio_version}"]


def _space_card(args, gradio_version: str, num_items: int) -> str:
    model = args.space_model_id or "the bundled `model/` folder"
    front_matter = [
        "---",
        f"title: {json.dumps(args.title)}",
        "emoji: 🔎",
        "colorFrom: blue",
        "colorTo: indigo",
        "sdk: gradio",
        f"sdk_version: {gradio_version}",
        "app_file: app.py",
        "pinned: false",
        "tags:",
        "  - entityclip",
        "  - image-text-retrieval",
    ]
    if args.space_model_id:
        front_matter += ["models:", f"  - {args.space_model_id}"]
    front_matter.append("---")
    body = f"""
# {args.title}

Entity-centric image-text retrieval with [EntityCLIP](https://arxiv.org/abs/2410.17810) over a gallery of
{num_items} images and their captions: text → images, image → texts, and GI-ITM reranking of the top results beside
the CLIP order. Model: {model}. Written by `entityclip-demo --export-space` (entityclip-hf).

Run it locally: `pip install -r requirements.txt && python app.py`, then open http://127.0.0.1:7860.
"""
    return "\n".join(front_matter) + "\n" + body
