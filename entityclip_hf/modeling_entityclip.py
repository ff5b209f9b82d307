"""EntityCLIP: CLIP with Multimodal Attentive Experts (MMAE) and Gated Integrative Image-Text Matching (GI-ITM).

The model is a CLIP wherever transformers expects one: `get_image_features` / `get_text_features` return what
`CLIPModel`'s return, and `forward` without `return_loss` scores N images against M texts exactly as
`CLIPModel.forward` does (same weights, same numbers). The experts and the matching head only shape training
(`return_loss=True`, a paired batch) and reranking (`match_probability`), so retrieval costs exactly what CLIP costs.
"""

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple, logging

from .configuration_entityclip import EntityCLIPConfig
from .losses import contrastive_loss, hardest_negatives, itm_loss, pairwise_contrastive_loss, sample_negatives
from .modeling_checks import check_model_inputs, load_or_name_the_file, read_config_dict
from .modeling_experts import EntityCLIPExpertBank, ExpertKeysValues, TokenFeatures, gated_sum
from .modeling_variants import EntityCLIPCrossModalMatcher, candidate_explanation_expert_logits, fused_text_embeddings

logger = logging.get_logger(__name__)

# Index of the "match" class of the ITM head, as in the paper's released code.
ITM_MATCH = 0
ITM_NO_MATCH = 1


@dataclass
class EntityCLIPOutput(ModelOutput):
    r"""
    The first seven fields are `CLIPOutput`'s, in its order, so code written for `CLIPModel` reads them unchanged.

    loss (`torch.FloatTensor`, *optional*, returned when `return_loss=True`):
        `contrastive_loss + beta * expert_contrastive_loss + gamma * itm_loss`.
    logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
        Scaled cosine similarity of the CLIP image and text embeddings (images as rows).
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
        The transpose of `logits_per_image`.
    text_embeds, image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised CLIP embeddings (`get_text_features` / `get_image_features`, normalised).
    text_model_output, vision_model_output (`BaseModelOutputWithPooling`):
        What `get_text_features` / `get_image_features` return (projected `pooler_output`; hidden states and
        attentions when asked for).
    contrastive_loss (`torch.FloatTensor`, *optional*):
        Image-text contrastive loss between the CLIP embeddings (what retrieval uses).
    expert_contrastive_loss (`torch.FloatTensor`, *optional*):
        Contrastive loss between the gated expert embeddings.
    itm_loss (`torch.FloatTensor`, *optional*):
        GI-ITM cross-entropy over the positive, negative-text and negative-image pairs.
    expert_image_embeds, expert_text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
        L2-normalised gated expert embeddings (the paper's V* and T*), with `return_loss=True`.
    itm_logits (`torch.FloatTensor` of shape `(num_pairs, 2)`, *optional*):
        Matching logits (index 0 = match) with `return_loss=True`: the `batch_size` positive pairs, then the
        image-with-negative-text and negative-image-with-text pairs.
    itm_labels (`torch.LongTensor` of shape `(num_pairs,)`, *optional*):
        The target class of each row of `itm_logits`.
    explanation_contrastive_loss (`torch.FloatTensor`, *optional*):
        With `config.explanation_contrastive_weight > 0`: contrastive loss between the CLIP image embeddings and the
        explanation-aware text embeddings (added to `loss` with that weight).
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    contrastive_loss: torch.FloatTensor | None = None
    expert_contrastive_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
    expert_image_embeds: torch.FloatTensor | None = None
    expert_text_embeds: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itm_labels: torch.LongTensor | None = None
    explanation_contrastive_loss: torch.FloatTensor | None = None

    def to_tuple(self) -> tuple[Any]:
        # As CLIPOutput: the nested model outputs become tuples too.
        return tuple(
            self[key].to_tuple() if key in ("text_model_output", "vision_model_output") else self[key]
            for key in self.keys()
        )


def _torch_linear_default_(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    """nn.Linear's own initialisation (kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) for weight and bias)."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    init.uniform_(weight, -bound, bound)
    if bias is not None:
        init.uniform_(bias, -bound, bound)


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

    def save_pretrained(self, save_directory, *args, **kwargs):
        # register_for_auto_class records one Auto class (AutoModel); the zero-shot pipeline of a user without this
        # package needs the same class under AutoModelForZeroShotImageClassification in auto_map too.
        if getattr(self, "_auto_class", None) is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            module = type(self).__module__.rsplit(".", 1)[-1]
            auto_map.setdefault("AutoModelForZeroShotImageClassification", f"{module}.{type(self).__name__}")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers treats code outside its package as "custom" and then skips, during loading, every module with
        # no parameters of its own, on the guess that custom `_init_weights` write tensors in place. That skips
        # CLIPAttention / CLIPMLP, so CLIP weights missing from a checkpoint would keep the generic std-0.02 init
        # instead of CLIP's scheme. Our `_init_weights` uses `transformers.initialization` (which honours the
        # "already loaded" flags), so the guess does not apply.
        return False

    def _init_weights(self, module):
        """Initialise EntityCLIP's own layers as the paper's released code does (PyTorch's defaults).

        The released code builds each expert from `nn.MultiheadAttention` + `nn.Linear` + `nn.LayerNorm` and the gates
        and head from `nn.Linear`, leaving torch's initialisation: q/k/v weights xavier-uniform over the [3D, D]
        in-projection (std ~0.031 at D=512) with zero biases, the attention's out-projection U(+-1/sqrt(D)) with a
        zero bias, every other linear layer U(+-1/sqrt(fan_in)) for weight and bias. CLIP's own modules never reach
        this method: transformers dispatches the sub-model `self.clip` to CLIPModel's `_init_weights`.
        """
        if isinstance(module, EntityCLIPExpertBank):
            dim = module.dim
            for name in ("ln_1_weight", "ln_2_weight"):
                init.ones_(getattr(module, name))
            for name in ("ln_1_bias", "ln_2_bias", "query_bias", "key_value_bias", "out_bias"):
                init.zeros_(getattr(module, name))
            in_projection_bound = math.sqrt(6.0 / (dim + 3 * dim))  # xavier_uniform_ on MHA's [3D, D] in_proj_weight
            init.uniform_(module.query_weight, -in_projection_bound, in_projection_bound)
            init.uniform_(module.key_value_weight, -in_projection_bound, in_projection_bound)
            _torch_linear_default_(module.out_weight, None, dim)
            _torch_linear_default_(module.fc1_weight, module.fc1_bias, dim)
            _torch_linear_default_(module.fc2_weight, module.fc2_bias, module.fc2_weight.shape[1])
        elif isinstance(module, nn.Linear):
            _torch_linear_default_(module.weight, module.bias, module.in_features)
        elif isinstance(module, EntityCLIPPreTrainedModel) and isinstance(getattr(module, "clip", None), CLIPModel):
            # CLIPModel sets logit_scale in __init__ only, so a checkpoint without it would load uninitialised memory.
            init.constant_(module.clip.logit_scale, module.config.clip_config.logit_scale_init_value)


