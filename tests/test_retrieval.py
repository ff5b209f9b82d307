"""Retrieval: batched encoding, embedding files, exact (and FAISS) search, GI-ITM reranking, bad inputs."""

import sys

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel, retrieval
from entityclip_hf.retrieval import (
    EmbeddingIndex,
    add_embeddings_column,
    encode_images,
    encode_texts,
    faiss_available,
    load_embeddings,
    match_probabilities,
    rerank_texts_with_itm,
    rerank_with_itm,
    save_embeddings,
)

TEXTS = [
    "Angela Merkel meets Emmanuel Macron in Aachen.",
    "Serena Williams wins at Wimbledon on Saturday.",
    "Firefighters battle a wildfire near Santa Rosa, California.",
    "Pope Francis greets the crowd in St. Peter's Square.",
    "Lionel Messi scores for Barcelona against Real Madrid.",
]


@pytest.fixture(scope="module")
def model(tiny_clip_config):
    torch.manual_seed(0)
    return EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config)).eval()


def random_images(count, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for index, image in enumerate(random_images(5, seed=1)):
        path = tmp_path / f"img{index}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def reference_image_embeds(model, processor, images):
    with torch.no_grad():
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        return F.normalize(model.get_image_features(pixel_values).pooler_output, dim=-1)


def reference_text_embeds(model, processor, texts):
    with torch.no_grad():
        encoded = processor(text=texts, return_tensors="pt")
        return F.normalize(model.get_text_features(encoded["input_ids"], encoded["attention_mask"]).pooler_output, dim=-1)


# ------------------------------------------------------------------------------------------------ encoding
def test_encode_images_batched_equals_one_batch_and_is_normalised(model, tiny_processor):
    images = random_images(5)
    encoded = encode_images(model, tiny_processor, images, batch_size=2, progress=False)
    assert encoded.dtype == torch.float32 and encoded.shape == (5, model.config.projection_dim)
    torch.testing.assert_close(encoded.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(encoded, reference_image_embeds(model, tiny_processor, images), rtol=1e-5, atol=1e-5)
    assert not model.training


def test_encode_texts_batched_equals_one_batch(model, tiny_processor):
    encoded = encode_texts(model, tiny_processor, TEXTS, batch_size=2, progress=False)
    torch.testing.assert_close(encoded, reference_text_embeds(model, tiny_processor, TEXTS), rtol=1e-5, atol=1e-5)


def test_encode_restores_training_mode(model, tiny_processor):
    model.train()
    try:
        encode_texts(model, tiny_processor, TEXTS[:2], progress=False)
        assert model.training
    finally:
        model.eval()


def test_encode_from_dataset_columns_reads_only_the_needed_column(model, tiny_processor, image_files, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    dataset = datasets.Dataset.from_dict(
        {"id": [f"n{i}" for i in range(5)], "image": image_files[:4] + [str(broken)], "text": TEXTS}
    ).cast_column("image", datasets.Image())
    # Texts: the broken image must not matter (images are not decoded).
    from_dataset = encode_texts(model, tiny_processor, dataset, batch_size=3, progress=False)
    torch.testing.assert_close(from_dataset, encode_texts(model, tiny_processor, TEXTS, progress=False))
    # Images: dataset rows decode lazily, in DataLoader workers too.
    good = dataset.select(range(4))
    expected = encode_images(model, tiny_processor, image_files[:4], progress=False)
    for workers in (0, 2):
        got = encode_images(model, tiny_processor, good, batch_size=3, num_workers=workers, progress=False)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Undecoded image columns (`datasets.Image(decode=False)`, as the data collator uses): by path, or by bytes.
    by_path = good.cast_column("image", datasets.Image(decode=False))
    in_memory = datasets.Dataset.from_dict(
        {"image": random_images(5, seed=1)[:4]},
        features=datasets.Features({"image": datasets.Image()}),
    ).cast_column("image", datasets.Image(decode=False))
    assert in_memory[0]["image"]["bytes"] and not by_path[0]["image"]["bytes"]
    for undecoded in (by_path, in_memory):
        got = encode_images(model, tiny_processor, undecoded, batch_size=3, progress=False)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_image_is_named_by_index_and_id_or_skipped(model, tiny_processor, image_files, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    files = image_files[:3] + [str(broken)] + image_files[3:]
    dataset = datasets.Dataset.from_dict({"id": [f"id-{i}" for i in range(6)], "image": files}).cast_column(
        "image", datasets.Image()
    )
    with pytest.raises(ValueError, match=r"image 3 \(id 'id-3'\)"):
        encode_images(model, tiny_processor, dataset, batch_size=2, progress=False)
    # A list of paths: the path names the item.
    with pytest.raises(ValueError, match=r"image 3 \('.*broken.jpg'\)"):
        encode_images(model, tiny_processor, files, batch_size=4, progress=False)
    skipped = encode_images(model, tiny_processor, files, batch_size=4, skip_errors=True, progress=False)
    assert torch.isnan(skipped[3]).all()
    keep = [0, 1, 2, 4, 5]
    expected = encode_images(model, tiny_processor, [files[i] for i in keep], progress=False)
    torch.testing.assert_close(skipped[keep], expected, rtol=1e-5, atol=1e-5)


def test_bad_text_is_named(model, tiny_processor):
    with pytest.raises(ValueError, match="text 1: expected a string, got int"):
        encode_texts(model, tiny_processor, ["fine", 7, "also fine"], progress=False)


def test_encode_empty_gallery_raises(model, tiny_processor):
    with pytest.raises(ValueError, match="empty gallery"):
        encode_images(model, tiny_processor, [], progress=False)
    with pytest.raises(ValueError, match="empty gallery"):
        encode_texts(model, tiny_processor, datasets.Dataset.from_dict({"text": []}), progress=False)
    with pytest.raises(ValueError, match="no 'caption' column"):
        encode_texts(model, tiny_processor, datasets.Dataset.from_dict({"text": ["a"]}), text_column="caption")


def test_encode_works_with_a_plain_clip_model(tiny_clip_config, tiny_processor):
    torch.manual_seed(3)
    clip = CLIPModel(tiny_clip_config).eval()
    images = random_images(3)
    with torch.no_grad():
        pixel_values = tiny_processor(images=images, return_tensors="pt")["pixel_values"]
        expected = F.normalize(clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    torch.testing.assert_close(encode_images(clip, tiny_processor, images, progress=False), expected)


# ------------------------------------------------------------------------------------------------ files
def test_save_load_round_trip_is_exact(tmp_path):
    embeddings = F.normalize(torch.randn(7, 16), dim=-1)
    path = save_embeddings(
        tmp_path / "sub" / "gallery.safetensors",
        embeddings,
        ids=[f"x{i}" for i in range(7)],
        metadata={"modality": "image"},
    )
    stored = load_embeddings(path)
    assert torch.equal(stored.embeddings, embeddings)
    assert stored.ids == [f"x{i}" for i in range(7)]
    assert stored.metadata == {"modality": "image"}
    # Integer ids keep their type; no ids is allowed.
    save_embeddings(path, embeddings, ids=list(np.arange(100, 107)))
    assert load_embeddings(path).ids == list(range(100, 107))
    save_embeddings(path, embeddings.numpy())
    assert load_embeddings(path).ids is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["gallery.safetensors"]


def test_many_ids_go_to_a_checked_sidecar(tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval.embeddings, "MAX_IDS_IN_HEADER_BYTES", 20)
    embeddings = torch.randn(6, 4)
    ids = [f"item-{i}" for i in range(6)]
    path = save_embeddings(tmp_path / "g.safetensors", embeddings, ids=ids)
    sidecar = tmp_path / "g.safetensors.ids.json"
    assert sidecar.is_file()
    stored = load_embeddings(path)
    assert torch.equal(stored.embeddings, embeddings) and stored.ids == ids
    sidecar.write_text('["a", "b", "c", "d", "e", "f"]')
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_embeddings(path)
    # A later save with few ids keeps them in the header and removes the stale sidecar.
    monkeypatch.setattr(retrieval.embeddings, "MAX_IDS_IN_HEADER_BYTES", 1 << 20)
    save_embeddings(path, embeddings, ids=ids)
    assert not sidecar.exists() and load_embeddings(path).ids == ids


def test_save_is_atomic(tmp_path, monkeypatch):
    path = save_embeddings(tmp_path / "g.safetensors", torch.ones(2, 3), ids=["a", "b"])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(retrieval.embeddings, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_embeddings(path, torch.zeros(2, 3), ids=["c", "d"])
    stored = load_embeddings(path)
    assert torch.equal(stored.embeddings, torch.ones(2, 3)) and stored.ids == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"], "no temporary file left behind"


@pytest.mark.parametrize(
    ("embeddings", "ids", "message"),
    [
        (torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]), ["a", "b"], r"row 1 \(id 'b'\) is not finite"),
        (torch.ones(2, 2), ["a", "a"], "duplicate id 'a' at rows 0 and 1"),
        (torch.ones(2, 2), ["a"], "1 ids for 2 embeddings"),
        (torch.ones(2, 2), ["a", 1.5], "id of row 1 must be a string or an integer"),
        (torch.ones(3), None, r"matrix \[N, D\]"),
        (torch.ones(0, 3), None, "empty embeddings"),
    ],
)
def test_save_rejects_bad_input(tmp_path, embeddings, ids, message):
    with pytest.raises(ValueError, match=message):
        save_embeddings(tmp_path / "g.safetensors", embeddings, ids=ids)
    assert not (tmp_path / "g.safetensors").exists()


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError):
        load_embeddings(tmp_path / "missing.safetensors")
    save_file({"weights": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="holds no 'embeddings' tensor"):
        load_embeddings(tmp_path / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_embeddings(tmp_path / "junk.safetensors")


# ------------------------------------------------------------------------------------------------ search
def test_exact_search_equals_brute_force_across_chunks():
    generator = torch.Generator().manual_seed(0)
    gallery = torch.randn(1000, 32, generator=generator)
    queries = torch.randn(9, 32, generator=generator)
    index = EmbeddingIndex(gallery, ids=[f"g{i}" for i in range(1000)], backend="exact", chunk_size=64)
    results = index.search(queries, k=25)
    scores = F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).T
    expected = scores.topk(25, dim=1)
    assert torch.equal(results.indices, expected.indices)
    torch.testing.assert_close(results.scores, expected.values)
    assert results.ids[4] == [f"g{i}" for i in expected.indices[4].tolist()]


def test_search_finds_the_planted_neighbour():
    generator = torch.Generator().manual_seed(1)
    gallery = torch.randn(500, 16, generator=generator)
    index = EmbeddingIndex(gallery, ids=list(range(1000, 1500)), backend="exact", chunk_size=100)
    query = gallery[417] + 0.05 * torch.randn(16, generator=generator)
    results = index.search(query, k=3)  # a single [D] query
    assert results.indices.shape == (1, 3)
    assert results.indices[0, 0].item() == 417 and results.ids[0][0] == 1417
    assert results.scores[0, 0] > 0.99


def test_encode_save_load_search_round_trip(model, tiny_processor, tmp_path):
    images = random_images(6, seed=5)
    gallery = encode_images(model, tiny_processor, images, batch_size=4, progress=False)
    path = save_embeddings(tmp_path / "gallery.safetensors", gallery, ids=[f"photo-{i}" for i in range(6)])
    assert torch.equal(load_embeddings(path).embeddings, gallery)
    index = EmbeddingIndex.from_file(path, backend="exact")
    torch.testing.assert_close(index.embeddings, gallery)  # re-normalised: equal up to rounding
    # Each image, encoded again as a query, finds itself first.
    results = index.search(encode_images(model, tiny_processor, images[::-1], progress=False), k=1)
    assert [row[0] for row in results.ids] == [f"photo-{i}" for i in reversed(range(6))]


def test_search_rejects_bad_input():
    index = EmbeddingIndex(torch.randn(10, 8), ids=[str(i) for i in range(10)], backend="exact")
    with pytest.raises(ValueError, match=r"k=11 exceeds the gallery size \(10 items\)"):
        index.search(torch.randn(1, 8), k=11)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(torch.randn(1, 8), k=0)
    with pytest.raises(ValueError, match="queries have dimension 4 but the gallery's embeddings have 8"):
        index.search(torch.randn(2, 4), k=1)
    with pytest.raises(ValueError, match="query 1 is not finite"):
        index.search(torch.tensor([[1.0] * 8, [float("inf")] * 8]), k=1)
    with pytest.raises(ValueError, match="empty gallery"):
        EmbeddingIndex(torch.zeros(0, 8))
    with pytest.raises(ValueError, match=r"gallery row 2 \(id 'c'\) is not finite"):
        EmbeddingIndex(torch.tensor([[1.0, 0.0], [0.0, 1.0], [float("nan"), 0.0]]), ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="backend must be"):
        EmbeddingIndex(torch.ones(2, 2), backend="annoy")


def test_faiss_backend_without_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError, installed or not
    assert not faiss_available()
    with pytest.raises(ImportError, match=r"entityclip-hf\[faiss\]"):
        EmbeddingIndex(torch.ones(2, 2), backend="faiss")
    assert EmbeddingIndex(torch.ones(2, 2)).backend == "exact"


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_faiss_backend_matches_exact_search():
    generator = torch.Generator().manual_seed(2)
    gallery, queries = torch.randn(300, 16, generator=generator), torch.randn(5, 16, generator=generator)
    exact = EmbeddingIndex(gallery, backend="exact").search(queries, k=10)
    with_faiss = EmbeddingIndex(gallery, backend="faiss").search(queries, k=10)
    assert torch.equal(with_faiss.indices, exact.indices)
    torch.testing.assert_close(with_faiss.scores, exact.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_embeddings_column_with_a_faiss_index_ranks_like_exact_search(tmp_path):
    generator = torch.Generator().manual_seed(3)
    gallery, queries = torch.randn(200, 16, generator=generator), torch.randn(4, 16, generator=generator)
    dataset = datasets.Dataset.from_dict({"id": [f"item-{i}" for i in range(200)]})
    indexed = add_embeddings_column(dataset, gallery)
    assert indexed.column_names == ["id", "embeddings"] and indexed.list_indexes() == ["embeddings"]
    exact = EmbeddingIndex(gallery, ids=dataset["id"], backend="exact").search(queries, k=5)
    for row, query in enumerate(F.normalize(queries, dim=-1).numpy()):
        scores, examples = indexed.get_nearest_examples("embeddings", query, k=5)
        assert examples["id"] == exact.ids[row]
        np.testing.assert_allclose(scores, exact.scores[row].numpy(), rtol=1e-5, atol=1e-5)
    indexed.save_faiss_index("embeddings", str(tmp_path / "gallery.faiss"))  # kept beside the dataset
    assert (tmp_path / "gallery.faiss").stat().st_size > 0


def test_embeddings_column_checks_its_input(monkeypatch):
    dataset = datasets.Dataset.from_dict({"id": ["a", "b"]})
    with pytest.raises(ValueError, match="embeddings has 3 rows but the dataset has 2"):
        add_embeddings_column(dataset, torch.ones(3, 4))
    with pytest.raises(ValueError, match="already has a column 'id'"):
        add_embeddings_column(dataset, torch.ones(2, 4), column="id")
    plain = add_embeddings_column(dataset, torch.ones(2, 4), faiss_index=False)
    assert plain.list_indexes() == [] and np.allclose(plain[0]["embeddings"], [0.5] * 4)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"entityclip-hf\[faiss\]"):
        add_embeddings_column(dataset, torch.ones(2, 4), faiss_index=True)


# ------------------------------------------------------------------------------------------------ reranking
def test_rerank_orders_by_match_probability(model, tiny_processor):
    images = random_images(5, seed=7)
    query = TEXTS[0]
    single = []
    with torch.no_grad():
        for image in images:
            inputs = tiny_processor(images=[image], text=[query], return_tensors="pt")
            single.append(model.match_probability(**inputs).item())
    assert len({round(p, 6) for p in single}) == 5, "distinct scores, so that the order is meaningful"
    # Give the candidates worst first, so that reranking must reverse them.
    worst_first = sorted(range(5), key=lambda i: single[i])
    ranked = rerank_with_itm(
        model,
        tiny_processor,
        query,
        [images[i] for i in worst_first],
        candidate_ids=[f"c{i}" for i in worst_first],
        batch_size=2,
    )
    assert [candidate.id for candidate in ranked] == [f"c{i}" for i in reversed(worst_first)]
    assert [candidate.index for candidate in ranked] == [4, 3, 2, 1, 0]
    for candidate in ranked:
        assert candidate.match_probability == pytest.approx(single[worst_first[candidate.index]], abs=1e-5)


def test_rerank_uses_the_explanation(model, tiny_processor):
    images = random_images(3, seed=8)
    without = match_probabilities(model, tiny_processor, images, [TEXTS[1]] * 3)
    explained = [
        c.match_probability
        for c in sorted(
            rerank_with_itm(model, tiny_processor, TEXTS[1], images, explanation="Wimbledon is in London."),
            key=lambda c: c.index,
        )
    ]
    with torch.no_grad():
        inputs = tiny_processor(
            images=images, text=[TEXTS[1]] * 3, explanations=["Wimbledon is in London."] * 3, return_tensors="pt"
        )
        expected = model.match_probability(**inputs)
    torch.testing.assert_close(torch.tensor(explained), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.tensor(explained), without), "the explanation reaches the shared experts"


def test_rerank_texts_for_an_image_query(model, tiny_processor):
    image = random_images(1, seed=9)[0]
    ranked = rerank_texts_with_itm(model, tiny_processor, image, TEXTS, candidate_ids=list(range(5)))
    expected = match_probabilities(model, tiny_processor, [image] * 5, TEXTS)
    assert [c.index for c in ranked] == expected.argsort(descending=True, stable=True).tolist()


def test_rerank_rejects_bad_input(model, tiny_processor, tiny_clip_config):
    images = random_images(2)
    with pytest.raises(ValueError, match="no candidates"):
        rerank_with_itm(model, tiny_processor, "query", [])
    with pytest.raises(ValueError, match="query_text must be a non-empty string"):
        rerank_with_itm(model, tiny_processor, "  ", images)
    with pytest.raises(ValueError, match="1 candidate_ids for 2 candidates"):
        rerank_with_itm(model, tiny_processor, "query", images, candidate_ids=["a"])
    with pytest.raises(ValueError, match="pairs 0..1: image 1"):
        rerank_with_itm(model, tiny_processor, "query", [images[0], "/nonexistent/photo.jpg"])
    with pytest.raises(TypeError, match="no GI-ITM head"):
        rerank_with_itm(CLIPModel(tiny_clip_config), tiny_processor, "query", images)


def test_retrieval_and_evaluation_do_not_import_each_other():
    """One direction of imports: retrieval/ and evaluation.py share loaders.py; retrieval never imports evaluation."""
    import ast
    from pathlib import Path

    package = Path(retrieval.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "evaluation" not in (node.module or ""), f"{path.name} imports {node.module}"
    assert {"encode.py", "embeddings.py", "index.py", "rerank.py", "cli.py"} <= {p.name for p in package.glob("*.py")}
