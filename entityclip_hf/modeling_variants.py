# Copyright 2026 The entityclip-hf authors. Licensed under the Apache License, Version 2.0.
"""EntityCLIP's opt-in variants that carry explanations into what retrieval and reranking use.

Each is switched by an `EntityCLIPConfig` field and off by default (the paper's behaviour):

- `explanation_contrastive_weight`: a contrastive term between images and explanation-aware texts
  (`fused_text_embeddings`), the embedding that explanation-aware retrieval scores;
- `expert_loss_reads_candidate_explanation`: the expert contrastive loss with the image side's shared experts reading
  the CANDIDATE text's explanation for every (image, text) pair (`candidate_explanation_expert_logits`): in the
  paper's loss both sides read the pair's own explanation, so it is solved from the explanation alone (a leak);
- `itm_cross_attention`: a cross-attention block from the text (and explanation) to the image tokens for GI-ITM
  (`EntityCLIPCrossModalMatcher`), so that the matching head sees image-text interaction.

Kept apart from `modeling_entityclip.py` so that the paper's model reads on its own; imported relatively, so that
`save_pretrained` copies this file for `trust_remote_code` users.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .modeling_experts import EntityCLIPExpertBank, ExpertKeysValues, TokenFeatures, gated_sum


def fused_text_embeddings(
    text_pooled: torch.Tensor, explanation_pooled: torch.Tensor, has_explanation: torch.Tensor, weight: float
) -> torch.Tensor:
    """`normalize((1 - w) t + w e)` of L2-normalised text and explanation embeddings [B, D]; `t` where there is no
    explanation. The training-side twin of `entityclip_hf.retrieval.fuse_explanation_embeddings`."""
    text = F.normalize(text_pooled.float(), dim=-1)
    explanation = F.normalize(explanation_pooled.float(), dim=-1)
    fused = F.normalize((1 - weight) * text + weight * explanation, dim=-1)
    return torch.where(has_explanation[:, None], fused, text)


def candidate_explanation_expert_logits(
    shared_experts: EntityCLIPExpertBank,
    image_gate: nn.Linear,
    image: TokenFeatures,
    vision_expert_outputs: torch.Tensor | None,
    shared_keys: ExpertKeysValues,
    has_explanation: torch.Tensor,
    expert_text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled scores [B, B] of every (image i, text j): image i's expert embedding built with text j's explanation
    (the candidate's) against text j's expert embedding; and the shared experts' outputs [B * B, K, D] of the pairs
    (row i * B + j), which GI-ITM reuses for its negatives.

    Each image-side shared expert reads out one token per pair, so the B x B pairs cost B x B single-token
    attention reads and MLPs, not B x B full blocks.
    """
    batch_size = image.pooled.shape[0]
    device = image.pooled.device
    image_rows = torch.arange(batch_size, device=device).repeat_interleave(batch_size)
    text_rows = torch.arange(batch_size, device=device).repeat(batch_size)
    shared_outputs = shared_experts(image.pooled, shared_keys, query_rows=image_rows, key_rows=text_rows)
    own = vision_expert_outputs[image_rows] if vision_expert_outputs is not None else None
    outputs = torch.cat([own, shared_outputs], dim=1) if own is not None else shared_outputs
    num_own = own.shape[1] if own is not None else 0
    available = torch.cat(
        [
            torch.ones(len(image_rows), num_own, dtype=torch.bool, device=device),
            has_explanation[text_rows, None].expand(-1, shared_outputs.shape[1]),
        ],
        dim=1,
    )
    if own is None:
        # Only shared experts on the image side: a candidate without explanation falls back to the CLIP embedding.
        fallback = ~has_explanation[text_rows]
        embeds = gated_sum(image_gate(image.pooled)[image_rows], outputs, available | fallback[:, None])
        embeds = torch.where(fallback[:, None], image.pooled[image_rows], embeds)
    else:
        embeds = gated_sum(image_gate(image.pooled)[image_rows], outputs, available)
    embeds = F.normalize(embeds.float(), dim=-1).view(batch_size, batch_size, -1)
    logits = logit_scale.exp().float() * torch.einsum("ijd,jd->ij", embeds, expert_text_embeds.float())
    return logits, shared_outputs


class EntityCLIPCrossModalMatcher(nn.Module):
    """GI-ITM's view of image-text interaction: the text's end-of-text token (plus its explanation's, when it has
    one) queries every image token through one cross-attention expert block (BLIP's ITM reads its matching token
    after cross-attention to the image in the same way). Returns [P, D], added to the gated expert fusion."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.block = EntityCLIPExpertBank(1, dim, num_heads, mlp_ratio, eps)

    def forward(
        self,
        image: TokenFeatures,
        text: TokenFeatures,
        explanation: TokenFeatures,
        has_explanation: torch.Tensor,
        image_rows: torch.Tensor,
        text_rows: torch.Tensor,
    ) -> torch.Tensor:
        keys = self.block.keys_values(image.tokens, image.key_mask)  # once per image, read by every pair
        explanation_part = torch.where(has_explanation[:, None], explanation.pooled, torch.zeros_like(text.pooled))
        queries = text.pooled + explanation_part  # [B, D], one query token per text
        return self.block(queries, keys, query_rows=text_rows, key_rows=image_rows)[:, 0]


__all__ = ["EntityCLIPCrossModalMatcher", "candidate_explanation_expert_logits", "fused_text_embeddings"]
