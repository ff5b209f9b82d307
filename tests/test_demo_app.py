"""The demo page (`entityclip-demo`), served on a free local port and queried with gradio_client as a user would.

Every ranking on the page must equal what the library computes on its own (`EmbeddingIndex.search`,
`rerank_with_itm`, `rerank_texts_with_itm`); bad input gets a message on the page and the page keeps serving.
"""

import json
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest
import torch
from PIL import Image

from .demo_helpers import make_split, save_tiny_model, served

gradio_client = pytest.importorskip("gradio_client", reason="the demo tests need gradio (pip install -e '.[dev]')")
from gradio_client import Client, handle_file  # noqa: E402

from entityclip_hf.demo_gallery import MAX_K, load_gallery  # noqa: E402
from entityclip_hf.evaluation import load_model_and_processor, load_split  # noqa: E402
from entityclip_hf.retrieval import (  # noqa: E402
    EmbeddingIndex,
    encode_images,
    encode_texts,
    rerank_texts_with_itm,
    rerank_with_itm,
    save_embeddings,
)


class Reference:
    """The library's own answers on the split the page shows, computed without the page."""

    def __init__(self, model_folder, root):
        self.model, self.processor = load_model_and_processor(model_folder)
        self.split, _ = load_split("jsonl", root, "test")
        self.ids, self.texts = self.split["id"], self.split["text"]
        self.images = encode_images(self.model, self.processor, self.split, progress=False)
        self.image_index = EmbeddingIndex(self.images, self.ids)
        self.text_index = EmbeddingIndex(encode_texts(self.model, self.processor, self.texts, progress=False), self.ids)

    def search_images(self, query, k):
        hits = self.image_index.search(encode_texts(self.model, self.processor, [query], progress=False), k=k)
        return hits.ids[0], hits.scores[0].tolist(), hits.indices[0].tolist()

    def image_file(self, item_id):
        return self.root / "images" / f"{item_id}.jpg"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip_config, tiny_processor):
    folder = tmp_path_factory.mktemp("demo")
    model_folder = save_tiny_model(folder / "best", tiny_clip_config, tiny_processor)
    root = make_split(folder / "data")
    reference = Reference(model_folder, root)
    reference.root = root
    return model_folder, root, reference


@pytest.fixture(scope="module")
def page(setup):
    model_folder, root, _ = setup
    argv = ["--model", str(model_folder), "--dataset", "jsonl", "--root", str(root), "--split", "test"]
    with served(argv, max_upload="1mb") as (url, loader):
        yield Client(url, verbose=False), loader


def table_rows(table):
    table = table["value"] if "value" in table else table
    return [dict(zip(table["headers"], row, strict=True)) for row in table["data"]]


def search_images(client, query, k=5, rerank=False, explanation=""):
    names = ("clip_gallery", "rerank_gallery", "clip_table", "rerank_table", "message")
    return dict(zip(names, client.predict(query, explanation, k, rerank, api_name="/search_images"), strict=True))


def search_texts(client, upload=None, gallery_id="", k=5, rerank=False):
    names = ("query_image", "clip_table", "rerank_table", "message")
    upload = handle_file(str(upload)) if upload is not None else None
    return dict(zip(names, client.predict(upload, gallery_id, k, rerank, api_name="/search_texts"), strict=True))


def test_gallery_status_says_what_is_served(page):
    client, loader = page
    status, examples = client.predict(api_name="/gallery_status")
    assert "8 images, 8 captions" in status and "ready" in status
    assert {choice[0] for choice in examples["choices"]} <= set(loader.search.texts)


def test_text_query_equals_embedding_index_search(page, setup):
    client, _ = page
    reference = setup[2]
    query = "Crowds gather in the harbour for the summit."
    result = search_images(client, query, k=5)
    ids, scores, _ = reference.search_images(query, 5)
    rows = table_rows(result["clip_table"])
    assert [row["id"] for row in rows] == ids
    assert [row["cosine"] for row in rows] == pytest.approx(scores, abs=1e-4)
    captions = [item["caption"] for item in result["clip_gallery"]]
    assert [caption.split(" · ")[1] for caption in captions] == ids
    assert all(Path(item["image"]).is_file() for item in result["clip_gallery"])
    assert result["message"] == "" and table_rows(result["rerank_table"]) == []


