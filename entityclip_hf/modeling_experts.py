"""Building blocks of EntityCLIP's Multimodal Attentive Experts: token features, a bank of experts, gated sums.

Kept apart from `modeling_entityclip.py` (the model and its outputs) so that each file has one role; both are copied
beside saved models for `trust_remote_code` users, so this file imports only torch.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TokenFeatures:
    """Projected token features of one modality: every token, the read-out token, and which tokens are real."""

    tokens: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor  # [B, D]: CLIP's embedding (CLS for images, end-of-text for texts)
    pooled_position: torch.Tensor  # [B]: where `pooled` sits in `tokens`
    key_mask: torch.Tensor | None  # [B, L] bool, True = a real token that attention may read; None = all real


@dataclass
class ExpertKeysValues:
    """Keys and values of one expert bank over a key sequence: computed once, read by every query that needs them."""

    keys: torch.Tensor  # [B, K, H, L, head_dim]
    values: torch.Tensor  # [B, K, H, L, head_dim]
    key_mask: torch.Tensor | None  # [B, L] bool, True = attend


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class EntityCLIPExpertBank(nn.Module):
    r"""
    `num_experts` experts of one kind, each a pre-LayerNorm residual block with its own weights,
    `x = x + MHA(ln_1(x), ln_1(y), ln_1(y)); x = x + MLP(ln_2(x))`, run together as one batched computation
    (weights stacked along an expert axis) instead of a loop of small modules.

    EntityCLIP reads each expert at a single token (CLS or end-of-text). In a one-layer block tokens mix only through
    attention, so that token's output depends on the other query positions not at all: only it is computed, while
    keys and values cover the whole sequence `y`. The result is exactly the full block read at that token.
    """

    def __init__(self, num_experts: int, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.eps = eps
        mlp_dim = int(dim * mlp_ratio)
        self.ln_1_weight = nn.Parameter(torch.ones(num_experts, dim))
        self.ln_1_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.query_weight = nn.Parameter(torch.empty(num_experts, dim, dim))
        self.query_bias = nn.Parameter(torch.zeros(num_experts, dim))
        # Keys and values share one matmul per expert: [D, 2D].
        self.key_value_weight = nn.Parameter(torch.empty(num_experts, dim, 2 * dim))
        self.key_value_bias = nn.Parameter(torch.zeros(num_experts, 2 * dim))
        self.out_weight = nn.Parameter(torch.empty(num_experts, dim, dim))
        self.out_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.ln_2_weight = nn.Parameter(torch.ones(num_experts, dim))
        self.ln_2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, dim, mlp_dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, mlp_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, mlp_dim, dim))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))

    def _per_expert_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """LayerNorm of `x` [..., D] with each expert's affine: returns [..., K, D] (one normalisation, K affines)."""
        normed = F.layer_norm(x, (self.dim,), eps=self.eps).unsqueeze(-2)
        return normed * weight + bias

    def keys_values(self, tokens: torch.Tensor, key_mask: torch.Tensor | None) -> ExpertKeysValues:
        """Every expert's keys and values over `tokens` [B, L, D]."""
        batch_size, length, _ = tokens.shape
        normed = self._per_expert_norm(tokens, self.ln_1_weight, self.ln_1_bias)  # [B, L, K, D]
        key_values = torch.einsum("blkd,kde->bkle", normed, self.key_value_weight)
        key_values = key_values + self.key_value_bias[None, :, None, :]
        keys, values = key_values.view(batch_size, self.num_experts, length, 2, self.num_heads, self.head_dim).unbind(3)
        return ExpertKeysValues(keys.transpose(2, 3), values.transpose(2, 3), key_mask)

    def forward(
        self,
        query_tokens: torch.Tensor,
        keys_values: ExpertKeysValues,
        query_rows: torch.Tensor | None = None,
        key_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Run every expert for the pairs (query_tokens[query_rows[p]], key sequence key_rows[p]).

        Args:
            query_tokens: [N, D] the read-out tokens (CLS / end-of-text), one per query sequence.
            keys_values: from `keys_values` over M key sequences.
            query_rows, key_rows: [P] indices pairing queries with key sequences; both default to `arange(N)`.
        Returns:
            [P, K, D], each expert's output at the read-out token.
        """
        if query_rows is not None:
            query_tokens = query_tokens[query_rows]
        keys, values, key_mask = keys_values.keys, keys_values.values, keys_values.key_mask
        if key_rows is not None:
            keys, values = keys[key_rows], values[key_rows]
            key_mask = key_mask[key_rows] if key_mask is not None else None
        num_pairs = query_tokens.shape[0]
        normed = self._per_expert_norm(query_tokens, self.ln_1_weight, self.ln_1_bias)  # [P, K, D]
        queries = torch.einsum("pkd,kde->pke", normed, self.query_weight) + self.query_bias
        queries = queries.view(num_pairs, self.num_experts, self.num_heads, 1, self.head_dim)
        attn_mask = key_mask[:, None, None, None, :] if key_mask is not None else None
        attended = F.scaled_dot_product_attention(
            queries.flatten(0, 1),
            keys.flatten(0, 1),
            values.flatten(0, 1),
            attn_mask=attn_mask.expand(-1, self.num_experts, -1, -1, -1).flatten(0, 1)
            if attn_mask is not None
            else None,
        )
        attended = attended.view(num_pairs, self.num_experts, self.dim)
        hidden = query_tokens.unsqueeze(1) + torch.einsum("pkd,kde->pke", attended, self.out_weight) + self.out_bias
        normed = F.layer_norm(hidden, (self.dim,), eps=self.eps) * self.ln_2_weight + self.ln_2_bias
        mlp = quick_gelu(torch.einsum("pkd,kdf->pkf", normed, self.fc1_weight) + self.fc1_bias)
        return hidden + torch.einsum("pkf,kfd->pkd", mlp, self.fc2_weight) + self.fc2_bias


def gated_sum(gate_logits: torch.Tensor, outputs: torch.Tensor, available: torch.Tensor | None) -> torch.Tensor:
    """Softmax-gated sum of expert outputs [P, E, D] with gate logits [P, E]; `available` [P, E] masks experts out.

    A row with no available expert would make the softmax NaN; that cannot happen because the config guarantees
    each side at least one expert that does not need an explanation, or the caller keeps one available.
    """
    gate_logits = gate_logits.float()
    if available is not None:
        gate_logits = gate_logits.masked_fill(~available, torch.finfo(gate_logits.dtype).min)
    gate = torch.softmax(gate_logits, dim=-1).to(outputs.dtype)
    return torch.einsum("pe,ped->pd", gate, outputs)


__all__ = ["EntityCLIPExpertBank", "ExpertKeysValues", "TokenFeatures", "gated_sum", "quick_gelu"]
