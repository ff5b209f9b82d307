"""The efficacy benchmark's data: generic stage-1 captions name nothing; unseen entities never reach training."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def efficacy_data():
    sys.path.insert(0, str(BENCH))
    try:
        import efficacy_data

        yield efficacy_data
    finally:
        sys.path.remove(str(BENCH))


def test_generic_captions_describe_attributes_and_name_no_entity(efficacy_data):
    from entityclip_hf.data import demo

    names = [*demo.PERSON_FIRST, *demo.PERSON_LAST, *demo.PLACE_NAMES, *demo.ORG_FIRST, *demo.EVENT_FIRST]
    scenes = list(efficacy_data.generic_scenes(24, seed=3))
    assert [caption for _, caption in scenes] == [c for _, c in efficacy_data.generic_scenes(24, seed=3)], "seeded"
    for image, caption in scenes:
        assert image.size == (64, 64)
        assert not any(name.lower() in caption.lower() for name in names), caption
        assert any(colour in caption for colour in demo.COLOURS), caption


def test_conditions_keep_unseen_entities_out_of_training(efficacy_data, tmp_path):
    spec = efficacy_data.EntitySplitSpec(num_entities=12, num_unseen_val=2, num_unseen_test=2, captions_per_entity=8)
    info = efficacy_data.write_entity_conditions(tmp_path, spec)
    assert efficacy_data.write_entity_conditions(tmp_path, spec) == info, "cached"
    unseen = set(info["unseen_val_entities"]) | set(info["unseen_test_entities"])
    assert not unseen & set(info["seen_entities"])
    train = efficacy_data.read_jsonl(tmp_path / "main" / "train.jsonl")
    assert train and all(not set(row["entities"].split("; ")) & unseen for row in train)
    for folder, entities in (("unseen_val", "unseen_val_entities"), ("unseen_test", "unseen_test_entities")):
        rows = efficacy_data.read_jsonl(tmp_path / folder / "test.jsonl")
        assert rows and {row["entity"] for row in rows} == set(info[entities])
        assert all(row["explanation"] for row in rows)
    texts = efficacy_data.all_entity_texts(tmp_path)
    assert any("jacket" in text for text in texts), "explanations are part of the tokenizer corpus"