def test_a_caption_of_the_split_marks_its_own_image(page, setup):
    client, _ = page
    reference = setup[2]
    row = 3
    query, own_id = reference.texts[row], reference.ids[row]
    result = search_images(client, query, k=8)  # the whole gallery: its own image is somewhere in it
    marked = [r["id"] for r in table_rows(result["clip_table"]) if r["ground truth"] == "✔"]
    assert marked == [own_id]
    rank = reference.search_images(query, 8)[0].index(own_id) + 1
    assert f"{own_id} is #{rank}" in result["message"]
    assert any("ground truth" in item["caption"] and own_id in item["caption"] for item in result["clip_gallery"])


def test_rerank_shows_both_orders_equal_to_rerank_with_itm(page, setup):
    client, _ = page
    reference = setup[2]
    query, explanation = "Oren Ambrose hands out the prizes.", "Oren Ambrose is a person in a red jacket."
    result = search_images(client, query, k=6, rerank=True, explanation=explanation)
    ids, _, rows = reference.search_images(query, 6)
    ranked = rerank_with_itm(
        reference.model,
        reference.processor,
        query,
        [reference.split[row]["image"] for row in rows],
        explanation=explanation,
        candidate_ids=ids,
    )
    clip_rows, reranked_rows = table_rows(result["clip_table"]), table_rows(result["rerank_table"])
    assert [r["id"] for r in clip_rows] == ids
    assert [r["id"] for r in reranked_rows] == [c.id for c in ranked]
    assert [r["GI-ITM probability"] for r in reranked_rows] == pytest.approx(
        [c.match_probability for c in ranked], abs=1e-4
    )
    assert [r["CLIP rank"] for r in reranked_rows] == [ids.index(c.id) + 1 for c in ranked]
    assert result["rerank_gallery"]["visible"] is True
    assert [item["caption"].split(" · ")[1] for item in result["rerank_gallery"]["value"]] == [c.id for c in ranked]


def test_image_query_ranks_captions_like_the_text_index_and_reranks(page, setup):
    client, _ = page
    reference = setup[2]
    own_id = reference.ids[5]
    image = Image.open(reference.image_file(own_id)).convert("RGB")
    query = encode_images(reference.model, reference.processor, [image], progress=False)
    hits = reference.text_index.search(query, k=4)

    uploaded = search_texts(client, upload=reference.image_file(own_id), k=4, rerank=True)
    assert [r["id"] for r in table_rows(uploaded["clip_table"])] == hits.ids[0]
    assert [r["cosine"] for r in table_rows(uploaded["clip_table"])] == pytest.approx(hits.scores[0].tolist(), abs=1e-4)
    assert all(r["ground truth"] == "" for r in table_rows(uploaded["clip_table"]))  # an upload has no known pair
    rows = hits.indices[0].tolist()
    ranked = rerank_texts_with_itm(reference.model, reference.processor, image, [reference.texts[i] for i in rows])
    reranked_rows = table_rows(uploaded["rerank_table"])
    assert [r["caption"] for r in reranked_rows] == [reference.texts[rows[c.index]] for c in ranked]
    assert [r["GI-ITM probability"] for r in reranked_rows] == pytest.approx(
        [c.match_probability for c in ranked], abs=1e-4
    )
    assert Path(uploaded["query_image"]).is_file()

    picked = search_texts(client, gallery_id=own_id, k=8)  # one of the gallery: its own caption is marked
    assert [r["id"] for r in table_rows(picked["clip_table"])] == reference.text_index.search(query, k=8).ids[0]
    assert [r["id"] for r in table_rows(picked["clip_table"]) if r["ground truth"] == "✔"] == [own_id]


def still_serving(client):
    assert table_rows(search_images(client, "Felix Okafor speaks to reporters.", k=2)["clip_table"])


def test_empty_query_says_so_and_the_page_keeps_serving(page):
    client, _ = page
    for query in ("", "   "):
        result = search_images(client, query)
        assert "Type a query first" in result["message"] and table_rows(result["clip_table"]) == []
    still_serving(client)


