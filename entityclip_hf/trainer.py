"""What transformers' `Trainer` needs to train and evaluate EntityCLIP: a collator, a callback and R@K metrics.

`examples/finetune.py` (Accelerate) is the main training path; this is the path for users who already run `Trainer`:

    from transformers import Trainer, TrainingArguments
    from entityclip_hf.trainer import LogitScaleClampCallback, compute_retrieval_metrics, trainer_collator

    args = TrainingArguments("out", remove_unused_columns=False, ...)   # the rows are raw: image, text, explanation
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=lazy_images(dataset["train"]),
        eval_dataset=lazy_images(dataset["validation"]),
        data_collator=trainer_collator(processor),          # model inputs + return_loss=True
        callbacks=[LogitScaleClampCallback()],               # clamp logit_scale after each optimizer step
        compute_metrics=compute_retrieval_metrics,           # R@1/5/10, median rank, rsum over the whole split
    )

How each piece fits Trainer:
- Trainer finds a loss when the batch asks for one: the collator adds `return_loss=True` (the model's default is
  CLIP's, no loss), and evaluation computes the same paired loss, deterministic in eval mode.
- `remove_unused_columns=False`: the dataset rows (`image`, `text`, `explanation`) are not forward arguments; the
  collator turns them into `input_ids`, `pixel_values`, ... .
- Predictions: `EntityCLIPConfig.keys_to_ignore_at_inference` leaves only `(text_embeds, image_embeds)`, which
  Trainer concatenates over the split; row i of both is a matching pair (the eval loader keeps dataset order), so
  `compute_retrieval_metrics` needs no labels.
"""

from __future__ import annotations

import torch
from transformers import EvalPrediction, TrainerCallback

from .data.collator import EntityCLIPCollator
from .metrics import retrieval_metrics


class LogitScaleClampCallback(TrainerCallback):
    """Clamp CLIP's `logit_scale` to [0, config.logit_scale_max] after every optimizer step (as CLIP trains)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = getattr(model, "module", model)  # DDP / DataParallel wrap the model
        if model is not None and hasattr(model, "clamp_logit_scale"):
            model.clamp_logit_scale()
        return control


class TrainerCollator:
    """An `EntityCLIPCollator` whose batches also carry `return_loss=True`, so that Trainer finds the loss."""

    def __init__(self, collator: EntityCLIPCollator):
        self.collator = collator

    def __call__(self, rows):
        batch = dict(self.collator(rows))
        batch.pop("ids", None)
        batch["return_loss"] = True
        return batch


def trainer_collator(processor, **collator_kwargs) -> TrainerCollator:
    """The `data_collator` for Trainer: `EntityCLIPCollator(processor, **collator_kwargs)` plus `return_loss=True`."""
    return TrainerCollator(EntityCLIPCollator(processor, **collator_kwargs))


def compute_retrieval_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
    """Trainer's `compute_metrics`: retrieval R@K / ranks / rsum from the split's (text_embeds, image_embeds)."""
    predictions = eval_prediction.predictions
    if not isinstance(predictions, (tuple, list)) or len(predictions) != 2:
        raise ValueError(
            "compute_retrieval_metrics expects predictions (text_embeds, image_embeds), got "
            f"{type(predictions).__name__} of length {len(predictions) if hasattr(predictions, '__len__') else '?'}: "
            "keep EntityCLIPConfig.keys_to_ignore_at_inference (or pass the same ignore_keys to evaluate/predict)."
        )
    text_embeds, image_embeds = (torch.as_tensor(values).float() for values in predictions)
    return retrieval_metrics(image_embeds, text_embeds)


__all__ = ["LogitScaleClampCallback", "TrainerCollator", "compute_retrieval_metrics", "trainer_collator"]
