"""Losses: symmetric InfoNCE, gather-with-gradient over processes, hard-negative sampling, ITM."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from entityclip_hf.losses import contrastive_loss, gather_with_grad, itm_loss, sample_negatives


def test_contrastive_loss_is_symmetric_infonce():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    logit_scale = torch.tensor(2.0)
    loss, logits = contrastive_loss(image, text, logit_scale)
    expected_logits = image @ text.t() * logit_scale.exp()
    labels = torch.arange(5)
    expected = (F.cross_entropy(expected_logits, labels) + F.cross_entropy(expected_logits.t(), labels)) / 2
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(loss, expected)


def test_contrastive_loss_is_low_for_matching_pairs():
    embeds = F.normalize(torch.eye(4), dim=-1)
    low, _ = contrastive_loss(embeds, embeds, torch.tensor(4.0))
    high, _ = contrastive_loss(embeds, embeds.roll(1, dims=0), torch.tensor(4.0))
    assert low < 0.1 < high


def test_gather_with_grad_is_identity_in_one_process():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


def test_sample_negatives_never_returns_the_positive():
    torch.manual_seed(0)
    similarity = torch.randn(6, 6) * 10
    for _ in range(50):
        negatives = sample_negatives(similarity, hard=True)
        assert (negatives != torch.arange(6)).all()
        negatives = sample_negatives(similarity, hard=False)
        assert (negatives != torch.arange(6)).all()


def test_hard_negatives_prefer_confusable_pairs():
    torch.manual_seed(0)
    similarity = torch.zeros(3, 3)
    similarity[0, 2] = 5.0  # text 2 is the confusable negative of image 0
    draws = torch.stack([sample_negatives(similarity, hard=True)[0] for _ in range(400)])
    assert (draws == 2).float().mean() > 0.9
    uniform = torch.stack([sample_negatives(similarity, hard=False)[0] for _ in range(400)])
    assert 0.35 < (uniform == 2).float().mean() < 0.65


def test_hard_negatives_survive_a_softmax_that_underflows():
    similarity = torch.eye(4) * 1e4  # softmax puts all mass on the diagonal, which is excluded
    negatives = sample_negatives(similarity, hard=True)
    assert (negatives != torch.arange(4)).all()


@pytest.mark.parametrize("shape", [(3, 4), (1, 1)])
def test_sample_negatives_rejects_bad_shapes(shape):
    with pytest.raises(ValueError):
        sample_negatives(torch.zeros(shape))


def test_itm_loss_is_cross_entropy_in_float32():
    logits = torch.tensor([[3.0, -3.0], [-2.0, 2.0]], dtype=torch.bfloat16)
    labels = torch.tensor([0, 1])
    loss = itm_loss(logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), labels))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_process_gradients_match_one_process(rank, world, port):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        projection = torch.nn.Linear(6, 4)
        image_inputs, text_inputs = torch.randn(8, 6), torch.randn(8, 6)
        logit_scale = torch.tensor(1.5, requires_grad=True)

        def loss_on(images, texts, gather):
            image = F.normalize(projection(images), dim=-1)
            text = F.normalize(projection(texts * 0.5), dim=-1)
            return contrastive_loss(image, text, logit_scale, gather=gather)[0]

        # Reference: the whole global batch in one process.
        reference = loss_on(image_inputs, text_inputs, gather=False)
        reference_grads = torch.autograd.grad(reference, [projection.weight, logit_scale])
        # Distributed: each process holds half the batch; DDP averages the gradients.
        local = slice(rank * 4, rank * 4 + 4)
        loss = loss_on(image_inputs[local], text_inputs[local], gather=True)
        grads = torch.autograd.grad(loss, [projection.weight, logit_scale])
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.testing.assert_close(mean_loss / world, reference.detach(), rtol=1e-5, atol=1e-6)
        for grad, expected in zip(grads, reference_grads, strict=True):
            grad = grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad / world, expected, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_gathered_loss_and_gradient_equal_the_global_batch_in_two_processes():
    # Two real gloo processes; a failed assertion in either one fails this test.
    mp.spawn(_two_process_gradients_match_one_process, args=(2, _free_port()), nprocs=2, join=True)


def test_a_nan_similarity_row_still_draws_a_negative_so_the_nan_reaches_the_loss():
    from entityclip_hf.losses import sample_negatives

    similarity = torch.randn(4, 4)
    similarity[2, 1] = float("nan")
    negatives = sample_negatives(similarity)
    assert negatives.shape == (4,) and (negatives != torch.arange(4)).all()