def test_k_larger_than_the_gallery_shows_the_whole_gallery_with_a_note(page, setup):
    client, _ = page
    result = search_images(client, "Tidewater Summit", k=50)
    assert "more than the gallery holds (8 images): showing all 8" in result["message"]
    assert [r["id"] for r in table_rows(result["clip_table"])] == setup[2].search_images("Tidewater Summit", 8)[0]
    assert "showing the top 100" in search_images(client, "Tidewater Summit", k=MAX_K + 1)["message"]
    for bad_k in (0, -3, 2.5):
        result = search_images(client, "Tidewater Summit", k=bad_k)
        assert "k must be a whole number" in result["message"] and table_rows(result["clip_table"]) == []
    texts = search_texts(client, gallery_id=setup[2].ids[0], k=30)
    assert "more than the gallery holds (8 captions)" in texts["message"]
    still_serving(client)


def test_a_file_that_is_not_an_image_says_so(page, tmp_path):
    client, _ = page
    fake = tmp_path / "holiday.jpg"
    fake.write_text("these are words, not pixels")
    result = search_texts(client, upload=fake)
    assert "holiday.jpg is not an image this page can read" in result["message"]
    assert table_rows(result["clip_table"]) == []
    still_serving(client)


def test_huge_uploads_are_refused_with_a_message(page, tmp_path):
    client, _ = page
    too_big = tmp_path / "poster.png"  # a real image, over the 1 MB limit of this page
    Image.frombytes(
        "RGB", (700, 700), torch.randint(0, 256, (700 * 700 * 3,), dtype=torch.uint8).numpy().tobytes()
    ).save(too_big)
    assert too_big.stat().st_size > 1_000_000
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        search_texts(client, upload=too_big)
    # The server enforces the limit itself, whatever the client checks.
    request = urllib.request.Request(
        client.src.rstrip("/") + "/gradio_api/upload",
        data=b'--x\r\nContent-Disposition: form-data; name="files"; filename="poster.png"\r\n\r\n'
        + too_big.read_bytes()
        + b"\r\n--x--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    assert answer.value.code == 413
    # Small on disk, huge in pixels (a decompression bomb): refused from its header, before decoding.
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8000, 8000)).save(bomb)
    assert bomb.stat().st_size < 1_000_000
    result = search_texts(client, upload=bomb)
    assert "8000 x 8000 pixels, more than this page accepts" in result["message"]
    still_serving(client)


def test_image_search_without_an_image_or_with_an_unknown_id_says_so(page):
    client, _ = page
    assert "Upload an image, or pick one of the gallery" in search_texts(client)["message"]
    assert "No gallery item has the id 'nobody-99'" in search_texts(client, gallery_id="nobody-99")["message"]
    still_serving(client)


