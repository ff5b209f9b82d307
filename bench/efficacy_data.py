"""Data of the efficacy benchmark: generic captioned scenes for stage 1, made-up entities for stage 2.

Both stages draw with `entityclip_hf.data.demo` (its attribute vocabularies and `draw_scene`), so the attribute
words that stage 1's generic captions ground in pixels are the words stage 2's explanations use.

- Stage 1 (`generic_scenes`): random looks, drawn; each caption describes what is drawn in words ("a person in a
  teal jacket, with blond hair and round glasses, in front of a skyline of grey buildings..."), never a name.
- Stage 2 (`write_entity_conditions`): the demo dataset (`make_demo_dataset`: made-up entities with a fixed look,
  news captions that only NAME them, explanations describing their look), re-split into conditions:
    main/            train.jsonl (seen entities only), val.jsonl (validation, seen), test.jsonl (test, seen)
    unseen_val/      test.jsonl: captions of entities never in training (validation of the unseen condition)
    unseen_test/     test.jsonl: captions of other entities never in training (test of the unseen condition)
  A training row naming an unseen entity (as a companion) is left out, so unseen entities never reach training.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from entityclip_hf.data import demo
from entityclip_hf.data.demo import DemoEntity, demo_entities, draw_scene, make_demo_dataset

KINDS = demo.KINDS
CONDITION_FOLDERS = ("main", "unseen_val", "unseen_test")


# ----------------------------------------------------------------------------------------------------- stage 1
def random_entity(kind: str, rng: random.Random) -> DemoEntity:
    """An anonymous entity of `kind` with a look drawn uniformly from the demo's attribute vocabularies."""
    if kind == "person":
        look = {
            "jacket": rng.choice(demo.JACKETS),
            "hair": rng.choice(tuple(demo.HAIR_COLOURS)),
            "accessory": rng.choice(demo.ACCESSORIES),
            "backdrop": rng.choice(demo.BACKDROPS),
        }
    elif kind == "place":
        sky = rng.choice(demo.SKIES)
        look = {
            "sky": sky,
            "buildings": rng.choice([b for b in demo.BUILDINGS if b != sky]),
            "landmark": rng.choice(demo.LANDMARKS),
            "landmark_colour": rng.choice(demo.LANDMARK_COLOURS),
        }
    elif kind == "organisation":
        colour = rng.choice(demo.LOGO_COLOURS)
        look = {
            "shape": rng.choice(demo.SHAPES),
            "logo_colour": colour,
            "field": rng.choice([f for f in demo.FIELDS if f != colour]),
        }
    else:
        look = {
            "stage": rng.choice(demo.STAGES),
            "decoration": rng.choice(demo.DECORATIONS),
            "decoration_colour": rng.choice(demo.DECORATION_COLOURS),
        }
    return DemoEntity(name="", kind=kind, role="", look=look, description="")


def describe(entity: DemoEntity, rng: random.Random, main: bool) -> str:
    """A generic phrase for what is drawn of `entity`: its attributes in words, in one of a few phrasings."""
    look = entity.look
    if entity.kind == "person":
        jacket, hair, accessory = look["jacket"], look["hair"], look["accessory"]
        phrase = rng.choice(
            (
                f"a person in a {jacket} jacket, with {hair} hair and {accessory}",
                f"someone with {hair} hair and {accessory}, wearing a {jacket} jacket",
                f"a person pictured in a {jacket} jacket with {hair} hair and {accessory}",
            )
        )
        if main and rng.random() < 0.5:
            phrase += f" before a {look['backdrop']} backdrop"
        return phrase
    if entity.kind == "place":
        sky, buildings = look["sky"], look["buildings"]
        landmark = f"a {look['landmark_colour']} {look['landmark']}"
        return rng.choice(
            (
                f"a skyline of {buildings} buildings and {landmark} under a {sky} sky",
                f"{buildings} buildings and {landmark} under a {sky} sky",
                f"{landmark} above {buildings} buildings, {sky} sky",
            )
        )
    if entity.kind == "organisation":
        logo = f"a {look['logo_colour']} {look['shape']} on a {look['field']} background"
        return rng.choice((f"a logo of {logo}", f"a badge showing {logo}"))
    stage, decoration = look["stage"], f"{look['decoration_colour']} {look['decoration']}"
    return rng.choice((f"a {stage} stage hung with {decoration}", f"{decoration} over a {stage} stage"))


