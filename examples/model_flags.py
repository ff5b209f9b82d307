"""finetune.py's flags that set EntityCLIPConfig fields: the loss weights and the opt-in variants.

Given, a flag overrides the model's own value (a CLIP checkpoint gets the paper's defaults, an EntityCLIP checkpoint
its saved ones); not given (None), the model's value stays.
"""

import argparse

# The EntityCLIPConfig fields these flags set (same names).
MODEL_FIELDS = (
    "beta", "gamma", "explanation_contrastive_weight", "explanation_fusion_weight",
    "expert_loss_reads_candidate_explanation", "itm_cross_attention", "itm_negatives_from_fused_texts",
    "use_hard_negatives", "explanation_encoder_gradient",
)  # fmt: skip


def str2bool(value) -> bool:
    """argparse type of the boolean flags: true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def add_model_field_flags(p: argparse.ArgumentParser) -> None:
    """The flags of MODEL_FIELDS, each defaulting to None (the model's value)."""
    p.add_argument("--beta", type=float, help="weight of the expert contrastive loss (default: the model's, 0.1)")
    p.add_argument("--gamma", type=float, help="weight of the GI-ITM loss (default: the model's, 0.1)")
    # opt-in variants (EntityCLIPConfig fields; default: the model's, i.e. the paper's behaviour)
    p.add_argument(
        "--explanation_contrastive_weight", type=float,
        help="variant: weight of a contrastive loss between images and explanation-aware texts (paper: 0)",
    )  # fmt: skip
    p.add_argument("--explanation_fusion_weight", type=float, help="variant: the explanation's weight in that text")
    p.add_argument(
        "--use_hard_negatives", type=str2bool, nargs="?", const=True,
        help="GI-ITM negatives drawn from the in-batch similarity (paper: true) or uniformly (false)",
    )  # fmt: skip
    p.add_argument(
        "--expert_loss_reads_candidate_explanation", type=str2bool, nargs="?", const=True,
        help="variant: leak-free expert loss, the image side reads each candidate text's explanation (paper: false)",
    )  # fmt: skip
    p.add_argument(
        "--itm_cross_attention", type=str2bool, nargs="?", const=True,
        help="variant: GI-ITM with a text-to-image cross-attention block (paper: false)",
    )  # fmt: skip
    p.add_argument(
        "--itm_negatives_from_fused_texts", type=str2bool, nargs="?", const=True,
        help="variant: GI-ITM negatives mined from the explanation-aware text similarity (paper: the text's)",
    )  # fmt: skip
    p.add_argument(
        "--explanation_encoder_gradient", type=str2bool, nargs="?", const=True,
        help="false (cheaper): explanations encoded without a gradient through the text encoder (paper: true)",
    )  # fmt: skip
