"""How fast the demo page (`entityclip-demo`) opens a 10k-image gallery from embedding files.

Writes a gallery of N images (64-pixel JPEGs, listed in the package's JSON-lines format) with synthetic 512-d image
and caption embedding files (ViT-B/32's embedding size), and a tiny EntityCLIP with 512-d projections, so the figures
measure the gallery, not the model's size. Then times, in this process, `load_gallery` from the files (the ids
matched to the split's rows; no image is opened until shown) and the first text query with its top-10 images
decoded; and, as a user sees it, `entityclip-demo` started as a new process until its page answers that the gallery
is ready (Python, torch, transformers and gradio imports included), then one query through gradio_client.

    python bench/bench_demo_gallery.py              # 10,000 items
    python bench/bench_demo_gallery.py --items 30000
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel  # noqa: E402
from entityclip_hf.demo_gallery import load_gallery  # noqa: E402
from entityclip_hf.retrieval import save_embeddings  # noqa: E402
from entityclip_hf.tiny_models import tiny_clip_config, tiny_image_processor, train_bpe_tokenizer  # noqa: E402

DIM = 512


def write_gallery(folder: Path, items: int) -> None:
    """N items: JSON lines + JPEG files (copies of 16 drawn images: opening never reads them) + embedding files."""
    images = folder / "images"
    images.mkdir(parents=True)
    originals = []
    for colour in range(16):
        path = images / f"original-{colour}.jpg"
        Image.new("RGB", (64, 64), (16 * colour, 255 - 16 * colour, 128)).save(path)
        originals.append(path)
    ids = [f"photo-{i:06d}" for i in range(items)]
    with (folder / "test.jsonl").open("w") as lines:
        for i, item_id in enumerate(ids):
            shutil.copyfile(originals[i % 16], images / f"{item_id}.jpg")
            lines.write(json.dumps({"id": item_id, "image": f"images/{item_id}.jpg", "text": f"Caption {i}."}) + "\n")
    generator = torch.Generator().manual_seed(0)
    for modality in ("image", "text"):
        embeddings = torch.randn(items, DIM, generator=generator)
        save_embeddings(folder / f"{modality}s.safetensors", embeddings, ids, {"modality": modality})


def in_process(model_folder: Path, gallery: Path) -> dict[str, float]:
    from entityclip_hf.evaluation import load_model_and_processor

    model, processor = load_model_and_processor(model_folder)
    started = time.perf_counter()
    search = load_gallery(
        model, processor, index=str(gallery / "images.safetensors"), text_index=str(gallery / "texts.safetensors"),
        dataset="jsonl", root=str(gallery),
    )  # fmt: skip
    opened = time.perf_counter() - started
    started = time.perf_counter()
    result = search.search_images("Caption 17.", 10)
    images = [search.image(hit.row) for hit in result.clip]
    assert len(images) == 10 and search.num_images == search.num_texts
    return {"open": opened, "query": time.perf_counter() - started, "items": search.num_images}


def as_a_user(model_folder: Path, gallery: Path) -> dict[str, float]:
    from gradio_client import Client

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from demo_helpers import free_port, wait_for_http

    port = free_port()
    command = [sys.executable, "-m", "entityclip_hf.demo_app", "--model", str(model_folder), "--port", str(port),
               "--index", str(gallery / "images.safetensors"), "--text-index", str(gallery / "texts.safetensors"),
               "--dataset", "jsonl", "--root", str(gallery)]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_http(url, timeout=300, process=process)
        page = time.perf_counter() - started
        client = Client(url, verbose=False)
        status, _ = client.predict(api_name="/gallery_status")  # waits until the gallery is ready
        ready = time.perf_counter() - started
        assert "ready" in status, status
        query_started = time.perf_counter()
        client.predict("Caption 17.", "", 10, False, api_name="/search_images")
        query = time.perf_counter() - query_started
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {"page": page, "ready": ready, "query": query}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        tmp = Path(tmp)
        tokenizer = train_bpe_tokenizer()
        torch.manual_seed(0)
        config = EntityCLIPConfig(clip_config=tiny_clip_config(tokenizer, projection_dim=DIM))
        EntityCLIPModel(config).save_pretrained(tmp / "model")
        from entityclip_hf.processing_entityclip import EntityCLIPProcessor

        EntityCLIPProcessor(image_processor=tiny_image_processor(32), tokenizer=tokenizer).save_pretrained(
            tmp / "model"
        )
        started = time.perf_counter()
        write_gallery(tmp / "gallery", args.items)
        print(f"wrote a gallery of {args.items} items in {time.perf_counter() - started:.1f} s")
        inside = in_process(tmp / "model", tmp / "gallery")
        user = as_a_user(tmp / "model", tmp / "gallery")
    print(f"\n| {args.items} items, {DIM}-d embedding files | seconds |\n|---|---|")
    print(f"| load_gallery (embeddings + ids matched to the split's rows) | {inside['open']:.2f} |")
    print(f"| first text query, top-10 images decoded | {inside['query']:.3f} |")
    print(f"| `entityclip-demo` process start -> page answers | {user['page']:.1f} |")
    print(f"| `entityclip-demo` process start -> gallery ready | {user['ready']:.1f} |")
    print(f"| one query through gradio_client | {user['query']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
