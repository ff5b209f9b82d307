# Copyright 2026 The entityclip-hf authors. Licensed under the Apache License, Version 2.0.
"""EntityCLIP configuration: a CLIP backbone plus the Multimodal Attentive Experts and GI-ITM hyper-parameters."""

import math

from transformers import CLIPConfig, PreTrainedConfig


class EntityCLIPConfig(PreTrainedConfig):
    r"""
    Configuration of an [`EntityCLIPModel`]: a nested [`CLIPConfig`] for the backbone and the EntityCLIP heads.

    Defaults follow the paper (arXiv 2410.17810) and its released code.

    Args:
        clip_config (`CLIPConfig` or `dict`, *optional*):
            The CLIP backbone. The experts work at its `projection_dim`.
        num_vision_experts (`int`, defaults to 4):
            Experts that self-attend over the image tokens and read out the CLS token.
        num_text_experts (`int`, defaults to 4):
            Experts that self-attend over the text tokens and read out the end-of-text token.
        num_shared_experts (`int`, defaults to 4):
            Experts shared by both sides that cross-attend from image (CLS) or text (EOT) to the explanation tokens.
        expert_num_heads (`int`, defaults to 1):
            Attention heads per expert; must divide `clip_config.projection_dim`.
        expert_mlp_ratio (`float`, defaults to 4.0):
            Width of each expert's MLP relative to `projection_dim`.
        beta (`float`, defaults to 0.1):
            Weight of the contrastive loss between the gated expert embeddings.
        gamma (`float`, defaults to 0.1):
            Weight of the gated integrative image-text matching (GI-ITM) loss.
        use_hard_negatives (`bool`, defaults to `True`):
            Draw ITM negatives from the softmax of the in-batch similarity (ALBEF style); uniformly at random otherwise.
        logit_scale_max (`float`, defaults to `log(100)`):
            Upper bound applied to CLIP's `logit_scale` by [`EntityCLIPModel.clamp_logit_scale`].
        initializer_range (`float`, defaults to 0.02):
            Standard deviation for the gates and the ITM head.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the experts' layer norms.
        explanation_encoder_gradient (`bool`, defaults to `True`):
            Backpropagate through CLIP's text encoder on the explanation pass, as the paper does. `False` (opt-in,
            cheaper) encodes explanations without a gradient: the experts still learn from the explanation tokens,
            but the text encoder learns only from the texts, which saves that pass's backward and its activations
            (ViT-B/32, batch 32: 0.788x the paper's training-step FLOPs, `bench/bench_training_step.py --variant-flops`;
            0.80x its peak memory at batch 16). It costs explanation-aware retrieval accuracy: with
            `explanation_contrastive_weight=1` and explanation queries, -3.9 R@1 on seen and -14.5 on unseen entities
            of the efficacy benchmark (bench/README.md).

    Variants that carry explanations into what retrieval uses (opt-in; the defaults are the paper's; measured
    effect and cost in `bench/README.md`):

        explanation_contrastive_weight (`float`, defaults to 0.0):
            Weight of an extra contrastive loss between the CLIP image embedding and the explanation-aware text
            embedding `normalize((1 - w) t + w e)` (`w` = `explanation_fusion_weight`, `e` the explanation's CLIP
            embedding; a text without explanation keeps `t`): it trains what explanation-aware retrieval
            (`entityclip_hf.retrieval.fuse_explanation_embeddings`) scores. No extra encoder pass.
        explanation_fusion_weight (`float`, defaults to 0.5):
            The `w` of that training term, in [0, 1].
        expert_loss_reads_candidate_explanation (`bool`, defaults to `False`):
            Leak-free expert contrastive loss: the image side's shared experts read the CANDIDATE text's
            explanation for every (image, text) pair of the batch (one read-out token per pair), so an image's
            expert embedding cannot be matched to its text by reading the same explanation on both sides.
        itm_cross_attention (`bool`, defaults to `False`):
            GI-ITM learns image-text interaction: the text's end-of-text token (plus its explanation's) attends to
            every image token in a cross-attention block (as BLIP's ITM), whose output is added to the gated expert
            fusion before `itm_head`.
        itm_negatives_from_fused_texts (`bool`, defaults to `False`):
            GI-ITM's in-batch hard negatives are mined from the similarity of images to explanation-aware texts
            `normalize((1 - w) t + w e)` (`w` = `explanation_fusion_weight`) instead of to the texts alone: the
            candidates that explanation-aware retrieval puts in the top k, which the head then reranks.
    """

    model_type = "entityclip"
    sub_configs_defaults = {"clip_config": CLIPConfig}
    # What transformers' Trainer leaves out of predictions: everything but the CLIP embeddings, so that
    # `Trainer.predict` / `compute_metrics` receive (text_embeds, image_embeds) for the whole split (R@K), not
    # per-batch B x B logits that cannot be concatenated.
    keys_to_ignore_at_inference = [
        "logits_per_image",
        "logits_per_text",
        "text_model_output",
        "vision_model_output",
        "contrastive_loss",
        "expert_contrastive_loss",
        "itm_loss",
        "expert_image_embeds",
        "expert_text_embeds",
        "itm_logits",
        "itm_labels",
        "explanation_contrastive_loss",
    ]

    clip_config: dict | CLIPConfig | None = None
    num_vision_experts: int = 4
    num_text_experts: int = 4
    num_shared_experts: int = 4
    expert_num_heads: int = 1
    expert_mlp_ratio: float = 4.0
    beta: float = 0.1
    gamma: float = 0.1
    use_hard_negatives: bool = True
    logit_scale_max: float = math.log(100.0)
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    explanation_contrastive_weight: float = 0.0
    explanation_fusion_weight: float = 0.5
    expert_loss_reads_candidate_explanation: bool = False
    itm_cross_attention: bool = False
    itm_negatives_from_fused_texts: bool = False
    explanation_encoder_gradient: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_entityclip()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Build from a saved config; a plain CLIP config (model_type "clip") becomes the `clip_config` of one."""
        if config_dict.get("model_type") == "clip":
            config_dict = {"clip_config": dict(config_dict)}
        elif "clip_config" not in config_dict:
            raise ValueError(
                "This EntityCLIP config has no `clip_config` (the CLIP backbone's shapes): the config.json is "
                "incomplete or not an EntityCLIP one. Keys found: " + ", ".join(sorted(config_dict)[:12])
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def projection_dim(self) -> int:
        """Width of CLIP's joint embedding space, where the experts work (`clip_config.projection_dim`)."""
        return self.clip_config.projection_dim

    @property
    def text_config(self):
        """CLIP's text tower config (what `get_text_config()` returns, as for `CLIPConfig`)."""
        return self.clip_config.text_config

    @property
    def vision_config(self):
        """CLIP's vision tower config."""
        return self.clip_config.vision_config

    @property
    def num_image_side_experts(self) -> int:
        return self.num_vision_experts + self.num_shared_experts

    @property
    def num_text_side_experts(self) -> int:
        return self.num_text_experts + self.num_shared_experts

    def validate_entityclip(self):
        """Reject hyper-parameters that would build a broken model, naming the field at fault."""
        counts = {
            "num_vision_experts": self.num_vision_experts,
            "num_text_experts": self.num_text_experts,
            "num_shared_experts": self.num_shared_experts,
        }
        for name, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        if sum(counts.values()) == 0:
            raise ValueError("EntityCLIP needs at least one expert: all of " + ", ".join(counts) + " are 0.")
        if self.num_image_side_experts == 0 or self.num_text_side_experts == 0:
            raise ValueError(
                "Both sides need an expert: set `num_shared_experts` > 0, or both `num_vision_experts` and "
                f"`num_text_experts` > 0 (got vision={self.num_vision_experts}, text={self.num_text_experts}, "
                f"shared={self.num_shared_experts})."
            )
        if not isinstance(self.expert_num_heads, int) or self.expert_num_heads < 1:
            raise ValueError(f"`expert_num_heads` must be a positive integer, got {self.expert_num_heads!r}.")
        if self.projection_dim % self.expert_num_heads != 0:
            raise ValueError(
                f"`expert_num_heads` ({self.expert_num_heads}) must divide the CLIP projection_dim "
                f"({self.projection_dim})."
            )
        if not self.expert_mlp_ratio > 0 or int(self.projection_dim * self.expert_mlp_ratio) < 1:
            raise ValueError(f"`expert_mlp_ratio` must be positive, got {self.expert_mlp_ratio!r}.")
        for name in ("beta", "gamma", "explanation_contrastive_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` (a loss weight) must be a finite number >= 0, got {value!r}.")
        weight = self.explanation_fusion_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise ValueError(f"`explanation_fusion_weight` must be a number in [0, 1], got {weight!r}.")
        for name in ("expert_loss_reads_candidate_explanation", "itm_cross_attention", "itm_negatives_from_fused_texts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        if not math.isfinite(self.logit_scale_max) or self.logit_scale_max <= 0:
            raise ValueError(f"`logit_scale_max` must be a positive finite number, got {self.logit_scale_max!r}.")
        if not isinstance(self.explanation_encoder_gradient, bool):
            raise ValueError(
                f"`explanation_encoder_gradient` must be True or False, got {self.explanation_encoder_gradient!r}."
            )
        if not self.initializer_range > 0:
            raise ValueError(f"`initializer_range` must be positive, got {self.initializer_range!r}.")


__all__ = ["EntityCLIPConfig"]
