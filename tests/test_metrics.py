"""Retrieval metrics: hand-computed ranks, pessimistic ties, chunked == full-matrix reference, inputs, evaluate module."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from entityclip_hf.metrics import (
    RETRIEVAL_METRIC_PATH,
    RetrievalRanks,
    _count_true,
    metrics_from_ranks,
    naive_retrieval_ranks,
    ranks_of_positives,
    retrieval_metrics,
)

EXPECTED_KEYS = [
    *(f"i2t_R@{k}" for k in (1, 5, 10, 50, 100)),
    "i2t_median_rank",
    "i2t_mean_rank",
    *(f"t2i_R@{k}" for k in (1, 5, 10, 50, 100)),
    "t2i_median_rank",
    "t2i_mean_rank",
    "rsum",
]


def paired_embeddings(n, dim, noise=1.0, seed=0):
    """Random image embeddings and texts = images + noise (a ranking with every rank from 1 to N present)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, dim, generator=generator)
    texts = images + noise * torch.randn(n, dim, generator=generator)
    return images, texts


def argsort_ranks(queries, gallery):
    """Ranks as the released EntityCLIP code computes them (cosine, argsort of each row); valid without ties."""
    queries = torch.nn.functional.normalize(queries.double(), dim=1)
    gallery = torch.nn.functional.normalize(gallery.double(), dim=1)
    scores = (queries @ gallery.T).numpy()
    return torch.tensor([int(np.where(np.argsort(row)[::-1] == i)[0][0]) + 1 for i, row in enumerate(scores)])


