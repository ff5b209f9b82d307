"""Batching: the collator and the with_transform path turn dataset rows into model inputs; bad rows never kill."""

import logging

import pytest
import torch
from torch.utils.data import DataLoader

from entityclip_hf.data import EntityCLIPCollator, lazy_images, load_entity_dataset, make_demo_dataset, make_transform

KEYS = {"pixel_values", "input_ids", "attention_mask", "explanation_input_ids", "explanation_attention_mask"}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_dataset(
        tmp_path_factory.mktemp("collator") / "demo", num_entities=8, captions_per_entity=4, image_size=32
    )


@pytest.fixture
def train(demo_root):
    return load_entity_dataset("demo", demo_root, splits=["train"])["train"]


def test_collator_builds_model_inputs_from_decoded_and_lazy_rows(train, tiny_processor):
    collator = EntityCLIPCollator(tiny_processor)
    rows = [train[index] for index in range(4)]
    rows[1] = {**rows[1], "explanation": None}
    batch = collator(rows)
    assert set(batch) == KEYS
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 4 and batch["attention_mask"].shape == batch["input_ids"].shape
    masks = batch["explanation_attention_mask"]
    assert masks[1].sum() == 0 and all(masks[index].sum() > 0 for index in (0, 2, 3))
    # Undecoded rows (paths) give the same inputs: decoding moved into the collator.
    lazy = lazy_images(train)
    lazy_rows = [lazy[index] for index in range(4)]
    assert isinstance(lazy_rows[0]["image"], dict) and lazy_rows[0]["image"]["path"].endswith(".jpg")
    lazy_rows[1] = {**lazy_rows[1], "explanation": None}
    lazy_batch = collator(lazy_rows)
    for key in KEYS:
        assert torch.equal(batch[key], lazy_batch[key]), key


def test_rows_without_an_explanation_column_get_empty_explanation_masks(train, tiny_processor):
    rows = [train.remove_columns("explanation")[index] for index in range(3)]
    batch = EntityCLIPCollator(tiny_processor, return_ids=True)(rows)
    assert set(batch) == KEYS | {"ids"}
    assert batch["ids"] == [row["id"] for row in rows]
    assert batch["explanation_attention_mask"].sum() == 0


def test_a_bad_image_is_replaced_and_the_batch_keeps_its_size(train, tiny_processor, tmp_path, caplog):
    lazy = lazy_images(train)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    collator = EntityCLIPCollator(tiny_processor, return_ids=True)
    first_rows = [lazy[index] for index in range(4)]
    first = collator(first_rows)
    second_rows = [lazy[index] for index in range(4, 8)]
    bad_id = second_rows[2]["id"]
    second_rows[2] = {**second_rows[2], "image": {"path": str(broken), "bytes": None}}
    with caplog.at_level(logging.WARNING, logger="entityclip_hf.data"):
        second = collator(second_rows)
    assert second["pixel_values"].shape[0] == 4
    assert bad_id not in second["ids"]
    # The stand-in is a good row of the previous batch, not a copy of a row already in this batch.
    stand_in = second["ids"][-1]
    assert stand_in in first["ids"] and len(set(second["ids"])) == 4
    assert bad_id in caplog.text and "cannot decode" in caplog.text


def test_first_batch_without_reserve_repeats_a_good_row(train, tiny_processor):
    rows = [lazy_images(train)[index] for index in range(3)]
    rows[0] = {**rows[0], "text": "   "}
    batch = EntityCLIPCollator(tiny_processor, return_ids=True)(rows)
    assert batch["pixel_values"].shape[0] == 3
    assert batch["ids"] == [rows[1]["id"], rows[2]["id"], rows[1]["id"]]


def test_drop_and_raise_policies_and_an_all_bad_batch(train, tiny_processor, tmp_path):
    rows = [lazy_images(train)[index] for index in range(3)]
    missing = {"path": str(tmp_path / "gone.jpg"), "bytes": None}
    rows[1] = {**rows[1], "image": missing}
    dropped = EntityCLIPCollator(tiny_processor, on_bad_row="drop", return_ids=True)(rows)
    assert dropped["ids"] == [rows[0]["id"], rows[2]["id"]]
    with pytest.raises(ValueError, match=rf"{rows[1]['id']}: 'image': cannot decode"):
        EntityCLIPCollator(tiny_processor, on_bad_row="raise")(rows)
    all_bad = [{**row, "image": missing} for row in rows]
    with pytest.raises(ValueError, match="every row of the batch is bad"):
        EntityCLIPCollator(tiny_processor)(all_bad)
    with pytest.raises(ValueError, match="on_bad_row"):
        EntityCLIPCollator(tiny_processor, on_bad_row="ignore")


def test_with_transform_processes_on_the_fly(train, tiny_processor):
    dataset = lazy_images(train).with_transform(make_transform(tiny_processor))
    batch = dataset[0:5]
    assert set(batch) == KEYS and batch["pixel_values"].shape == (5, 3, 32, 32)
    single = dataset[0]
    assert single["pixel_values"].shape == (3, 32, 32)
    # A DataLoader hands each batch of indices to the transform at once (padding per batch), then stacks.
    loader = DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == 4 and all(set(b) == KEYS for b in batches)
    assert batches[0]["pixel_values"].shape == (4, 3, 32, 32)
    assert batches[0]["input_ids"].shape == batches[0]["attention_mask"].shape


def test_collator_in_dataloader_workers_feeds_the_model(train, tiny_processor, tiny_clip_config):
    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

    loader = DataLoader(lazy_images(train), batch_size=8, num_workers=1, collate_fn=EntityCLIPCollator(tiny_processor))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    torch.manual_seed(0)
    model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config))
    output = model(**batch, return_loss=True)
    assert torch.isfinite(output.loss)
    assert output.logits_per_image.shape == (8, 8)
