"""Approximate search (issue 12, item 5): FAISS IVF-flat, IVF-PQ and HNSW behind EmbeddingIndex, on small clustered
galleries: build, save beside the embedding file, load, search with recall against exact search, ids mapped back."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("faiss", reason="approximate search needs faiss (the [faiss] extra)")

from entityclip_hf.ann_index import AnnOptions, ApproximateIndex, default_nlist, exact_top, recall_at_k  # noqa: E402
from entityclip_hf.retrieval import EmbeddingIndex, save_embeddings  # noqa: E402

from . import test_evaluation_cli as evaluation_cli_tests  # noqa: E402

DIM = 32


def clustered(count, seed, clusters=40, spread=0.35):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).standard_normal((clusters, DIM)).astype(np.float32)
    points = centres[rng.integers(0, clusters, count)] + spread * rng.standard_normal((count, DIM)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def gallery():
    vectors = clustered(12000, seed=0)
    ids = [f"img-{row:05d}" for row in range(len(vectors))]
    queries = clustered(100, seed=1)
    return vectors, ids, queries, exact_top(vectors, queries, 10)


@pytest.fixture(scope="module")
def built(gallery):
    """Each index type built once with its defaults (tuned), shared by the tests that only read it."""
    vectors, ids, _, _ = gallery
    indexes = {}

    def build(index_type):
        if index_type not in indexes:
            extra = {"pq_m": 8} if index_type == "ivf-pq" else {}
            indexes[index_type] = EmbeddingIndex(vectors, ids, index_type=index_type, **extra)
        return indexes[index_type]

    return build


@pytest.mark.parametrize("index_type", ["ivf-flat", "ivf-pq", "hnsw"])
def test_each_index_type_builds_saves_loads_and_finds_the_neighbours(gallery, built, tmp_path, index_type):
    vectors, ids, queries, truth = gallery
    index = built(index_type)
    knob = "ef_search" if index_type == "hnsw" else "nprobe"
    assert index.ann.options.tuned[knob] == getattr(index.ann.options, knob)  # tuned, since none was given
    hits = index.search(torch.from_numpy(queries), k=10)
    assert recall_at_k(hits.indices.numpy(), truth) >= 0.9
    assert hits.ids[0] == [ids[row] for row in hits.indices[0].tolist()]  # ids map back to the rows found
    assert (hits.scores[:, :-1] >= hits.scores[:, 1:] - 1e-6).all()  # best first

    path = index.save(tmp_path / "gallery.safetensors")
    saved = tmp_path / f"gallery.safetensors.{index_type}.faiss"
    assert saved.is_file() and json.loads(saved.with_name(saved.name + ".json").read_text())["index_type"] == index_type
    loaded = EmbeddingIndex.from_file(path, index_type=index_type)
    assert loaded.ann.options.tuned == index.ann.options.tuned  # loaded, not rebuilt
    again = loaded.search(queries, k=10)
    assert torch.equal(again.indices, hits.indices) and again.ids == hits.ids


def test_ivf_pq_re_ranks_against_the_gallery_it_was_given_and_keeps_no_copy(gallery, built, tmp_path):
    import faiss

    vectors, ids, queries, truth = gallery
    index = built("ivf-pq")
    ann = index.ann
    factor = ann.options.refine_factor
    # The FAISS index is the PQ index alone (codes: 8 bytes a row here against 128 for the floats), and the
    # re-ranking reads EmbeddingIndex's own gallery tensor: a refine index holding the vectors again would fail both.
    assert type(ann.index) is faiss.IndexIVFPQ
    assert ann.memory_bytes() < vectors.nbytes / 4
    assert np.shares_memory(ann.vectors, index.embeddings.numpy())
    hits = index.search(queries, k=10)
    assert recall_at_k(hits.indices.numpy(), truth) >= 0.9

    # Same shortlist, same exact scores as FAISS's own refinement step (which would store a copy).
    reference = faiss.IndexRefineFlat(ann.index, faiss.swig_ptr(np.ascontiguousarray(vectors)))
    reference.k_factor = factor
    reference_scores, reference_rows = reference.search(queries, 10)
    assert np.array_equal(hits.indices.numpy(), reference_rows)
    assert np.allclose(hits.scores.numpy(), reference_scores, atol=1e-5)

    path = index.save(tmp_path / "g.safetensors")
    loaded = EmbeddingIndex.from_file(path, index_type="ivf-pq", refine_factor=factor)  # a search knob: not rebuilt
    assert type(loaded.ann.index) is faiss.IndexIVFPQ and np.shares_memory(
        loaded.ann.vectors, loaded.embeddings.numpy()
    )
    assert torch.equal(loaded.search(queries, k=10).indices, hits.indices)
    narrow = EmbeddingIndex.from_file(path, index_type="ivf-pq", refine_factor=1)
    assert narrow.ann.options.tuned == ann.options.tuned and narrow.ann.options.refine_factor == 1  # loaded
    assert recall_at_k(narrow.search(queries, k=10).indices.numpy(), truth) < recall_at_k(hits.indices.numpy(), truth)


def test_a_query_that_is_a_gallery_item_finds_itself_first(gallery, built):
    vectors = gallery[0]
    index = built("hnsw")
    hits = index.search(vectors[[5, 777, 11999]], k=3)
    assert [row[0] for row in hits.ids] == ["img-00005", "img-00777", "img-11999"]


def test_the_search_knob_can_change_at_load_and_trades_recall(gallery, tmp_path):
    vectors, ids, queries, truth = gallery
    path = save_embeddings(tmp_path / "g.safetensors", vectors, ids)
    EmbeddingIndex.from_file(path, index_type="ivf-flat", nlist=64).save(path)
    low = EmbeddingIndex.from_file(path, index_type="ivf-flat", nprobe=1)
    high = EmbeddingIndex.from_file(path, index_type="ivf-flat", nprobe=64)
    assert low.ann.options.nlist == 64 and high.ann.options.nprobe == 64
    assert recall_at_k(high.search(queries, k=10).indices.numpy(), truth) == 1.0  # every list: exact
    assert recall_at_k(low.search(queries, k=10).indices.numpy(), truth) < 1.0
    rebuilt = EmbeddingIndex.from_file(path, index_type="ivf-flat", nlist=32)  # another build option: rebuilt
    assert rebuilt.ann.options.nlist == 32


def test_an_index_of_another_gallery_is_refused_on_load(gallery, tmp_path):
    vectors, ids, _, _ = gallery
    path = tmp_path / "g.safetensors"
    EmbeddingIndex(vectors, ids, index_type="ivf-flat", nlist=64).save(path)
    changed = vectors.copy()
    changed[0] = changed[1]  # one row re-encoded differently
    save_embeddings(path, changed, ids)
    with pytest.raises(ValueError, match="built for another gallery"):
        EmbeddingIndex.from_file(path, index_type="ivf-flat")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"index_type": "ivf-flat", "nlist": 16, "nprobe": 32}, "nprobe \\(32\\) cannot exceed nlist \\(16\\)"),
        ({"index_type": "annoy"}, "unknown index_type 'annoy'"),
        ({"index_type": "ivf-flat", "nlist": 64, "train_size": 500}, "training sample too small: 500 vectors"),
        ({"index_type": "ivf-pq", "pq_m": 7}, "pq_m \\(7\\) must divide the dimension \\(32\\)"),
        ({"index_type": "hnsw", "nprobe": 4}, "nprobe"),
        ({"index_type": "flat", "nprobe": 4}, "apply to approximate indexes"),
        ({"index_type": "ivf-flat", "nlsit": 4}, "unknown approximate-index option"),
        ({"index_type": "ivf-flat", "backend": "exact"}, "backend='exact' excludes it"),
    ],
)
def test_bad_options_raise_clear_errors(gallery, options, message):
    vectors, ids, _, _ = gallery
    with pytest.raises(ValueError, match=message):
        EmbeddingIndex(vectors[:3000], ids[:3000], **options)


def test_a_tiny_gallery_gets_a_small_enough_nlist():
    assert default_nlist(1_000_000) == 4096 and default_nlist(100_000) == 1024
    assert default_nlist(1000) * 39 <= 1000
    tiny = clustered(200, seed=3)
    index = ApproximateIndex.build(tiny, AnnOptions(index_type="ivf-flat"))
    assert index.options.nlist * 39 <= 200
    with pytest.raises(ValueError, match="training sample too small"):
        ApproximateIndex.build(tiny, AnnOptions(index_type="ivf-pq"))  # 256 PQ centroids need ~10k points


def unstructured(count, dim, seed):
    points = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_hnsw_tuning_goes_as_far_as_an_unstructured_gallery_needs():
    # A sparse graph over points with no structure: recall 0.95 needs a candidate list of ~half the gallery (a
    # fixed cap on efSearch stopped 1M random 512-d points at recall 0.75; bench_ann.py).
    vectors = unstructured(2000, 64, seed=0)
    index = ApproximateIndex.build(vectors, AnnOptions(index_type="hnsw", hnsw_m=4, ef_construction=8))
    tuned = index.options.tuned
    assert tuned["sample_recall_at_10"] >= 0.95 and tuned["ef_search"] > 256
    queries = unstructured(200, 64, seed=1)
    assert recall_at_k(index.search(queries, 10)[1], exact_top(vectors, queries, 10)) >= 0.9  # fresh queries
    assert tuned["seconds_per_query"] > 0 and tuned["exact_seconds_per_query"] > 0


@pytest.mark.parametrize("approximate_slower", [True, False])
def test_tuning_says_when_exact_search_is_faster(gallery, caplog, monkeypatch, approximate_slower):
    import types

    from entityclip_hf import ann_index

    vectors = gallery[0]
    index = ApproximateIndex.build(vectors, AnnOptions(index_type="ivf-flat", nlist=64, nprobe=4))  # not tuned
    # A clock that only the exact top-k and the index's searches move, each by a fixed cost.
    exact_cost, search_cost = (1.0, 3.0) if approximate_slower else (3.0, 1.0)
    now = [0.0]
    real_exact, real_search = ann_index._exact_top, ApproximateIndex._search

    def exact_top(*args, **kwargs):
        now[0] += exact_cost
        return real_exact(*args, **kwargs)

    def search(self, *args, **kwargs):
        now[0] += search_cost
        return real_search(self, *args, **kwargs)

    monkeypatch.setattr(ann_index, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(ann_index, "_exact_top", exact_top)
    monkeypatch.setattr(ApproximateIndex, "_search", search)
    with caplog.at_level("WARNING", logger="entityclip_hf.ann_index"):
        tuned = index.tune(vectors)
    assert tuned["exact_seconds_per_query"] == round(exact_cost / 256, 6)
    assert tuned["seconds_per_query"] == round(search_cost / 256, 6)  # one search of the sample, not their sum
    warned = [record.getMessage() for record in caplog.records if "slower than exact search" in record.getMessage()]
    assert bool(warned) == approximate_slower
    if approximate_slower:
        assert "3.0x slower" in warned[0] and "the flat index is the better choice" in warned[0]


model_folder = evaluation_cli_tests.model_folder  # a tiny saved EntityCLIP (module-scoped fixture)
data_root = evaluation_cli_tests.data_root  # a 7-pair JSON-lines dataset


def test_entityclip_search_cli_builds_the_index_beside_the_file_and_searches_with_it(
    model_folder, data_root, tmp_path, capsys
):
    from entityclip_hf import retrieval

    gallery_file = tmp_path / "gallery.safetensors"
    common = ["--model", str(model_folder), "--no-progress"]
    written = retrieval.run(
        ["encode", *common, "--images-from", "jsonl", "--root", str(data_root), "--output", str(gallery_file)]
        + ["--index-type", "hnsw", "--ef-search", "32", "--ef-construction", "40"]
    )
    assert written["index"] == str(tmp_path / "gallery.safetensors.hnsw.faiss")
    assert "wrote the hnsw index" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "gallery.safetensors.hnsw.faiss.json").read_text())
    assert sidecar["options"]["ef_construction"] == 40 and sidecar["options"]["ef_search"] == 32
    query = ["search", *common, "--index", str(gallery_file), "--query", "Angela Merkel", "--k", "3"]
    exact = retrieval.run(query)
    approximate = retrieval.run([*query, "--index-type", "hnsw"])
    assert [h["id"] for h in approximate[0]["hits"]] == [h["id"] for h in exact[0]["hits"]]  # 7 items: all found
    assert "building one" not in capsys.readouterr().err  # the saved index was loaded
    (tmp_path / "gallery.safetensors.hnsw.faiss").unlink()
    unsaved = retrieval.run([*query, "--index-type", "hnsw", "--ef-construction", "40", "--target-recall", "0.9"])
    assert [h["id"] for h in unsaved[0]["hits"]] == [h["id"] for h in exact[0]["hits"]]
    assert "no hnsw index beside" in capsys.readouterr().err  # built for this search only, and the user is told
    with pytest.raises(SystemExit) as stopped:
        retrieval.run([*query, "--index-type", "ivf-flat"])  # 7 vectors cannot train an IVF index
    assert stopped.value.code == 2 and "training sample too small" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        retrieval.run([*query, "--nprobe", "4"])
    assert stopped.value.code == 2 and "--nprobe need --index-type" in capsys.readouterr().err
