"""EntityCLIP: CLIP with Multimodal Attentive Experts (MMAE) and Gated Integrative Image-Text Matching (GI-ITM).

The experts and the matching head only shape training: retrieval uses the fine-tuned CLIP embeddings, so
`get_image_features` / `get_text_features` cost exactly what CLIP's do.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_entityclip import EntityCLIPConfig
from .losses import contrastive_loss, itm_loss, sample_negatives

logger = logging.get_logger(__name__)

# Index of the "match" class of the ITM head, as in the paper's released code.
ITM_MATCH = 0
ITM_NO_MATCH = 1


@dataclass
class EntityCLIPOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*, returned when `return_loss=True`):
        `contrastive_loss + beta * expert_contrastive_loss + gamma * itm_loss`.
    contrastive_loss (`torch.FloatTensor`, *optional*):
        Image-text contrastive loss between the CLIP embeddings (what retrieval uses).
    expert_contrastive_loss (`torch.FloatTensor`, *optional*):
        Contrastive loss between the gated expert embeddings.
    itm_loss (`torch.FloatTensor`, *optional*):
        GI-ITM cross-entropy over the positive, negative-text and negative-image pairs.
    logits_per_image (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
        Scaled cosine similarity of the CLIP image and text embeddings (images as rows).
    logits_per_text (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
        The transpose of `logits_per_image`.
    image_embeds, text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised CLIP embeddings (`get_image_features` / `get_text_features`, normalised).
    expert_image_embeds, expert_text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised gated expert embeddings (the paper's V* and T*).
    itm_logits (`torch.FloatTensor` of shape `(num_pairs, 2)`):
        Matching logits (index 0 = match): the `batch_size` positive pairs, followed, when `return_loss=True`, by the
        image-with-negative-text and negative-image-with-text pairs.
    itm_labels (`torch.LongTensor` of shape `(num_pairs,)`):
        The target class of each row of `itm_logits`.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    expert_contrastive_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    expert_image_embeds: torch.FloatTensor | None = None
    expert_text_embeds: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itm_labels: torch.LongTensor | None = None


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


class EntityCLIPPreTrainedModel(PreTrainedModel):
    config: EntityCLIPConfig
    config_class = EntityCLIPConfig
    base_model_prefix = "clip"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        # CLIP's own modules are initialised by CLIPModel (transformers dispatches to each sub-model's _init_weights).
        std = self.config.initializer_range
        if isinstance(module, EntityCLIPExpertBank):
            dim = module.dim
            for name in ("ln_1_weight", "ln_2_weight"):
                init.ones_(getattr(module, name))
            for name in ("ln_1_bias", "ln_2_bias", "query_bias", "key_value_bias", "out_bias", "fc1_bias", "fc2_bias"):
                init.zeros_(getattr(module, name))
            # CLIP's scheme for attention and MLP projections, at the experts' width.
            init.normal_(module.query_weight, std=dim**-0.5)
            init.normal_(module.key_value_weight, std=dim**-0.5)
            init.normal_(module.out_weight, std=dim**-0.5)
            init.normal_(module.fc1_weight, std=(2 * dim) ** -0.5)
            init.normal_(module.fc2_weight, std=dim**-0.5)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)


class EntityCLIPModel(EntityCLIPPreTrainedModel):
    r"""
    EntityCLIP: a [`CLIPModel`] fine-tuned with Multimodal Attentive Experts and Gated Integrative Image-Text
    Matching, using an LLM-written explanation of each text's entities during training.

    Retrieval needs only [`get_image_features`] and [`get_text_features`] (plain CLIP). [`match_probability`] scores
    candidate pairs with the GI-ITM head, for reranking.
    """

    def __init__(self, config: EntityCLIPConfig):
        super().__init__(config)
        clip_config = config.clip_config
        dim = clip_config.projection_dim
        self.clip = CLIPModel._from_config(clip_config)

        def bank(num_experts):
            if num_experts == 0:
                return None
            return EntityCLIPExpertBank(
                num_experts, dim, config.expert_num_heads, config.expert_mlp_ratio, config.layer_norm_eps
            )

        self.vision_experts = bank(config.num_vision_experts)
        self.text_experts = bank(config.num_text_experts)
        self.shared_experts = bank(config.num_shared_experts)
        self.image_gate = nn.Linear(dim, config.num_image_side_experts)
        self.text_gate = nn.Linear(dim, config.num_text_side_experts)
        self.fusion_gate = nn.Linear(2 * dim, config.num_image_side_experts + config.num_text_side_experts)
        self.itm_head = nn.Linear(dim, 2)
        self.post_init()

    # ------------------------------------------------------------------ inference: exactly CLIP
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """Projected (unnormalised) CLIP image embeddings [B, D]: what retrieval indexes."""
        return self.clip.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Projected (unnormalised) CLIP text embeddings [B, D]: what retrieval queries with."""
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs).pooler_output

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp CLIP's `logit_scale` to [0, config.logit_scale_max]; call after each optimizer step (as open_clip)."""
        self.clip.logit_scale.clamp_(0, self.config.logit_scale_max)

    # ------------------------------------------------------------------ token features
    def _end_of_text_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The same rule as CLIPTextModel's pooling, so that `pooled` equals CLIP's text embedding.
        eos_token_id = self.config.clip_config.text_config.eos_token_id
        if eos_token_id == 2:
            return input_ids.to(torch.int).argmax(dim=-1)
        return (input_ids.to(torch.int) == eos_token_id).int().argmax(dim=-1)

    def _image_token_features(self, pixel_values: torch.Tensor) -> TokenFeatures:
        vision_outputs = self.clip.vision_model(pixel_values=pixel_values)
        tokens = self.clip.visual_projection(self.clip.vision_model.post_layernorm(vision_outputs.last_hidden_state))
        positions = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return TokenFeatures(tokens, tokens[:, 0], positions, None)

    def _text_token_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> TokenFeatures:
        text_outputs = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        tokens = self.clip.text_projection(text_outputs.last_hidden_state)
        positions = self._end_of_text_positions(input_ids).to(tokens.device)
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), positions]
        key_mask = attention_mask.bool() if attention_mask is not None else None
        return TokenFeatures(tokens, pooled, positions, key_mask)

    def _explanation_token_features(
        self,
        explanation_input_ids: torch.Tensor | None,
        explanation_attention_mask: torch.Tensor | None,
        batch_size: int,
    ) -> tuple[TokenFeatures, torch.Tensor]:
        """Explanation tokens for the whole batch, encoding only the samples that have one.

        A sample without an explanation (all-zero attention-mask row, or no explanations at all) gets one zero token
        that its key mask leaves readable, so that attention stays finite; its shared-expert outputs are then masked
        out of every gate. The shared experts still run on it so that DDP sees a gradient for every parameter.
        """
        device = self.clip.logit_scale.device
        dim = self.config.projection_dim
        if explanation_input_ids is None:
            has_explanation = torch.zeros(batch_size, dtype=torch.bool, device=device)
        elif explanation_attention_mask is None:
            has_explanation = torch.ones(batch_size, dtype=torch.bool, device=device)
        else:
            has_explanation = explanation_attention_mask.bool().any(dim=1).to(device)
        if explanation_input_ids is not None and explanation_input_ids.shape[0] != batch_size:
            raise ValueError(
                f"explanation_input_ids has {explanation_input_ids.shape[0]} rows but the batch has {batch_size} texts"
            )
        present = has_explanation.nonzero().squeeze(1)
        if present.numel() == 0:
            dtype = self.clip.text_projection.weight.dtype
            tokens = torch.zeros(batch_size, 1, dim, device=device, dtype=dtype)
            key_mask = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
            positions = torch.zeros(batch_size, dtype=torch.long, device=device)
            return TokenFeatures(tokens, tokens[:, 0], positions, key_mask), has_explanation

        ids = explanation_input_ids[present]
        mask = explanation_attention_mask[present] if explanation_attention_mask is not None else None
        if mask is not None:
            # Encode only up to the last position any explanation uses: beyond it is padding for everyone.
            length = int(mask.bool().any(dim=0).nonzero().max()) + 1
            ids, mask = ids[:, :length], mask[:, :length]
        encoded = self._text_token_features(ids, mask)
        tokens = encoded.tokens.new_zeros(batch_size, encoded.tokens.shape[1], dim)
        tokens[present] = encoded.tokens
        key_mask = torch.zeros(batch_size, tokens.shape[1], dtype=torch.bool, device=device)
        key_mask[present] = encoded.key_mask if encoded.key_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        key_mask[~has_explanation, 0] = True
        positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        positions[present] = encoded.pooled_position
        return TokenFeatures(tokens, tokens[torch.arange(batch_size, device=device), positions], positions, key_mask), (
            has_explanation
        )

    # ------------------------------------------------------------------ experts
    def _run_experts(self, bank, query: TokenFeatures, keys: TokenFeatures | ExpertKeysValues, **pairs):
        if bank is None:
            return None
        if isinstance(keys, TokenFeatures):
            keys = bank.keys_values(keys.tokens, keys.key_mask)
        return bank(query.pooled, keys, **pairs)

    @staticmethod
    def _concat_expert_outputs(parts: list[torch.Tensor | None]) -> torch.Tensor:
        """Concatenate [P, K_i, D] expert outputs along the expert axis, skipping kinds configured with 0 experts."""
        return torch.cat([p for p in parts if p is not None], dim=1)

    def _shared_available(self, has_explanation: torch.Tensor, num_before: int, num_after: int) -> torch.Tensor:
        """[P, E] availability mask: experts before/after the shared ones always, shared ones only with an explanation."""
        num_pairs = has_explanation.shape[0]
        device = has_explanation.device
        return torch.cat(
            [
                torch.ones(num_pairs, num_before, dtype=torch.bool, device=device),
                has_explanation[:, None].expand(-1, self.config.num_shared_experts),
                torch.ones(num_pairs, num_after, dtype=torch.bool, device=device),
            ],
            dim=1,
        )

    def _itm_logits(
        self,
        image: TokenFeatures,
        text: TokenFeatures,
        vision_outputs,
        text_outputs,
        shared_text_outputs,
        shared_image_outputs,
        image_rows: torch.Tensor,
        text_rows: torch.Tensor,
        has_explanation: torch.Tensor,
    ) -> torch.Tensor:
        """GI-ITM logits of the pairs (image image_rows[p], text text_rows[p] with that text's explanation)."""
        outputs = self._concat_expert_outputs(
            [
                vision_outputs[image_rows] if vision_outputs is not None else None,
                shared_image_outputs,
                text_outputs[text_rows] if text_outputs is not None else None,
                shared_text_outputs[text_rows] if shared_text_outputs is not None else None,
            ]
        )
        pair_has_explanation = has_explanation[text_rows]
        num_shared = self.config.num_shared_experts
        available = torch.cat(
            [
                torch.ones(len(text_rows), self.config.num_vision_experts, dtype=torch.bool, device=outputs.device),
                pair_has_explanation[:, None].expand(-1, num_shared),
                torch.ones(len(text_rows), self.config.num_text_experts, dtype=torch.bool, device=outputs.device),
                pair_has_explanation[:, None].expand(-1, num_shared),
            ],
            dim=1,
        )
        gate_logits = self.fusion_gate(torch.cat([image.pooled[image_rows], text.pooled[text_rows]], dim=-1))
        fused = gated_sum(gate_logits, outputs, available)
        return self.itm_head(fused)

    def _gated_embedding(self, gate, query: TokenFeatures, own, shared, has_explanation):
        available = self._shared_available(has_explanation, own.shape[1] if own is not None else 0, 0)
        if own is None and bool((~has_explanation).any()):
            # Only shared experts on this side: a sample without explanation keeps its CLIP embedding.
            fallback = ~has_explanation
            embedding = gated_sum(gate(query.pooled), shared, available | fallback[:, None])
            return torch.where(fallback[:, None], query.pooled, embedding)
        return gated_sum(gate(query.pooled), self._concat_expert_outputs([own, shared]), available)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        explanation_input_ids: torch.LongTensor | None = None,
        explanation_attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EntityCLIPOutput | tuple:
        r"""
        Score a batch of matching (image, text[, explanation]) rows and, with `return_loss=True`, compute
        `L = VTC(CLIP) + beta * VTC(experts) + gamma * GI-ITM`.

        Args:
            input_ids, attention_mask: the entity-centric texts (row i describes image i).
            pixel_values: the images.
            explanation_input_ids, explanation_attention_mask: the LLM explanation of each text. A row whose
                attention mask is all zeros has no explanation: its shared experts are gated out.
            return_loss: compute the losses (and mine ITM negatives inside the batch).
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("EntityCLIPModel.forward needs both `input_ids` and `pixel_values`.")
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"{pixel_values.shape[0]} images but {input_ids.shape[0]} texts: row i of each must be a matching pair."
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        batch_size = input_ids.shape[0]
        config = self.config

        image = self._image_token_features(pixel_values)
        text = self._text_token_features(input_ids, attention_mask)
        explanation, has_explanation = self._explanation_token_features(
            explanation_input_ids, explanation_attention_mask, batch_size
        )

        image_embeds = F.normalize(image.pooled.float(), dim=-1)
        text_embeds = F.normalize(text.pooled.float(), dim=-1)
        logit_scale = self.clip.logit_scale
        logits_per_image = logit_scale.exp().float() * image_embeds @ text_embeds.t()

        # Each distinct expert input is computed once per step: vision experts once per image, text experts and
        # text-side shared experts once per text, explanation keys/values once per explanation. Only the image-side
        # shared experts also run on the (image, other explanation) combinations of the ITM negatives.
        vision_outputs = self._run_experts(self.vision_experts, image, image)
        text_outputs = self._run_experts(self.text_experts, text, text)
        shared_keys = (
            self.shared_experts.keys_values(explanation.tokens, explanation.key_mask)
            if self.shared_experts is not None
            else None
        )
        shared_text_outputs = (
            self._run_experts(self.shared_experts, text, shared_keys) if shared_keys is not None else None
        )

        arange = torch.arange(batch_size, device=input_ids.device)
        mine_negatives = return_loss and config.gamma > 0 and batch_size >= 2
        if mine_negatives:
            local_similarity = logits_per_image.detach()
            negative_text_rows = sample_negatives(local_similarity, hard=config.use_hard_negatives)
            negative_image_rows = sample_negatives(local_similarity.t(), hard=config.use_hard_negatives)
            # Pairs: positives, (image i, negative text + its explanation), (negative image, text i + explanation i).
            image_rows = torch.cat([arange, arange, negative_image_rows])
            text_rows = torch.cat([arange, negative_text_rows, arange])
        else:
            image_rows, text_rows = arange, arange
        shared_image_outputs = (
            self._run_experts(self.shared_experts, image, shared_keys, query_rows=image_rows, key_rows=text_rows)
            if shared_keys is not None
            else None
        )

        positive_shared_image = shared_image_outputs[:batch_size] if shared_image_outputs is not None else None
        expert_image_embeds = F.normalize(
            self._gated_embedding(
                self.image_gate, image, vision_outputs, positive_shared_image, has_explanation
            ).float(),
            dim=-1,
        )
        expert_text_embeds = F.normalize(
            self._gated_embedding(self.text_gate, text, text_outputs, shared_text_outputs, has_explanation).float(),
            dim=-1,
        )
        itm_logits = self._itm_logits(
            image,
            text,
            vision_outputs,
            text_outputs,
            shared_text_outputs,
            shared_image_outputs,
            image_rows,
            text_rows,
            has_explanation,
        )
        itm_labels = torch.full((len(image_rows),), ITM_NO_MATCH, dtype=torch.long, device=itm_logits.device)
        itm_labels[:batch_size] = ITM_MATCH

        loss = clip_loss = expert_loss = matching_loss = None
        if return_loss:
            clip_loss, _ = contrastive_loss(image_embeds, text_embeds, logit_scale)
            expert_loss, _ = contrastive_loss(expert_image_embeds, expert_text_embeds, logit_scale)
            matching_loss = itm_loss(itm_logits, itm_labels)
            loss = clip_loss + config.beta * expert_loss + config.gamma * matching_loss

        output = EntityCLIPOutput(
            loss=loss,
            contrastive_loss=clip_loss,
            expert_contrastive_loss=expert_loss,
            itm_loss=matching_loss,
            logits_per_image=logits_per_image,
            # contiguous: an aliased output trips torch.compile's AOTAutograd cache (torch 2.13); B x B is cheap.
            logits_per_text=logits_per_image.t().contiguous(),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            expert_image_embeds=expert_image_embeds,
            expert_text_embeds=expert_text_embeds,
            itm_logits=itm_logits,
            itm_labels=itm_labels,
        )
        return output if return_dict else output.to_tuple()

    def match_probability(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        explanation_input_ids: torch.LongTensor | None = None,
        explanation_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """GI-ITM probability [N] that image i and text i (with its optional explanation) match: a reranking score."""
        output = self.forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            explanation_input_ids=explanation_input_ids,
            explanation_attention_mask=explanation_attention_mask,
            return_loss=False,
            return_dict=True,
        )
        return output.itm_logits.float().softmax(dim=-1)[:, ITM_MATCH]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_clip_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, output_loading_info: bool = False, **kwargs
    ):
        """Start EntityCLIP from any CLIP checkpoint: all CLIP weights loaded, only the EntityCLIP layers new.

        Keyword arguments that are `EntityCLIPConfig` fields (`beta`, `num_vision_experts`, ...) configure the heads;
        the rest go to `from_pretrained` (`dtype`, `attn_implementation`, `local_files_only`, ...). The newly
        initialised weights are logged, and returned in the loading info with `output_loading_info=True`.
        """
        config_fields = set(EntityCLIPConfig.__annotations__) - {"clip_config"}
        entity_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in config_fields}
        hub_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "local_files_only", "revision", "token", "subfolder", "force_download")
            if key in kwargs
        }
        config_dict, _ = CLIPConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
        if config_dict.get("model_type") != "clip":
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {config_dict.get('model_type')!r} model, not a CLIP "
                "checkpoint; load EntityCLIP checkpoints with EntityCLIPModel.from_pretrained."
            )
        clip_config = CLIPConfig.from_dict(config_dict)
        config = EntityCLIPConfig(clip_config=clip_config, **entity_kwargs)
        model, loading_info = cls.from_pretrained(
            pretrained_model_name_or_path, config=config, output_loading_info=True, **kwargs
        )
        new_weights = sorted(loading_info["missing_keys"])
        not_entityclip = [key for key in new_weights if key.startswith(cls.base_model_prefix + ".")]
        if not_entityclip:
            raise ValueError(
                f"{pretrained_model_name_or_path} lacks CLIP weights {not_entityclip[:5]}"
                f"{' ...' if len(not_entityclip) > 5 else ''}: it is not a complete CLIP checkpoint."
            )
        logger.warning(
            "EntityCLIP initialised from CLIP checkpoint %s; newly initialised (train them): %s",
            pretrained_model_name_or_path,
            ", ".join(sorted({key.split(".")[0] for key in new_weights})),
        )
        return (model, loading_info) if output_loading_info else model


__all__ = ["EntityCLIPModel", "EntityCLIPOutput", "EntityCLIPPreTrainedModel"]
