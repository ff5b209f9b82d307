"""`entityclip-demo --export-space DIR`: a Hugging Face Space folder that runs on its own with `python app.py`."""

import os
import subprocess
import sys

import pytest
import yaml

from .demo_helpers import free_port, make_split, save_tiny_model, wait_for_http

pytest.importorskip("gradio_client", reason="the demo tests need gradio (pip install -e '.[dev]')")
from gradio_client import Client  # noqa: E402

from entityclip_hf.demo_app import main  # noqa: E402
from entityclip_hf.evaluation import load_model_and_processor, load_split  # noqa: E402
from entityclip_hf.retrieval import EmbeddingIndex, encode_images, encode_texts  # noqa: E402


@pytest.fixture(scope="module")
def space(tmp_path_factory, tiny_clip_config, tiny_processor):
    folder = tmp_path_factory.mktemp("space-source")
    model_folder = save_tiny_model(folder / "best", tiny_clip_config, tiny_processor, seed=1)
    root = make_split(folder / "data")
    out = folder / "my-space"
    argv = ["--model", str(model_folder), "--dataset", "jsonl", "--root", str(root), "--export-space", str(out)]
    assert main(argv) == 0
    return out, model_folder, root


def test_the_space_folder_has_what_the_hub_expects(space):
    out, _, _ = space
    readme = (out / "README.md").read_text(encoding="utf-8")
    front_matter = yaml.safe_load(readme.split("---")[1])
    import gradio

    assert front_matter["sdk"] == "gradio" and front_matter["app_file"] == "app.py"
    assert front_matter["sdk_version"] == gradio.__version__
    requirements = (out / "requirements.txt").read_text().splitlines()
    assert f"gradio=={gradio.__version__}" in requirements
    assert any(line.startswith("transformers") for line in requirements)
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert (out / "entityclip_hf" / "demo_app.py").is_file() and not list(out.rglob("__pycache__"))
    lines = (out / "gallery" / "test.jsonl").read_text().splitlines()
    assert len(lines) == 8 and len(list((out / "gallery" / "images").iterdir())) == 8


def test_python_app_py_serves_the_same_results_as_the_source_gallery(space, tmp_path):
    out, model_folder, root = space
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the Space's own copy of the package
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_ANALYTICS_ENABLED="False")
    log = tmp_path / "space.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "app.py"], cwd=out, env=env, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_for_http(url, timeout=180, process=process)
            client = Client(url, verbose=False)
            status, _ = client.predict(api_name="/gallery_status")
            query = "Felix Okafor speaks to reporters after the vote."
            result = client.predict(query, "", 5, False, api_name="/search_images")
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert "8 images, 8 captions" in status, log.read_text()[-3000:]
    model, processor = load_model_and_processor(model_folder)
    split, _ = load_split("jsonl", root, "test")
    index = EmbeddingIndex(encode_images(model, processor, split, progress=False), split["id"])
    hits = index.search(encode_texts(model, processor, [query], progress=False), k=5)
    rows = result[2]["data"]
    assert [row[1] for row in rows] == hits.ids[0]
    assert [row[2] for row in rows] == pytest.approx(hits.scores[0].tolist(), abs=1e-4)
    assert f"entityclip_hf from {out / 'entityclip_hf'}" in log.read_text()


def test_export_refuses_a_folder_holding_other_files(space, tmp_path):
    _, model_folder, root = space
    (tmp_path / "thesis.tex").write_text("years of work")
    argv = ["--model", str(model_folder), "--dataset", "jsonl", "--root", str(root), "--export-space", str(tmp_path)]
    assert main(argv) == 2
    assert (tmp_path / "thesis.tex").read_text() == "years of work"
