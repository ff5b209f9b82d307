"""transformers' Trainer on EntityCLIP: the loss is found, logit_scale is clamped, evaluation is deterministic, R@K."""

import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel
from entityclip_hf.data import lazy_images, load_entity_dataset, make_demo_dataset
from entityclip_hf.metrics import retrieval_metrics
from entityclip_hf.trainer import LogitScaleClampCallback, compute_retrieval_metrics, trainer_collator


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = make_demo_dataset(tmp_path_factory.mktemp("trainer") / "demo", num_entities=6, captions_per_entity=4)
    return lazy_images(load_entity_dataset("demo", root))


def make_trainer(model, processor, demo, output_dir, **overrides):
    arguments = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=6,
        per_device_eval_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        remove_unused_columns=False,  # the rows are raw (image, text, explanation): the collator builds the inputs
        use_cpu=True,
        bf16=True,
        activation_checkpointing=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=0,
    )
    arguments.update(overrides)
    return Trainer(
        model=model,
        args=TrainingArguments(**arguments),
        train_dataset=demo["train"],
        eval_dataset=demo["validation"],
        data_collator=trainer_collator(processor),
        callbacks=[LogitScaleClampCallback()],
        compute_metrics=compute_retrieval_metrics,
    )


def test_trainer_trains_clamps_and_evaluates_deterministically(tiny_processor, tiny_clip_config, demo, tmp_path):
    torch.manual_seed(0)
    model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config))
    with torch.no_grad():
        model.clip.logit_scale.fill_(10.0)  # above log(100): the callback must bring it back after the first step
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = make_trainer(model, tiny_processor, demo, tmp_path)

    result = trainer.train()
    assert math.isfinite(result.training_loss) and result.global_step == 3
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert model.clip.logit_scale.item() <= model.config.logit_scale_max + 1e-6
    changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())]
    assert any(name.startswith("clip.") for name in changed) and any(name.startswith("itm_head") for name in changed)
    assert model.clip.text_model.encoder.gradient_checkpointing

    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_loss"] == second["eval_loss"] and math.isfinite(first["eval_loss"])
    assert first["eval_rsum"] == second["eval_rsum"]
    assert {"eval_i2t_R@1", "eval_t2i_R@5", "eval_i2t_median_rank"} <= set(first)


def test_predict_returns_the_splits_embeddings_and_metrics_match_the_package_metric(
    tiny_processor, tiny_clip_config, demo, tmp_path
):
    torch.manual_seed(0)
    model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config))
    trainer = make_trainer(model, tiny_processor, demo, tmp_path, bf16=False, activation_checkpointing=False)
    prediction = trainer.predict(demo["validation"])
    text_embeds, image_embeds = prediction.predictions
    num_rows = len(demo["validation"])
    assert text_embeds.shape == image_embeds.shape == (num_rows, model.config.projection_dim)
    # The embeddings are CLIP's of each row, in dataset order (not per-batch B x B logits).
    batch = trainer_collator(tiny_processor)([demo["validation"][index] for index in range(num_rows)])
    model.eval()
    with torch.no_grad():
        expected = model.get_image_features(batch["pixel_values"]).pooler_output
    torch.testing.assert_close(
        torch.as_tensor(image_embeds), torch.nn.functional.normalize(expected, dim=-1), rtol=1e-4, atol=1e-5
    )
    metrics = {key.removeprefix("test_"): value for key, value in prediction.metrics.items()}
    reference = retrieval_metrics(torch.as_tensor(image_embeds), torch.as_tensor(text_embeds))
    assert metrics["rsum"] == pytest.approx(reference["rsum"])
