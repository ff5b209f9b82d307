"""EntityCLIP's training losses: contrastive (VTC) over all processes, hard-negative mining and GI-ITM.

Kept apart from the model (as open_clip keeps `ClipLoss` apart from `CLIP`): these functions take features and
return losses; they know about `torch.distributed` and nothing else.
"""

import contextlib
import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) outside distributed training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each process the summed gradient of its own rows.

    Every process's loss reads every process's rows, so the gradient of rank r's rows is the sum over processes of
    the gradient flowing into slice r of the gathered tensor (an all-reduce, then rank r's slice). Written here
    because `torch.distributed.nn.functional.all_gather` (what open_clip uses) is deprecated in torch 2.13 in
    favour of a private API.
    """

    @staticmethod
    def forward(ctx, features):
        rank, world_size = distributed_world()
        ctx.rank, ctx.rows = rank, features.shape[0]
        gathered = [torch.empty_like(features) for _ in range(world_size)]
        dist.all_gather(gathered, features)
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_gathered):
        grad_gathered = grad_gathered.contiguous()
        dist.all_reduce(grad_gathered, op=dist.ReduceOp.SUM)
        return grad_gathered[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


_local = threading.local()


@contextlib.contextmanager
def local_losses():
    """Within this block, contrastive losses score each process's rows against its own batch only (no all-gather).

    For per-process measurements (evaluation diagnostics) that must not depend on every process calling the same
    collectives in the same order: each process can then skip batches, or run extra forwards, on its own.
    """
    previous = getattr(_local, "active", False)
    _local.active = True
    try:
        yield
    finally:
        _local.active = previous


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate `features` [B, D] from every process along dim 0, keeping the gradient path to each process.

    `accelerator.gather` (and `dist.all_gather`) cut the graph: negatives from other processes would then push no
    gradient back to where they were computed. This gather sends the gradients home in its backward (open_clip's
    `gather_with_grad`). Every process must hold the same number of rows.
    """
    _, world_size = distributed_world()
    if world_size == 1:
        return features
    return _GatherWithGrad.apply(features.contiguous())


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, gather: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE ((image->text + text->image) / 2) between L2-normalised embeddings of matching rows.

    With several processes and `gather=True`, each process scores its own rows against the global batch (open_clip's
    `local_loss` with `gather_with_grad`): the mean of the per-process losses then equals the single-process loss on
    the global batch, and DDP's gradient averaging yields exactly its gradient.

    Returns the loss and the local `logits_per_image` [B_local, B_global].
    """
    rank, world_size = distributed_world()
    if gather and world_size > 1 and not getattr(_local, "active", False):
        all_image_embeds = gather_with_grad(image_embeds)
        all_text_embeds = gather_with_grad(text_embeds)
        offset = rank * image_embeds.shape[0]
    else:
        all_image_embeds, all_text_embeds, offset = image_embeds, text_embeds, 0
    # Softmax over the batch in float32: under bf16 autocast a large logit_scale overflows the logits' precision.
    scale = logit_scale.exp().float()
    logits_per_image = scale * image_embeds.float() @ all_text_embeds.float().t()
    logits_per_text = scale * text_embeds.float() @ all_image_embeds.float().t()
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return loss, logits_per_image


def pairwise_contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a square matrix of pair scores [B, B] (row i: image i against every text j; the
    positive on the diagonal), for scores that are not a dot product of two embedding sets (each pair computed on
    its own). Local to the batch: every pair's score needs both of its inputs on one process."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"pair scores must be square [B, B], got {tuple(logits.shape)}")
    labels = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _check_square_batch(similarity: torch.Tensor) -> None:
    if similarity.ndim != 2 or similarity.shape[1] != similarity.shape[0]:
        raise ValueError(f"similarity must be square [B, B], got {tuple(similarity.shape)}")
    if similarity.shape[0] < 2:
        raise ValueError("negatives need a batch of at least 2 pairs")


def sample_negatives(similarity: torch.Tensor, hard: bool = True) -> torch.Tensor:
    """For each row of a square similarity matrix, draw the column of one negative (never the row's own index).

    `hard=True` draws from `softmax(similarity)` with the diagonal zeroed (ALBEF): confusable pairs are drawn more
    often, yet every negative keeps a chance, which avoids collapsing onto one false negative. `hard=False` draws
    uniformly. A row with a non-finite similarity draws uniformly. Needs at least 2 rows.
    """
    _check_square_batch(similarity)
    with torch.no_grad():
        if hard:
            weights = torch.softmax(similarity.float(), dim=1)
            # Rows whose softmax underflowed everywhere off the diagonal must still be able to draw a negative.
            weights = weights + 1e-6
            # A non-finite similarity (NaN weights or inputs) would make torch.multinomial raise here, in one process,
            # while the others wait in the loss's all-gather (a hang under DDP). Such rows draw uniformly instead:
            # the NaN then reaches the loss on every process, where the training loop sees it and skips the step.
            weights = torch.where(torch.isfinite(weights).all(dim=1, keepdim=True), weights, 1.0)
        else:
            weights = torch.ones_like(similarity, dtype=torch.float32)
        weights.fill_diagonal_(0)
        return torch.multinomial(weights, 1).squeeze(1)


def hardest_negatives(similarity: torch.Tensor) -> torch.Tensor:
    """For each row of a square similarity matrix, the column of its most similar negative (never its own index).

    The deterministic counterpart of `sample_negatives`, used in eval mode: two identical evaluations then score the
    same ITM pairs (transformers' Trainer.evaluate, determinism checks), and the pairs are the most confusable ones.
    Ties go to the lowest index. Needs at least 2 rows.
    """
    _check_square_batch(similarity)
    with torch.no_grad():
        scores = similarity.float().clone()
        scores.fill_diagonal_(float("-inf"))
        return scores.argmax(dim=1)


def itm_loss(itm_logits: torch.Tensor, itm_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the matching head over all scored pairs (label 0 = match, 1 = no match)."""
    return F.cross_entropy(itm_logits.float(), itm_labels)


__all__ = [
    "contrastive_loss",
    "pairwise_contrastive_loss",
    "distributed_world",
    "gather_with_grad",
    "hardest_negatives",
    "itm_loss",
    "local_losses",
    "sample_negatives",
]