def embeddings_for_scores(scores):
    """Images = identity rows and texts = columns of `scores`, so that image_i . text_j == scores[i, j] exactly."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return torch.eye(scores.shape[0]), scores.T.contiguous()


def test_perfect_retrieval_ranks_all_one():
    images = torch.eye(6)
    ranks = ranks_of_positives(images, images * 3.0, chunk_size=4)
    assert ranks.i2t.tolist() == [1] * 6 and ranks.t2i.tolist() == [1] * 6
    metrics = retrieval_metrics(images, images, chunk_size=4)
    assert list(metrics) == EXPECTED_KEYS
    assert all(metrics[f"{d}_R@{k}"] == 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10, 50, 100))
    assert metrics["i2t_median_rank"] == metrics["t2i_mean_rank"] == 1.0
    assert metrics["rsum"] == 600.0


def test_worst_retrieval_ranks_n():
    # image_i = (1, -e_i), text_j = (1, e_j): score 1 - [i == j], so every positive is the lowest of its row and column.
    n = 7
    images = torch.cat([torch.ones(n, 1), -torch.eye(n)], dim=1)
    texts = torch.cat([torch.ones(n, 1), torch.eye(n)], dim=1)
    for chunk_size in (1, 3, 7):
        ranks = ranks_of_positives(images, texts, chunk_size=chunk_size)
        assert ranks.i2t.tolist() == [n] * n and ranks.t2i.tolist() == [n] * n
    metrics = retrieval_metrics(images, texts, chunk_size=3)
    assert metrics["i2t_R@1"] == metrics["t2i_R@5"] == 0.0
    assert metrics["i2t_R@10"] == 100.0  # K >= N: every positive is within the whole gallery
    assert metrics["i2t_median_rank"] == metrics["t2i_mean_rank"] == float(n)
    assert metrics["rsum"] == 200.0


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 4096])
def test_collapsed_model_gets_rank_n_not_r1_100(chunk_size):
    """All embeddings equal: every score ties, and ties count against the query (rank N, R@1 = 0)."""
    n = 10
    same = torch.randn(1, 8).expand(n, 8).contiguous()
    ranks = ranks_of_positives(same, same.clone(), chunk_size=chunk_size)
    assert ranks.i2t.tolist() == [n] * n and ranks.t2i.tolist() == [n] * n
    assert retrieval_metrics(same, same, chunk_size=chunk_size)["i2t_R@1"] == 0.0


def test_hand_made_3x3_with_a_tie():
    scores = [
        [0.9, 0.5, 0.1],
        [0.8, 0.3, 0.6],
        [0.2, 0.3, 0.4],
    ]
    # i2t (rows): 0.9 beats all -> 1; 0.3 is below 0.8 and 0.6 -> 3; 0.4 beats 0.2, 0.3 -> 1.
    # t2i (columns): 0.9 beats 0.8, 0.2 -> 1; 0.3 is below 0.5 and TIES 0.3 -> 3; 0.4 is below 0.6 only -> 2.
    images, texts = embeddings_for_scores(scores)
    for chunk_size in (1, 2, 3):
        ranks = ranks_of_positives(images, texts, chunk_size=chunk_size, normalize=False)
        assert ranks.i2t.tolist() == [1, 3, 1]
        assert ranks.t2i.tolist() == [1, 3, 2]
    metrics = retrieval_metrics(images, texts, ks=(1, 2, 5), normalize=False)
    assert metrics["i2t_R@1"] == pytest.approx(200 / 3)
    assert metrics["i2t_R@2"] == pytest.approx(200 / 3)
    assert metrics["i2t_median_rank"] == 1.0
    assert metrics["i2t_mean_rank"] == pytest.approx(5 / 3)
    assert metrics["t2i_R@1"] == pytest.approx(100 / 3)
    assert metrics["t2i_R@2"] == pytest.approx(200 / 3)
    assert metrics["t2i_median_rank"] == 2.0
    assert metrics["t2i_mean_rank"] == pytest.approx(2.0)
    # rsum = (R@1 + R@5 + R@10) of both directions, whatever ks asked for.
    assert metrics["rsum"] == pytest.approx((200 / 3 + 100 + 100) + (100 / 3 + 100 + 100))
    assert "i2t_R@10" not in metrics


def test_partial_tie_with_one_other_item_costs_one_rank():
    images, texts = embeddings_for_scores([[0.5, 0.5, 0.1], [0.0, 0.7, 0.2], [0.1, 0.2, 0.3]])
    ranks = ranks_of_positives(images, texts, normalize=False)
    assert ranks.i2t.tolist() == [2, 1, 1]


def test_tie_tolerance_absorbs_rounding_and_zero_compares_exactly():
    # The positive (0.5) and an item 4e-7 below it: a rounding-level gap is a tie by default, a win when exact.
    images, texts = embeddings_for_scores([[0.5, 0.4999996], [0.2, 0.9]])
    assert ranks_of_positives(images, texts, normalize=False).i2t.tolist() == [2, 1]
    assert ranks_of_positives(images, texts, normalize=False, tie_tolerance=0).i2t.tolist() == [1, 1]
    assert naive_retrieval_ranks(images, texts, normalize=False).i2t.tolist() == [2, 1]
    assert naive_retrieval_ranks(images, texts, normalize=False, tie_tolerance=0).i2t.tolist() == [1, 1]
    # Relative above |score| 1: 1000 vs 999.9996 is within 1e-6 * 1000 = 1e-3.
    images, texts = embeddings_for_scores([[1000.0, 999.9996], [0.0, 1.0]])
    assert ranks_of_positives(images, texts, normalize=False).i2t.tolist() == [2, 1]
    assert ranks_of_positives(images, texts, normalize=False, tie_tolerance=1e-9).i2t.tolist() == [1, 1]


def test_duplicate_gallery_items_tie_whatever_the_block_shapes():
    # Pair 3 duplicates pair 0 exactly (same photo, same caption): each of the two ties with the other's positive,
    # whatever block shapes and positions the float32 products round them in. Every other pair is clearly first.
    images, texts = paired_embeddings(11, 512, noise=0.1, seed=6)
    images[3], texts[3] = images[0], texts[0]
    expected = [2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1]
    for chunk_size in (1, 2, 3, 4, 11):
        ranks = ranks_of_positives(images, texts, chunk_size=chunk_size)
        assert ranks.i2t.tolist() == expected and ranks.t2i.tolist() == expected
    assert naive_retrieval_ranks(images, texts).i2t.tolist() == expected


def test_nan_score_counts_against_the_query():
    # Unnormalised scores overflow: image 0 . text 1 = 1e30 * 1e30 - 1e30 * 1e30 = inf - inf = NaN.
    images = torch.tensor([[1e30, 1e30], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1e30, -1e30]])
    ranks = ranks_of_positives(images, texts, normalize=False)
    assert ranks.i2t[0].item() == 2


def test_median_rank_is_floor_of_median_as_the_released_code():
    ranks = RetrievalRanks(i2t=torch.tensor([1, 2, 3, 10]), t2i=torch.tensor([4, 1, 2]))
    metrics = metrics_from_ranks(ranks, ks=(1, 3))
    assert metrics["i2t_median_rank"] == 2.0  # median 2.5 -> 2
    assert metrics["t2i_median_rank"] == 2.0
    assert metrics["i2t_mean_rank"] == 4.0
    assert metrics["i2t_R@3"] == 75.0


@pytest.mark.parametrize(
    ("n", "chunk_size"), [(61, 1), (61, 2), (257, 7), (257, 64), (257, 100), (257, 256), (257, 257), (257, 4096)]
)
def test_chunked_equals_full_matrix_reference(n, chunk_size):
    images, texts = paired_embeddings(n, 16, noise=1.5)
    chunked = ranks_of_positives(images, texts, chunk_size=chunk_size)
    naive = naive_retrieval_ranks(images, texts)
    assert torch.equal(chunked.i2t, naive.i2t) and torch.equal(chunked.t2i, naive.t2i)
    assert len(set(chunked.i2t.tolist())) > 10  # a real spread of ranks, not a degenerate case
    assert retrieval_metrics(images, texts, chunk_size=chunk_size) == metrics_from_ranks(naive)


def test_ranks_match_the_released_argsort_protocol_without_ties():
    images, texts = paired_embeddings(120, 24, noise=1.2, seed=3)
    ranks = ranks_of_positives(images, texts, chunk_size=50)
    assert torch.equal(ranks.i2t, argsort_ranks(images, texts))
    assert torch.equal(ranks.t2i, argsort_ranks(texts, images))


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 40])
def test_chunked_equals_reference_with_many_ties(chunk_size):
    # Small integer embeddings, dot products exact in float32: many exact ties between positives and others.
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(-1, 2, (40, 3), generator=generator).float()
    texts = torch.randint(-1, 2, (40, 3), generator=generator).float()
    chunked = ranks_of_positives(images, texts, chunk_size=chunk_size, normalize=False)
    naive = naive_retrieval_ranks(images, texts, normalize=False)
    assert torch.equal(chunked.i2t, naive.i2t) and torch.equal(chunked.t2i, naive.t2i)
    scores = images @ texts.T
    positives = scores.diagonal()
    expected_i2t = (scores >= positives[:, None]).sum(1)  # includes the positive itself: 1 + others >= it
    assert torch.equal(chunked.i2t, expected_i2t)


def test_numpy_torch_half_and_bfloat16_inputs():
    images, texts = paired_embeddings(50, 8, noise=1.0, seed=2)
    reference = retrieval_metrics(images, texts, chunk_size=16)
    assert retrieval_metrics(images.numpy(), texts.numpy(), chunk_size=16) == reference
    assert retrieval_metrics(images.tolist(), texts.tolist(), chunk_size=16) == reference
    assert retrieval_metrics(images, texts.numpy(), chunk_size=16, device="cpu") == reference
    for half in (torch.float16, torch.bfloat16):
        # Half storage, float32 compute: the same result as the float32 copy of the rounded values.
        low_images, low_texts = images.to(half), texts.to(half)
        got = ranks_of_positives(low_images, low_texts, chunk_size=16)
        want = naive_retrieval_ranks(low_images.float(), low_texts.float())
        assert torch.equal(got.i2t, want.i2t) and torch.equal(got.t2i, want.t2i)
    numpy_half = ranks_of_positives(images.numpy().astype(np.float16), texts.numpy().astype(np.float16), chunk_size=16)
    assert torch.equal(numpy_half.i2t, ranks_of_positives(images.half(), texts.half(), chunk_size=16).i2t)
    double = ranks_of_positives(images.double(), texts.double(), chunk_size=16)
    assert torch.equal(double.t2i, naive_retrieval_ranks(images.double(), texts.double()).t2i)


def test_ranks_are_int64_cpu_and_progress_bar_runs():
    images, texts = paired_embeddings(9, 4)
    ranks = ranks_of_positives(images, texts, chunk_size=4, progress=True)
    assert ranks.i2t.dtype == torch.int64 and ranks.i2t.device.type == "cpu" and ranks.i2t.shape == (9,)
    assert ranks.i2t.min() >= 1 and ranks.t2i.max() <= 9


def test_k_larger_than_gallery_is_100():
    images, texts = paired_embeddings(5, 4)
    metrics = retrieval_metrics(images, texts, ks=(50, 100))
    assert metrics["i2t_R@50"] == metrics["t2i_R@100"] == 100.0


@pytest.mark.parametrize(
    ("images", "texts", "message"),
    [
        (torch.zeros(3, 4), torch.zeros(2, 4), "image_embeds has 3 rows but text_embeds has 2"),
        (torch.zeros(3, 4), torch.zeros(3, 5), "dimension 4 but text_embeds has 5"),
        (torch.zeros(4), torch.zeros(4), r"image_embeds must be 2-D \[N, D\], got shape \(4,\)"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), "must be 2-D"),
        (torch.zeros(0, 4), torch.zeros(0, 4), "at least one embedding"),
        (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4), "floating point"),
        (np.zeros((3, 4), dtype=np.int32), np.zeros((3, 4)), "floating point"),
        (torch.zeros(3, 4), [[0.0] * 4, [0.0] * 4, [0.0] * 3], "text_embeds row 2 has 3 values but row 0 has 4"),
        (torch.zeros(3, 4), [["a"] * 4] * 3, "text_embeds must be a torch tensor or a numpy array"),
    ],
)
def test_bad_shapes_and_dtypes_raise_clear_errors(images, texts, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(images, texts)


def test_non_finite_values_name_the_row_and_field():
    images, texts = paired_embeddings(20, 4)
    texts[13, 2] = float("nan")
    with pytest.raises(ValueError, match="text_embeds row 13 has a non-finite value"):
        ranks_of_positives(images, texts, chunk_size=4)
    images[5, 0] = float("inf")
    with pytest.raises(ValueError, match="image_embeds row 5 has a non-finite value"):
        naive_retrieval_ranks(images, texts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"ks": (0, 5)}, "ks"),
        ({"ks": ()}, "ks"),
        ({"tie_tolerance": -1e-6}, "tie_tolerance"),
        ({"tie_tolerance": float("nan")}, "tie_tolerance"),
    ],
)
def test_bad_options_raise(kwargs, message):
    images, texts = paired_embeddings(4, 4)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(images, texts, **kwargs)


@pytest.mark.parametrize(("rows", "cols"), [(1, 8), (5, 24), (127, 16), (300, 1016), (130, 2040), (9, 7), (64, 4096)])
def test_fast_bool_count_equals_sum(rows, cols):
    generator = torch.Generator().manual_seed(rows + cols)
    for mask in (torch.rand(rows, cols, generator=generator) < 0.3, torch.ones(rows, cols, dtype=torch.bool)):
        for dim in (0, 1):
            assert torch.equal(_count_true(mask, dim), mask.sum(dim=dim))


@pytest.fixture(scope="module")
def retrieval_metric():
    import evaluate

    return evaluate.load(RETRIEVAL_METRIC_PATH)


def test_evaluate_module_loads_offline_and_matches_function(retrieval_metric):
    images, texts = paired_embeddings(90, 12, noise=1.5, seed=4)
    retrieval_metric.add_batch(image_embeds=images[:37], text_embeds=texts[:37])
    retrieval_metric.add_batch(image_embeds=images[37:].numpy(), text_embeds=texts[37:].numpy())
    got = retrieval_metric.compute(chunk_size=16, ks=(1, 5, 10, 20))
    assert got == retrieval_metrics(images, texts, ks=(1, 5, 10, 20))
    assert got["i2t_R@20"] < 100.0  # the options reached the computation


def test_evaluate_module_docstring_example(retrieval_metric):
    retrieval_metric.add_batch(image_embeds=[[1.0, 0.0], [0.0, 1.0]], text_embeds=[[0.9, 0.1], [0.2, 0.8]])
    retrieval_metric.add_batch(image_embeds=[[-1.0, 0.0]], text_embeds=[[-0.7, -0.1]])
    results = retrieval_metric.compute(ks=(1, 5))
    assert (results["i2t_R@1"], results["t2i_median_rank"], results["rsum"]) == (100.0, 1.0, 600.0)


def test_evaluate_module_loads_in_a_fresh_offline_process(tmp_path):
    images, texts = paired_embeddings(40, 6, noise=1.5, seed=5)
    np.save(tmp_path / "images.npy", images.numpy())
    np.save(tmp_path / "texts.npy", texts.numpy())
    script = (
        "import json, sys, evaluate, numpy as np\n"
        "from entityclip_hf.metrics import RETRIEVAL_METRIC_PATH\n"
        "metric = evaluate.load(RETRIEVAL_METRIC_PATH)\n"
        "images, texts = np.load('images.npy'), np.load('texts.npy')\n"
        "metric.add_batch(image_embeds=images[:25], text_embeds=texts[:25])\n"
        "metric.add_batch(image_embeds=images[25:], text_embeds=texts[25:])\n"
        "print(json.dumps(metric.compute(chunk_size=8)))\n"
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == retrieval_metrics(images, texts)
    assert (tmp_path / "hf_home" / "modules" / "evaluate_modules" / "metrics" / "entity_retrieval").is_dir()