class EntityCLIPModel(EntityCLIPPreTrainedModel):
    r"""
    EntityCLIP: a [`CLIPModel`] fine-tuned with Multimodal Attentive Experts and Gated Integrative Image-Text
    Matching, using an LLM-written explanation of each text's entities during training.

    As a CLIP: [`get_image_features`], [`get_text_features`] and `forward(input_ids, pixel_values)` (N images x M
    texts) are `CLIPModel`'s on the same weights. For training: `forward(..., return_loss=True)` on a paired batch.
    For reranking: [`match_probability`]. To share a plain CLIP: [`save_clip_pretrained`].
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
        self.itm_cross_modal = (
            EntityCLIPCrossModalMatcher(dim, config.expert_num_heads, config.expert_mlp_ratio, config.layer_norm_eps)
            if config.itm_cross_attention
            else None
        )
        self.post_init()

    def _with_config_output_flags(self, kwargs: dict) -> dict:
        # CLIP's towers read `output_hidden_states` / `output_attentions` from their own sub-configs; a user sets them
        # on this model's config, so they are passed down explicitly (an explicit argument still wins).
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag) is None and getattr(self.config, flag, False):
                kwargs[flag] = True
        return kwargs

    # ------------------------------------------------------------------ inference: exactly CLIP
    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """CLIP's image features: `pooler_output` [B, D] is the projected (unnormalised) embedding retrieval indexes."""
        check_model_inputs(self.config, None, None, pixel_values, None, None, paired=False)
        kwargs = self._with_config_output_flags(kwargs)
        return self.clip.get_image_features(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """CLIP's text features: `pooler_output` [B, D] is the projected (unnormalised) embedding queries use."""
        check_model_inputs(self.config, input_ids, attention_mask, None, None, None, paired=False)
        kwargs = self._with_config_output_flags(kwargs)
        return self.clip.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **kwargs
        )

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

    def _image_token_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> tuple[TokenFeatures, BaseModelOutputWithPooling]:
        """Every image token projected (post layer norm, as CLIP's pooled CLS), and CLIP's image features."""
        vision_outputs = self.clip.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        tokens = self.clip.visual_projection(self.clip.vision_model.post_layernorm(vision_outputs.last_hidden_state))
        positions = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        vision_outputs.pooler_output = tokens[:, 0]  # == visual_projection(pooler_output): get_image_features'
        return TokenFeatures(tokens, tokens[:, 0], positions, None), vision_outputs

    def _text_token_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[TokenFeatures, BaseModelOutputWithPooling]:
        """Every text token projected, the end-of-text one as CLIP pools it, and CLIP's text features."""
        text_outputs = self.clip.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **kwargs
        )
        tokens = self.clip.text_projection(text_outputs.last_hidden_state)
        positions = self._end_of_text_positions(input_ids).to(tokens.device)
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), positions]
        key_mask = attention_mask.bool() if attention_mask is not None else None
        text_outputs.pooler_output = pooled  # == text_projection(pooler_output): get_text_features'
        return TokenFeatures(tokens, pooled, positions, key_mask), text_outputs

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
        # Opt-in: no backward through the text encoder for the explanation pass (explanation_encoder_gradient=False).
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.explanation_encoder_gradient):
            encoded, _ = self._text_token_features(ids, mask)
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
        explanation: TokenFeatures | None = None,
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
        if self.itm_cross_modal is not None:  # variant: + the text's cross-attention read of the image tokens
            fused = fused + self.itm_cross_modal(image, text, explanation, has_explanation, image_rows, text_rows)
        return self.itm_head(fused)

    def _gated_embedding(self, gate, query: TokenFeatures, own, shared, has_explanation):
        available = self._shared_available(has_explanation, own.shape[1] if own is not None else 0, 0)
        if own is None and bool((~has_explanation).any()):
            # Only shared experts on this side: a sample without explanation keeps its CLIP embedding.
            fallback = ~has_explanation
            embedding = gated_sum(gate(query.pooled), shared, available | fallback[:, None])
            return torch.where(fallback[:, None], query.pooled, embedding)
        return gated_sum(gate(query.pooled), self._concat_expert_outputs([own, shared]), available)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        explanation_input_ids: torch.LongTensor | None = None,
        explanation_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> EntityCLIPOutput | tuple:
        r"""
        Without `return_loss`: CLIP. Scores N images against M texts exactly as `CLIPModel.forward` does
        (`logits_per_image` [N, M]); explanations are accepted and not used, since the paper's retrieval uses the
        CLIP embeddings alone.

        With `return_loss=True`: EntityCLIP's training forward on a paired batch (row i of the texts describes image
        i), `L = VTC(CLIP) + beta * VTC(experts) + gamma * GI-ITM`. ITM negatives are mined inside the batch: drawn
        from the softmax of the similarity in training mode (ALBEF), the hardest ones in eval mode, so that evaluation
        is deterministic.

        Args:
            input_ids, attention_mask, position_ids: the entity-centric texts.
            pixel_values: the images.
            return_loss: compute the losses (paired batch).
            explanation_input_ids, explanation_attention_mask: the LLM explanation of each text. A row whose
                attention mask is all zeros has no explanation: its shared experts are gated out.
            output_attentions, output_hidden_states (in `kwargs`): passed to CLIP's towers, returned in
                `text_model_output` / `vision_model_output`.
        """
        if input_ids is None or pixel_values is None:
            raise ValueError(
                "EntityCLIPModel.forward needs both `input_ids` and `pixel_values` (as CLIPModel.forward); for one "
                "modality use get_text_features / get_image_features."
            )
        check_model_inputs(
            self.config,
            input_ids,
            attention_mask,
            pixel_values,
            explanation_input_ids,
            explanation_attention_mask,
            paired=bool(return_loss),
        )
        kwargs = self._with_config_output_flags(kwargs)
        if return_loss:
            return self._paired_forward(
                input_ids,
                pixel_values,
                attention_mask,
                position_ids,
                explanation_input_ids,
                explanation_attention_mask,
                interpolate_pos_encoding,
                compute_losses=True,
                **kwargs,
            )
        clip_output = self.clip(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
            **kwargs,
        )
        return EntityCLIPOutput(**{key: value for key, value in clip_output.items() if key != "loss"})

    def _paired_forward(
        self,
        input_ids,
        pixel_values,
        attention_mask,
        position_ids,
        explanation_input_ids,
        explanation_attention_mask,
        interpolate_pos_encoding,
        compute_losses: bool,
        **kwargs,
    ) -> EntityCLIPOutput:
        """Experts, gates and GI-ITM on a paired batch; the losses (and mined negatives) when `compute_losses`."""
        batch_size = input_ids.shape[0]
        config = self.config

        image, vision_outputs = self._image_token_features(pixel_values, interpolate_pos_encoding, **kwargs)
        text, text_outputs = self._text_token_features(input_ids, attention_mask, position_ids, **kwargs)
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
        vision_expert_outputs = self._run_experts(self.vision_experts, image, image)
        text_expert_outputs = self._run_experts(self.text_experts, text, text)
        shared_keys = (
            self.shared_experts.keys_values(explanation.tokens, explanation.key_mask)
            if self.shared_experts is not None
            else None
        )
        shared_text_outputs = (
            self._run_experts(self.shared_experts, text, shared_keys) if shared_keys is not None else None
        )

        # The explanation-aware text embeddings, once, for the variants that read them (the explanation loss, and
        # the mining of GI-ITM's negatives).
        fused_texts = None
        if compute_losses and (config.explanation_contrastive_weight > 0 or config.itm_negatives_from_fused_texts):
            fused_texts = fused_text_embeddings(
                text.pooled, explanation.pooled, has_explanation, config.explanation_fusion_weight
            )
        arange = torch.arange(batch_size, device=input_ids.device)
        if compute_losses and config.gamma > 0 and batch_size >= 2:
            similarity = logits_per_image.detach()
            if config.itm_negatives_from_fused_texts:
                # Variant: mine GI-ITM's negatives where explanation-aware retrieval confuses them, i.e. from the
                # image vs fused-text similarity whose top k the head will rerank.
                similarity = logit_scale.exp().detach().float() * image_embeds.detach() @ fused_texts.detach().t()
            if self.training:
                negative_text_rows = sample_negatives(similarity, hard=config.use_hard_negatives)
                negative_image_rows = sample_negatives(similarity.t(), hard=config.use_hard_negatives)
            else:
                negative_text_rows = hardest_negatives(similarity)
                negative_image_rows = hardest_negatives(similarity.t())
            # Pairs: positives, (image i, negative text + its explanation), (negative image, text i + explanation i).
            image_rows = torch.cat([arange, arange, negative_image_rows])
            text_rows = torch.cat([arange, negative_text_rows, arange])
        else:
            image_rows, text_rows = arange, arange
        expert_text_embeds = F.normalize(
            self._gated_embedding(
                self.text_gate, text, text_expert_outputs, shared_text_outputs, has_explanation
            ).float(),
            dim=-1,
        )
        candidate_logits = None
        if compute_losses and config.expert_loss_reads_candidate_explanation and shared_keys is not None:
            # Variant: the image side reads every candidate text's explanation; GI-ITM's pairs are among them.
            candidate_logits, all_pair_outputs = candidate_explanation_expert_logits(
                self.shared_experts, self.image_gate, image, vision_expert_outputs, shared_keys, has_explanation,
                expert_text_embeds, self.clip.logit_scale,
            )  # fmt: skip
            shared_image_outputs = all_pair_outputs[image_rows * batch_size + text_rows]
        elif shared_keys is not None:
            shared_image_outputs = self._run_experts(
                self.shared_experts, image, shared_keys, query_rows=image_rows, key_rows=text_rows
            )
        else:
            shared_image_outputs = None

        positive_shared_image = shared_image_outputs[:batch_size] if shared_image_outputs is not None else None
        expert_image_embeds = F.normalize(
            self._gated_embedding(
                self.image_gate, image, vision_expert_outputs, positive_shared_image, has_explanation
            ).float(),
            dim=-1,
        )
        itm_logits = self._itm_logits(
            image,
            text,
            vision_expert_outputs,
            text_expert_outputs,
            shared_text_outputs,
            shared_image_outputs,
            image_rows,
            text_rows,
            has_explanation,
            explanation,
        )
        itm_labels = torch.full((len(image_rows),), ITM_NO_MATCH, dtype=torch.long, device=itm_logits.device)
        itm_labels[:batch_size] = ITM_MATCH

        loss = clip_loss = expert_loss = matching_loss = explanation_loss = None
        if compute_losses:
            clip_loss, _ = contrastive_loss(image_embeds, text_embeds, logit_scale)
            if candidate_logits is not None:
                expert_loss = pairwise_contrastive_loss(candidate_logits)
            else:
                expert_loss, _ = contrastive_loss(expert_image_embeds, expert_text_embeds, logit_scale)
            matching_loss = itm_loss(itm_logits, itm_labels)
            loss = clip_loss + config.beta * expert_loss + config.gamma * matching_loss
            if config.explanation_contrastive_weight > 0:
                explanation_loss, _ = contrastive_loss(image_embeds, fused_texts, logit_scale)
                loss = loss + config.explanation_contrastive_weight * explanation_loss

        return EntityCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            # contiguous: an aliased output trips torch.compile's AOTAutograd cache (torch 2.13); B x B is cheap.
            logits_per_text=logits_per_image.t().contiguous(),
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            contrastive_loss=clip_loss,
            expert_contrastive_loss=expert_loss,
            itm_loss=matching_loss,
            expert_image_embeds=expert_image_embeds,
            expert_text_embeds=expert_text_embeds,
            itm_logits=itm_logits,
            itm_labels=itm_labels,
            explanation_contrastive_loss=explanation_loss,
        )

    def match_probability(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        explanation_input_ids: torch.LongTensor | None = None,
        explanation_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """GI-ITM probability [N] that image i and text i (with its optional explanation) match: a reranking score."""
        check_model_inputs(
            self.config,
            input_ids,
            attention_mask,
            pixel_values,
            explanation_input_ids,
            explanation_attention_mask,
            paired=True,
        )
        output = self._paired_forward(
            input_ids,
            pixel_values,
            attention_mask,
            None,
            explanation_input_ids,
            explanation_attention_mask,
            False,
            compute_losses=False,
        )
        return output.itm_logits.float().softmax(dim=-1)[:, ITM_MATCH]

    # ------------------------------------------------------------------ loading and export
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load an EntityCLIP checkpoint; given a plain CLIP checkpoint, start EntityCLIP from it (`from_clip_pretrained`)."""
        if pretrained_model_name_or_path is not None and kwargs.get("config") is None and not model_args:
            hub_kwargs = {
                key: kwargs[key]
                for key in ("cache_dir", "local_files_only", "revision", "token", "subfolder", "force_download")
                if key in kwargs
            }
            config_dict = read_config_dict(pretrained_model_name_or_path, hub_kwargs)
            if config_dict.get("model_type") == "clip":
                return cls.from_clip_pretrained(pretrained_model_name_or_path, **kwargs)
        return load_or_name_the_file(
            lambda: super(EntityCLIPModel, cls).from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs),
            pretrained_model_name_or_path,
        )

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
        config_dict = read_config_dict(pretrained_model_name_or_path, hub_kwargs)
        if config_dict.get("model_type") != "clip":
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {config_dict.get('model_type')!r} model, not a CLIP "
                "checkpoint; load EntityCLIP checkpoints with EntityCLIPModel.from_pretrained."
            )
        clip_config = CLIPConfig.from_dict(config_dict)
        config = EntityCLIPConfig(clip_config=clip_config, **entity_kwargs)
        model, loading_info = load_or_name_the_file(
            lambda: super(EntityCLIPModel, cls).from_pretrained(
                pretrained_model_name_or_path, config=config, output_loading_info=True, **kwargs
            ),
            pretrained_model_name_or_path,
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

    def save_clip_pretrained(self, save_directory: str | os.PathLike, processor=None, **kwargs) -> None:
        """Write the fine-tuned CLIP as a plain `CLIPModel` folder (and `CLIPProcessor` files, given a processor).

        `CLIPModel.from_pretrained(save_directory)` then gives exactly this model's `get_*_features` and CLIP
        `forward`; pipelines, sentence-transformers and ONNX exporters take the folder as any CLIP. The experts, gates
        and ITM head are training-time layers and are left out. `kwargs` go to `CLIPModel.save_pretrained`
        (`safe_serialization`, `max_shard_size`, `push_to_hub`, ...).
        """
        self.clip.save_pretrained(save_directory, **kwargs)
        if processor is not None:
            CLIPProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer).save_pretrained(
                save_directory
            )


__all__ = ["EntityCLIPModel", "EntityCLIPOutput", "EntityCLIPPreTrainedModel"]