def generic_caption(named: list[DemoEntity], rng: random.Random) -> str:
    main, *others = named
    parts = [describe(main, rng, main=True)]
    parts += [rng.choice(("with", "and", "next to")) + " " + describe(other, rng, main=False) for other in others]
    return rng.choice(("", "a photo of ", "a picture of ")) + ", ".join(parts) + "."


def jpeg_round_trip(image: Image.Image) -> Image.Image:
    # Stage 2 reads JPEG files: stage 1 sees the same compression.
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def generic_scenes(count: int, seed: int, image_size: int = 64):
    """Yield `count` (image, caption) pairs: a main entity of a random kind, half the time with a companion of
    another kind, as the demo's scenes are composed."""
    rng = random.Random(seed)
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        named = [random_entity(kind, rng)]
        if rng.random() < 0.6:
            named.append(random_entity(rng.choice([k for k in KINDS if k != kind]), rng))
        image = jpeg_round_trip(draw_scene(named, image_size, random.Random(f"{seed}/{index}")))
        yield image, generic_caption(named, rng)


# ----------------------------------------------------------------------------------------------------- stage 2
@dataclass(frozen=True)
class EntitySplitSpec:
    num_entities: int = 64
    num_unseen_val: int = 12
    num_unseen_test: int = 12
    captions_per_entity: int = 32
    seed: int = 0

    @property
    def num_seen(self) -> int:
        return self.num_entities - self.num_unseen_val - self.num_unseen_test


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_entity_conditions(root: str | Path, spec: EntitySplitSpec = EntitySplitSpec()) -> dict:
    """Build the demo dataset under `root/demo` and the condition folders beside it; returns their row counts.

    Entities are taken in the demo's order (the four kinds in turn): the last `num_unseen_test` are the unseen test
    entities, the `num_unseen_val` before them the unseen validation entities, the rest are seen (trained on).
    """
    root = Path(root)
    info_path = root / "conditions.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info["spec"] == spec.__dict__:
            return info
        raise FileExistsError(f"{root} holds conditions made with {info['spec']}, not {spec.__dict__}")
    source = make_demo_dataset(
        root / "demo", num_entities=spec.num_entities, captions_per_entity=spec.captions_per_entity, seed=spec.seed
    )
    entities = [entity.name for entity in demo_entities(spec.num_entities, spec.seed)]
    seen = set(entities[: spec.num_seen])
    unseen_val = set(entities[spec.num_seen : spec.num_seen + spec.num_unseen_val])
    unseen_test = set(entities[spec.num_seen + spec.num_unseen_val :])

    def rows_of(split: str) -> list[dict]:
        explanations = json.loads((source / f"CapDsc_mistral_{split}.json").read_text())
        rows = read_jsonl(source / f"{split}.jsonl")
        for row in rows:
            row["explanation"] = explanations[Path(row["image"]).name]
            row["image"] = str((source / row["image"]).resolve())
        return rows

    everything = rows_of("train") + rows_of("val") + rows_of("test")
    by_split = {"train": rows_of("train"), "val": rows_of("val"), "test": rows_of("test")}

    def all_seen(row) -> bool:
        return all(name in seen for name in row["entities"].split("; "))

    conditions = {
        "main/train.jsonl": [r for r in by_split["train"] if all_seen(r)],
        "main/val.jsonl": [r for r in by_split["val"] if all_seen(r)],
        "main/test.jsonl": [r for r in by_split["test"] if all_seen(r)],
        "unseen_val/test.jsonl": [r for r in everything if r["entity"] in unseen_val],
        "unseen_test/test.jsonl": [r for r in everything if r["entity"] in unseen_test],
    }
    for name, rows in conditions.items():
        _write_rows(root / name, rows)
    info = {
        "spec": spec.__dict__,
        "rows": {name: len(rows) for name, rows in conditions.items()},
        "seen_entities": sorted(seen),
        "unseen_val_entities": sorted(unseen_val),
        "unseen_test_entities": sorted(unseen_test),
    }
    info_path.write_text(json.dumps(info, indent=1))  # written last: the folder is complete
    return info


def all_entity_texts(root: str | Path) -> list[str]:
    """Every caption and explanation of the stage-2 conditions (what the benchmark's tokenizer must cover)."""
    texts = []
    for path in sorted(path for folder in CONDITION_FOLDERS for path in (Path(root) / folder).glob("*.jsonl")):
        for row in read_jsonl(path):
            texts += [row["text"], row["explanation"]]
    return texts