class FakeExplanationServer:
    """An OpenAI-compatible chat server on 127.0.0.1 that explains every text the same way (or fails)."""

    def __init__(self, status=200):
        self.bodies = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                answer = {"choices": [{"message": {"content": "Oren Ambrose is a person who wears a red jacket."}}]}
                data = json.dumps(answer if status == 200 else {"error": "no"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status", [200, 400])
def test_the_explanation_button_asks_the_configured_server(setup, status):
    model_folder, root, _ = setup
    server = FakeExplanationServer(status)
    argv = ["--model", str(model_folder), "--dataset", "jsonl", "--root", str(root)]
    argv += ["--explain-server", server.url, "--explain-server-model", "tiny-llm"]
    try:
        with served(argv) as (url, _):
            client = Client(url, verbose=False)
            explanation, message = client.predict("Oren Ambrose hands out the prizes.", api_name="/explain")
            empty_query = client.predict("", api_name="/explain")
    finally:
        server.close()
    assert "Oren Ambrose hands out the prizes." in json.dumps(server.bodies[0])
    assert server.bodies[0]["model"] == "tiny-llm"
    if status == 200:
        assert explanation == "Oren Ambrose is a person who wears a red jacket." and message == ""
    else:
        assert "The explanation could not be generated" in message and "400" in message
    assert "Type a query first" in empty_query[1]


def test_without_an_explanation_backend_there_is_no_explain_endpoint(page):
    client, _ = page
    assert "/explain" not in client.view_api(print_info=False, return_format="dict")["named_endpoints"]


def test_encoding_a_split_reports_progress_to_the_end(setup):
    model_folder, root, reference = setup
    reports = []
    search = load_gallery(
        reference.model, reference.processor, dataset="jsonl", root=str(root), on_progress=lambda *r: reports.append(r)
    )
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("encoding the gallery's images: 8/8" in description for _, description in reports)
    assert search.num_images == 8 and search.num_texts == 8


def test_a_10k_gallery_opens_in_seconds_from_an_embedding_file(setup, tmp_path):
    """The figure reported for issue 14: opening 10,000 image embeddings and answering the first query."""
    _, _, reference = setup
    dim = reference.images.shape[1]
    generator = torch.Generator().manual_seed(0)
    save_embeddings(
        tmp_path / "10k.safetensors",
        torch.randn(10_000, dim, generator=generator),
        [f"photo-{i:05d}" for i in range(10_000)],
        {"modality": "image"},
    )
    started = time.perf_counter()
    search = load_gallery(reference.model, reference.processor, index=str(tmp_path / "10k.safetensors"))
    opened = time.perf_counter() - started
    result = search.search_images("Oren Ambrose in Tessaly", 10)
    first_query = time.perf_counter() - started - opened
    print(f"\n10k-image embedding file: opened in {opened:.3f} s, first query answered in {first_query:.3f} s")
    assert search.num_images == 10_000 and len(result.clip) == 10
    assert opened < 5.0, f"opening 10k embeddings took {opened:.1f} s"


def test_model_facts_come_from_the_run_folder_and_the_model_card(setup, tmp_path):
    """What finetune.py writes beside best/ (results.json, data/) and what hub.py renders (README.md)."""
    from entityclip_hf.demo_facts import facts_markdown, model_facts
    from entityclip_hf.hub import render_model_card

    model_folder, _, reference = setup
    assert dict(model_facts(str(model_folder), reference.model))["base CLIP"] == "not recorded in the model folder"
    run = tmp_path / "run"
    best = run / "best"
    best.mkdir(parents=True)
    (run / "data").mkdir()
    (run / "data" / "demo_info.json").write_text(json.dumps({"parameters": {"num_entities": 24}}))
    test_metrics = {"t2i_R@1": 64.6, "t2i_R@5": 97.9, "t2i_R@10": 100.0, "i2t_R@1": 52.1, "rsum": 512.5}
    (run / "results.json").write_text(
        json.dumps({"initial": {"rsum": 60.4}, "final": {"rsum": 537.5}, "test": test_metrics})
    )
    facts = dict(model_facts(str(best), reference.model))
    assert facts["architecture"].startswith("EntityCLIP") and "embeddings of 32" in facts["architecture"]
    assert "demo dataset (24 made-up entities)" in facts["training data"]
    test_row = next(value for name, value in facts.items() if name.startswith("measured on the test split"))
    assert "text → image: R@1 64.6, R@5 97.9, R@10 100.0" in test_row and "rsum 512.5" in test_row
    assert facts["validation before training"] == "rsum 60.4" and facts["validation after training"] == "rsum 537.5"

    card = render_model_card(
        reference.model, "you/entityclip-n24news", metrics=test_metrics, dataset_name="N24News",
        base_model="openai/clip-vit-base-patch32",
    )  # fmt: skip
    (best / "README.md").write_text(str(card), encoding="utf-8")
    facts = dict(model_facts(str(best), reference.model))
    assert facts["base CLIP"] == "openai/clip-vit-base-patch32" and facts["training data"] == "N24News"
    assert "R@1 64.6" in facts["measured on N24News (test), model card"]
    assert "| base CLIP | openai/clip-vit-base-patch32 |" in facts_markdown(list(facts.items()))


def test_an_index_alone_lists_results_by_id_and_score(setup, tmp_path):
    model_folder, _, reference = setup
    path = save_embeddings(tmp_path / "gallery.safetensors", reference.images, reference.ids, {"modality": "image"})
    with served(["--model", str(model_folder), "--index", str(path)]) as (url, _):
        client = Client(url, verbose=False)
        status, _ = client.predict(api_name="/gallery_status")
        result = search_images(client, "Felix Okafor speaks to reporters.", k=3)
        reranking = search_images(client, "Felix Okafor speaks to reporters.", k=3, rerank=True)
        texts = search_texts(client, gallery_id=reference.ids[0])
    assert "embeddings only: results are listed by id" in status
    assert [r["id"] for r in table_rows(result["clip_table"])] == reference.search_images(
        "Felix Okafor speaks to reporters.", 3
    )[0]
    assert result["clip_gallery"] == []
    assert "Reranking needs the gallery's images" in reranking["message"]
    assert "no captions to search" in texts["message"]


def test_a_gallery_that_cannot_be_prepared_is_said_so_on_the_page(setup, tmp_path):
    """An embedding file of another model (another dimension): the page still opens and says what is wrong."""
    model_folder, _, reference = setup
    other = save_embeddings(tmp_path / "other.safetensors", torch.randn(8, 7), reference.ids, {"modality": "image"})
    from entityclip_hf.demo_app import _parser, build_demo, prepare

    model, _, loader, facts = prepare(_parser().parse_args(["--model", str(model_folder), "--index", str(other)]))
    demo = build_demo(loader.start(), facts, True)
    assert loader.done.wait(60)
    from .demo_helpers import free_port

    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        status, _ = client.predict(api_name="/gallery_status")
        message = search_images(client, "Tidewater Summit")["message"]
    finally:
        demo.close()
    assert "could not be prepared" in status and "dimension 7, but the model's are 32" in status
    assert "The gallery could not be prepared" in message


def test_a_plain_clip_model_searches_but_cannot_rerank(setup, tiny_clip_config):
    from transformers import CLIPModel

    from entityclip_hf.demo_gallery import UserInputError

    _, root, reference = setup
    search = load_gallery(CLIPModel(tiny_clip_config).eval(), reference.processor, dataset="jsonl", root=str(root))
    assert len(search.search_images("Tidewater Summit", 3).clip) == 3
    with pytest.raises(UserInputError, match="CLIPModel has no GI-ITM head"):
        search.search_images("Tidewater Summit", 3, rerank=True)


def test_the_command_says_what_is_missing(setup, capsys):
    from entityclip_hf.demo_app import main

    model_folder, _, _ = setup
    assert main(["--model", str(model_folder)]) == 2
    assert "entityclip-demo: error: give the gallery" in capsys.readouterr().err
    assert main(["--model", str(model_folder), "--index", "/nowhere/gallery.safetensors"]) == 2
    assert "entityclip-demo: error: --index /nowhere/gallery.safetensors: no such file" in capsys.readouterr().err


def test_explanation_weight_fuses_the_explanation_into_the_search(setup):
    """--explanation-weight w > 0: the query is normalize((1-w) text + w explanation); 0 (default): the text alone."""
    _, root, reference = setup
    query, explanation = "Oren Ambrose hands out the prizes.", "Oren Ambrose is a person in a red jacket."
    plain = load_gallery(reference.model, reference.processor, dataset="jsonl", root=str(root))
    fused = load_gallery(reference.model, reference.processor, dataset="jsonl", root=str(root), explanation_weight=0.6)
    expected_plain = encode_texts(reference.model, reference.processor, [query], progress=False)
    expected_fused = encode_texts(
        reference.model, reference.processor, [query], explanations=[explanation], explanation_weight=0.6,
        progress=False,
    )  # fmt: skip
    for search, expected in ((plain, expected_plain), (fused, expected_fused)):
        hits = search.image_index.search(expected, k=8)
        result = search.search_images(query, 8, explanation=explanation)
        assert [hit.id for hit in result.clip] == hits.ids[0]
        assert [hit.score for hit in result.clip] == pytest.approx(hits.scores[0].tolist(), abs=1e-5)
    assert not torch.allclose(expected_plain, expected_fused)
