"""A small entity-centric news dataset the repo makes itself: made-up entities, drawn images, explanations.

Each made-up entity (a person, a place, an organisation or an event) has a consistent look: a person always wears
the same jacket colour, hair and accessory; a place always has the same sky, buildings and landmark; an
organisation the same logo; an event the same stage and decorations. Captions are news-style sentences naming one
entity and often a second one; each caption has its own image, drawn from the looks of the entities it names (a
person in front of a place's skyline, wearing nothing of the caption's text) with small deterministic variations.
The explanation of a caption describes the look of its entities, so explanations carry visual information, as
the LLM explanations of the real datasets do.

The files are written in the plain JSON-lines format with explanations in the released format, so that loading
the demo runs the real loading code:

    <root>/train.jsonl, val.jsonl, test.jsonl      {"id", "image", "text", "entity", "topic", "entities"}
    <root>/images/<id>.jpg
    <root>/CapDsc_mistral_{train,val,test}.json     {"<id>.jpg": "<explanation>"}
    <root>/demo_info.json                          the parameters and the entities (written last: "complete")

Each entity's captions are split between train, validation and test, so test captions are new sentences about
entities seen in training (the entity-centric retrieval setting).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance

DEMO_VERSION = "1"
INFO_FILE = "demo_info.json"
KINDS = ("person", "place", "organisation", "event")
SPLIT_FILES = {"train": "train", "validation": "val", "test": "test"}
MAX_CAPTIONS_PER_ENTITY = 40

COLOURS = {
    "red": (200, 40, 40),
    "orange": (235, 130, 30),
    "gold": (215, 175, 40),
    "yellow": (245, 225, 60),
    "green": (50, 150, 60),
    "teal": (30, 140, 140),
    "sky-blue": (110, 180, 235),
    "navy": (25, 40, 110),
    "purple": (120, 50, 160),
    "pink": (235, 130, 180),
    "brown": (120, 75, 40),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "cream": (245, 235, 200),
}
HAIR_COLOURS = {"black": (25, 20, 20), "brown": (110, 70, 40), "blond": (230, 200, 110), "grey": (160, 160, 160)}
SKIN = (225, 185, 150)

PERSON_FIRST = ("Mara", "Tobin", "Ilse", "Dario", "Suki", "Oren", "Livia", "Caspar", "Noor", "Edda", "Felix", "Yara")
PERSON_LAST = ("Voss", "Achterberg", "Quarrington", "Fenwick", "Ambrose", "Baptiste", "Lindqvist", "Okafor", "Halloran")
PERSON_ROLES = (
    "the trade minister",
    "the mayor of the capital",
    "a film director",
    "the central bank governor",
    "an opposition leader",
    "a tennis champion",
    "a union leader",
    "a striker for the national team",
)
PLACE_NAMES = (
    "Elsra",
    "Valdmere",
    "Cindral",
    "Orrinvale",
    "Tessaly",
    "Greyhaven",
    "Marrowick",
    "Ostravel",
    "Quillon",
    "Kelmarsh",
    "Arvane",
    "Thornby",
    "Wyndral",
    "Saltmere",
    "Corvella",
    "Brisk Harbour",
)
PLACE_ROLES = ("a harbour city", "a mountain town", "a river port", "a desert capital", "an island town")
ORG_FIRST = ("Kestrel", "Northwind", "Halcyon", "Veridian", "Copperline", "Solace", "Ironleaf", "Bluewater")
ORG_SECOND = (
    ("Dynamics", "a robotics maker"),
    ("Bank", "a savings bank"),
    ("Health Trust", "a hospital group"),
    ("Rail", "a railway company"),
    ("Records", "a music label"),
    ("Energy", "a power company"),
)
EVENT_FIRST = ("Lumen", "Harvest", "Tidewater", "Ember", "Glasswing", "Frostline", "Aurora", "Cobalt")
EVENT_SECOND = (
    ("Festival", "a summer music festival"),
    ("Summit", "a yearly meeting of leaders"),
    ("Regatta", "a sailing race"),
    ("Marathon", "a city marathon"),
    ("Expo", "a technology fair"),
    ("Cup", "a football tournament"),
)

JACKETS = ("red", "orange", "green", "teal", "navy", "purple", "pink", "gold", "sky-blue", "brown")
ACCESSORIES = ("a wide-brimmed hat", "round glasses", "a striped scarf", "a bow tie")
BACKDROPS = ("cream", "white", "sky-blue", "grey")
SKIES = ("orange", "sky-blue", "pink", "purple", "gold", "navy")
BUILDINGS = ("white", "grey", "brown", "black", "cream")
LANDMARKS = ("domed tower", "tall spire", "stone arch", "observation wheel", "lighthouse", "pyramid")
LANDMARK_COLOURS = ("gold", "red", "white", "green", "teal")
SHAPES = ("triangle", "square", "diamond", "ring", "star", "cross")
LOGO_COLOURS = ("red", "green", "gold", "teal", "purple", "orange", "navy")
FIELDS = ("white", "navy", "black", "cream", "grey")
STAGES = ("purple", "red", "navy", "green", "brown", "teal")
DECORATIONS = ("lanterns", "flags", "balloons", "torches")
DECORATION_COLOURS = ("yellow", "white", "pink", "orange", "sky-blue", "gold")

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# News-style templates per (kind of the main entity, kind of the second entity or None). P: person, L: place,
# O: organisation, E: event (written after "the").
TEMPLATES = {
    ("person", None): (
        "{P} speaks to reporters after the vote on {day}.",
        "{P} answers questions at a news conference on {day}.",
        "{P} waves to supporters outside parliament on {day}.",
    ),
    ("person", "place"): ("{P} arrives in {L} for two days of talks.", "{P} tours the old harbour of {L} on {day}."),
    ("person", "organisation"): ("{P} meets the board of {O} on {day}.", "{P} announces a partnership with {O}."),
    ("person", "event"): ("{P} opens the {E} on {day}.", "{P} hands out the prizes at the {E}."),
    ("place", None): (
        "A view of {L} on {day} morning.",
        "Storm clouds gather over {L} on {day}.",
        "Evening light over the rooftops of {L}.",
    ),
    ("place", "person"): ("{L} welcomes {P} on {day}.", "Residents of {L} line the streets to greet {P}."),
    ("place", "organisation"): ("{L} approves a new depot for {O}.", "Workers in {L} protest plans by {O} on {day}."),
    ("place", "event"): ("Crowds fill {L} for the {E}.", "{L} prepares to host the {E} on {day}."),
    ("organisation", None): (
        "Shares of {O} rose sharply on {day}.",
        "{O} reports record profits for the year.",
        "{O} unveils its new headquarters on {day}.",
    ),
    ("organisation", "person"): ("{O} names {P} as its new chair.", "{O} confirms talks with {P} on {day}."),
    ("organisation", "place"): ("{O} opens a factory near {L}.", "{O} moves its offices to {L} on {day}."),
    ("organisation", "event"): ("{O} sponsors the {E} this year.", "{O} pulls its support from the {E} on {day}."),
    ("event", None): (
        "Thousands attend the {E} on {day}.",
        "The {E} draws record crowds on {day}.",
        "Final preparations for the {E} are under way.",
    ),
    ("event", "person"): ("The {E} honours {P} on its closing night.", "The {E} opens with a speech by {P} on {day}."),
    ("event", "place"): ("The {E} returns to {L} on {day}.", "The {E} moves to {L} after a long pause."),
    ("event", "organisation"): ("The {E} signs {O} as its main sponsor.", "The {E} drops {O} as a partner on {day}."),
}
PLACEHOLDERS = {"person": "P", "place": "L", "organisation": "O", "event": "E"}


@dataclass(frozen=True)
class DemoEntity:
    """A made-up entity: its name, what it is, its look (attribute -> value) and the sentence describing it."""

    name: str
    kind: str
    role: str
    look: dict[str, str]
    description: str

    @property
    def slug(self) -> str:
        return "-".join(self.name.lower().split())


def _sample(rng: random.Random, options: list, count: int, what: str) -> list:
    if count > len(options):
        raise ValueError(f"the demo has {len(options)} different {what}, too few for {count} entities of that kind")
    return rng.sample(options, count)


def _looks(*attributes: tuple[str, ...], distinct: tuple[int, int] | None = None) -> list[tuple[str, ...]]:
    """Every combination of the attributes; `distinct` names two colour attributes that must differ."""
    return [
        combo
        for combo in itertools.product(*attributes)
        if distinct is None or combo[distinct[0]] != combo[distinct[1]]
    ]


def demo_entities(num_entities: int = 24, seed: int = 0) -> list[DemoEntity]:
    """`num_entities` made-up entities, the four kinds in turn, each with its own look and description."""
    if num_entities < len(KINDS):
        raise ValueError(f"num_entities must be at least {len(KINDS)} (one of each kind), got {num_entities}")
    rng = random.Random(seed)
    counts = {kind: len(range(index, num_entities, len(KINDS))) for index, kind in enumerate(KINDS)}
    made: dict[str, list[DemoEntity]] = {}

    people = _sample(rng, list(itertools.product(PERSON_FIRST, PERSON_LAST)), counts["person"], "person names")
    looks = _sample(rng, _looks(JACKETS, tuple(HAIR_COLOURS), ACCESSORIES, BACKDROPS), counts["person"], "looks")
    made["person"] = [
        DemoEntity(
            name=f"{first} {last}",
            kind="person",
            role=PERSON_ROLES[index % len(PERSON_ROLES)],
            look={"jacket": jacket, "hair": hair, "accessory": accessory, "backdrop": backdrop},
            description=f"{first} {last}, {PERSON_ROLES[index % len(PERSON_ROLES)]}, is usually pictured in a "
            f"{jacket} jacket, with {hair} hair and {accessory}.",
        )
        for index, ((first, last), (jacket, hair, accessory, backdrop)) in enumerate(zip(people, looks, strict=True))
    ]
    places = _sample(rng, list(PLACE_NAMES), counts["place"], "place names")
    looks = _sample(
        rng, _looks(SKIES, BUILDINGS, LANDMARKS, LANDMARK_COLOURS, distinct=(0, 1)), counts["place"], "looks"
    )
    made["place"] = [
        DemoEntity(
            name=name,
            kind="place",
            role=PLACE_ROLES[index % len(PLACE_ROLES)],
            look={"sky": sky, "buildings": buildings, "landmark": landmark, "landmark_colour": colour},
            description=f"{name}, {PLACE_ROLES[index % len(PLACE_ROLES)]}, has a skyline of {buildings} buildings "
            f"and a {colour} {landmark} under a {sky} sky.",
        )
        for index, (name, (sky, buildings, landmark, colour)) in enumerate(zip(places, looks, strict=True))
    ]
    organisations = _sample(rng, list(itertools.product(ORG_FIRST, ORG_SECOND)), counts["organisation"], "names")
    looks = _sample(rng, _looks(SHAPES, LOGO_COLOURS, FIELDS, distinct=(1, 2)), counts["organisation"], "looks")
    made["organisation"] = [
        DemoEntity(
            name=f"{first} {second}",
            kind="organisation",
            role=role,
            look={"shape": shape, "logo_colour": colour, "field": field},
            description=f"{first} {second}, {role}, has a logo of a {colour} {shape} on a {field} background.",
        )
        for (first, (second, role)), (shape, colour, field) in zip(organisations, looks, strict=True)
    ]
    events = _sample(rng, list(itertools.product(EVENT_FIRST, EVENT_SECOND)), counts["event"], "event names")
    looks = _sample(rng, _looks(STAGES, DECORATIONS, DECORATION_COLOURS), counts["event"], "looks")
    made["event"] = [
        DemoEntity(
            name=f"{first} {second}",
            kind="event",
            role=role,
            look={"stage": stage, "decoration": decoration, "decoration_colour": colour},
            description=f"The {first} {second}, {role}, is held on a {stage} stage hung with {colour} {decoration}.",
        )
        for (first, (second, role)), (stage, decoration, colour) in zip(events, looks, strict=True)
    ]
    return [made[KINDS[index % len(KINDS)]][index // len(KINDS)] for index in range(num_entities)]


# ---------------------------------------------------------------------------------------------------------------
# Drawing: a 64-unit canvas scaled to the image size; `rng` adds the small per-image variations.
# ---------------------------------------------------------------------------------------------------------------


class _Canvas:
    def __init__(self, size: int, background: tuple[int, int, int]):
        self.image = Image.new("RGB", (size, size), background)
        self.draw = ImageDraw.Draw(self.image)
        self.scale = size / 64

    def xy(self, *coordinates: float) -> list[float]:
        return [value * self.scale for value in coordinates]

    def rectangle(self, x0, y0, x1, y1, fill):
        self.draw.rectangle(self.xy(x0, y0, x1, y1), fill=fill)

    def ellipse(self, x0, y0, x1, y1, fill=None, outline=None, width=1):
        self.draw.ellipse(self.xy(x0, y0, x1, y1), fill=fill, outline=outline, width=max(1, round(width * self.scale)))

    def polygon(self, points, fill):
        self.draw.polygon([tuple(self.xy(x, y)) for x, y in points], fill=fill)

    def line(self, points, fill, width=1):
        self.draw.line([tuple(self.xy(x, y)) for x, y in points], fill=fill, width=max(1, round(width * self.scale)))


def _shape(canvas: _Canvas, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "triangle":
        canvas.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill)
    elif shape == "square":
        canvas.rectangle(cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8, fill)
    elif shape == "diamond":
        canvas.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill)
    elif shape == "ring":
        canvas.ellipse(cx - r, cy - r, cx + r, cy + r, outline=fill, width=r * 0.4)
    elif shape == "star":
        points = []
        for step in range(10):
            radius = r if step % 2 == 0 else r * 0.45
            angle = math.radians(step * 36 - 90)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        canvas.polygon(points, fill)
    else:  # cross
        canvas.rectangle(cx - r * 0.3, cy - r, cx + r * 0.3, cy + r, fill)
        canvas.rectangle(cx - r, cy - r * 0.3, cx + r, cy + r * 0.3, fill)


def _draw_place(canvas: _Canvas, place: DemoEntity, rng: random.Random) -> None:
    look = place.look
    canvas.rectangle(0, 0, 64, 64, COLOURS[look["sky"]])
    building = COLOURS[look["buildings"]]
    x = -rng.uniform(0, 6)
    while x < 64:
        width = rng.uniform(7, 12)
        canvas.rectangle(x, 64 - rng.uniform(14, 26), x + width - 1, 64, building)
        x += width
    colour = COLOURS[look["landmark_colour"]]
    cx = 46 + rng.uniform(-3, 3)
    landmark = look["landmark"]
    if landmark == "domed tower":
        canvas.rectangle(cx - 5, 24, cx + 5, 64, colour)
        canvas.ellipse(cx - 7, 14, cx + 7, 30, colour)
    elif landmark == "tall spire":
        canvas.polygon([(cx, 4), (cx + 5, 64), (cx - 5, 64)], colour)
    elif landmark == "stone arch":
        canvas.ellipse(cx - 13, 22, cx + 13, 70, outline=colour, width=6)
    elif landmark == "observation wheel":
        canvas.ellipse(cx - 12, 14, cx + 12, 38, outline=colour, width=2)
        canvas.line([(cx - 12, 26), (cx + 12, 26)], colour)
        canvas.line([(cx, 14), (cx, 38)], colour)
        canvas.line([(cx, 26), (cx - 6, 64)], colour, width=2)
        canvas.line([(cx, 26), (cx + 6, 64)], colour, width=2)
    elif landmark == "lighthouse":
        canvas.polygon([(cx - 5, 64), (cx - 3, 16), (cx + 3, 16), (cx + 5, 64)], colour)
        canvas.rectangle(cx - 4, 10, cx + 4, 16, COLOURS["yellow"])
    else:  # pyramid
        canvas.polygon([(cx, 18), (cx + 16, 64), (cx - 16, 64)], colour)


def _draw_event(canvas: _Canvas, event: DemoEntity, rng: random.Random, over_place: bool) -> None:
    look = event.look
    if not over_place:
        canvas.rectangle(0, 0, 64, 64, (40, 40, 55))  # the dark back of a stage at night
    canvas.rectangle(0, 46, 64, 64, COLOURS[look["stage"]])
    colour = COLOURS[look["decoration_colour"]]
    decoration = look["decoration"]
    offset = rng.uniform(0, 8)
    for index in range(5):
        x = offset + index * 13
        y = 8 + rng.uniform(-2, 2)
        if decoration == "lanterns":
            canvas.ellipse(x - 3, y - 4, x + 3, y + 4, colour)
        elif decoration == "flags":
            canvas.polygon([(x - 4, y - 3), (x + 4, y - 3), (x, y + 5)], colour)
        elif decoration == "balloons":
            canvas.ellipse(x - 4, y - 4, x + 4, y + 4, colour)
            canvas.line([(x, y + 4), (x, y + 14)], colour)
        else:  # torches
            canvas.rectangle(x - 1, y + 2, x + 1, y + 14, COLOURS["brown"])
            canvas.polygon([(x - 3, y + 2), (x + 3, y + 2), (x, y - 5)], colour)
    if decoration == "flags":
        canvas.line([(0, 5), (64, 5)], colour)


def _draw_person(canvas: _Canvas, person: DemoEntity, rng: random.Random, cx: float) -> None:
    look = person.look
    cx += rng.uniform(-2, 2)
    top = 24 + rng.uniform(-2, 2)
    jacket = COLOURS[look["jacket"]]
    canvas.polygon([(cx - 9, top + 18), (cx + 9, top + 18), (cx + 14, 64), (cx - 14, 64)], jacket)
    canvas.ellipse(cx - 7, top, cx + 7, top + 15, SKIN)
    hair = HAIR_COLOURS[look["hair"]]
    canvas.draw.pieslice(canvas.xy(cx - 7, top - 1, cx + 7, top + 13), 180, 360, fill=hair)
    accessory = look["accessory"]
    if accessory == "a wide-brimmed hat":
        canvas.rectangle(cx - 11, top + 1, cx + 11, top + 3, COLOURS["black"])
        canvas.rectangle(cx - 6, top - 5, cx + 6, top + 2, COLOURS["black"])
    elif accessory == "round glasses":
        canvas.ellipse(cx - 6, top + 6, cx - 1, top + 10, outline=COLOURS["black"], width=1)
        canvas.ellipse(cx + 1, top + 6, cx + 6, top + 10, outline=COLOURS["black"], width=1)
    elif accessory == "a striped scarf":
        for index in range(3):
            colour = COLOURS["white"] if index % 2 == 0 else COLOURS["red"]
            canvas.rectangle(cx - 8 + index * 5, top + 15, cx - 3 + index * 5, top + 20, colour)
    else:  # bow tie
        canvas.polygon([(cx, top + 18), (cx - 5, top + 15), (cx - 5, top + 21)], COLOURS["black"])
        canvas.polygon([(cx, top + 18), (cx + 5, top + 15), (cx + 5, top + 21)], COLOURS["black"])


def _draw_logo(canvas: _Canvas, organisation: DemoEntity, cx: float, cy: float, r: float) -> None:
    look = organisation.look
    canvas.rectangle(cx - r, cy - r, cx + r, cy + r, COLOURS[look["field"]])
    _shape(canvas, look["shape"], cx, cy, r * 0.75, COLOURS[look["logo_colour"]])


def draw_scene(entities: list[DemoEntity], image_size: int, rng: random.Random) -> Image.Image:
    """The picture of a caption: a place's skyline or an event's stage behind, a person in front, a logo badge."""
    by_kind = {entity.kind: entity for entity in entities}
    main = entities[0]
    if main.kind == "person":
        background = COLOURS[main.look["backdrop"]]
    elif main.kind == "organisation":
        background = COLOURS[main.look["field"]]
    else:
        background = COLOURS["white"]
    canvas = _Canvas(image_size, background)
    if "place" in by_kind:
        _draw_place(canvas, by_kind["place"], rng)
    if "event" in by_kind:
        _draw_event(canvas, by_kind["event"], rng, over_place="place" in by_kind)
    if "person" in by_kind:
        _draw_person(canvas, by_kind["person"], rng, cx=32 if len(entities) == 1 else 24)
    if "organisation" in by_kind:
        if len(entities) == 1:
            _draw_logo(canvas, main, 32 + rng.uniform(-3, 3), 32 + rng.uniform(-3, 3), 20 + rng.uniform(-2, 2))
        else:
            _draw_logo(canvas, by_kind["organisation"], 53, 11, 9)
    return ImageEnhance.Brightness(canvas.image).enhance(rng.uniform(0.9, 1.1))


# ---------------------------------------------------------------------------------------------------------------
# Captions, splits and files
# ---------------------------------------------------------------------------------------------------------------


def _captions_of(entity, entities, captions_per_entity, rng, taken: set[str]) -> list[tuple[str, list[DemoEntity]]]:
    """Distinct sentences about `entity`: alone, then with an entity of each other kind in turn."""
    others = [kind for kind in KINDS if kind != entity.kind]
    by_kind = {kind: [other for other in entities if other.kind == kind] for kind in KINDS}
    captions = []
    attempts = 0
    while len(captions) < captions_per_entity:
        attempts += 1
        if attempts > 1000:
            raise RuntimeError(f"could not write {captions_per_entity} different captions about {entity.name}")
        cycle = [None, *others]
        companion_kind = cycle[len(captions) % len(cycle)]
        named = [entity]
        if companion_kind is not None:
            named.append(rng.choice(by_kind[companion_kind]))
        template = rng.choice(TEMPLATES[(entity.kind, companion_kind)])
        fields = {PLACEHOLDERS[other.kind]: other.name for other in named}
        sentence = template.format(day=rng.choice(DAYS), **fields)
        if sentence not in taken:
            taken.add(sentence)
            captions.append((sentence, named))
    return captions


def _write_json(path: Path, data) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False, indent=1)


def _demo_parameters(num_entities, captions_per_entity, image_size, seed) -> dict:
    return {
        "version": DEMO_VERSION,
        "num_entities": num_entities,
        "captions_per_entity": captions_per_entity,
        "image_size": image_size,
        "seed": seed,
    }


def _read_parameters(folder: Path) -> dict | None:
    try:
        with (folder / INFO_FILE).open(encoding="utf-8") as handle:
            return json.load(handle)["parameters"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_demo_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a complete demo dataset (of any parameters)."""
    return _read_parameters(Path(folder)) is not None


def _write_demo(folder: Path, num_entities, captions_per_entity, image_size, seed) -> dict[str, int]:
    rng = random.Random(seed)
    entities = demo_entities(num_entities, seed)
    (folder / "images").mkdir()
    taken: set[str] = set()
    rows = {split: [] for split in SPLIT_FILES}
    held_out = max(1, round(captions_per_entity / 8))
    for entity in entities:
        captions = _captions_of(entity, entities, captions_per_entity, rng, taken)
        # Which captions are held out is drawn per entity, so that test captions are of every kind of sentence.
        order = list(range(len(captions)))
        rng.shuffle(order)
        split_of = {index: "test" for index in order[:held_out]}
        split_of.update({index: "validation" for index in order[held_out : 2 * held_out]})
        for index, (sentence, named) in enumerate(captions):
            row_id = f"{entity.slug}-{index:02d}"
            # One generator per image, seeded by the row: an image does not change when other rows do.
            draw_scene(named, image_size, random.Random(f"{seed}/{row_id}")).save(
                folder / "images" / f"{row_id}.jpg", quality=92
            )
            rows[split_of.get(index, "train")].append(
                {
                    "id": row_id,
                    "image": f"images/{row_id}.jpg",
                    "text": sentence,
                    "entity": entity.name,
                    "topic": entity.kind,
                    "entities": "; ".join(other.name for other in named),
                    "_explanation": " ".join(other.description for other in named),
                }
            )
    for split, name in SPLIT_FILES.items():
        with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows[split]:
                record = {key: value for key, value in row.items() if key != "_explanation"}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        _write_json(
            folder / f"CapDsc_mistral_{name}.json",
            {os.path.basename(row["image"]): row["_explanation"] for row in rows[split]},
        )
    counts = {split: len(split_rows) for split, split_rows in rows.items()}
    # Written last: its presence says the folder is complete.
    _write_json(
        folder / INFO_FILE,
        {
            "generator": "entityclip_hf.data.make_demo_dataset",
            "parameters": _demo_parameters(num_entities, captions_per_entity, image_size, seed),
            "rows": counts,
            "entities": [asdict(entity) for entity in entities],
        },
    )
    return counts


def default_demo_root() -> Path:
    """Where `load_entity_dataset("demo")` builds the demo when no root is given: in the `datasets` cache."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "entityclip_demo" / f"v{DEMO_VERSION}"


def make_demo_dataset(
    output_dir: str | os.PathLike,
    num_entities: int = 24,
    captions_per_entity: int = 8,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the demo dataset to `output_dir` (if it is not there yet) and return the folder.

    Built in a temporary sibling folder and renamed into place, so a crash or a concurrent build never leaves a
    half-written demo. An existing demo with the same parameters is reused; a folder holding anything else is an
    error (nothing is overwritten).
    """
    if not 3 <= captions_per_entity <= MAX_CAPTIONS_PER_ENTITY:
        raise ValueError(
            f"captions_per_entity must be in 3..{MAX_CAPTIONS_PER_ENTITY} (each entity needs a train, a "
            f"validation and a test caption), got {captions_per_entity}"
        )
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    output_dir = Path(output_dir).expanduser().resolve()
    wanted = _demo_parameters(num_entities, captions_per_entity, image_size, seed)

    def existing() -> Path | None:
        if not output_dir.exists() or (output_dir.is_dir() and not any(output_dir.iterdir())):
            return None
        found = _read_parameters(output_dir)
        if found == wanted:
            return output_dir
        what = f"a demo made with {found}" if found else "something that is not a complete demo dataset"
        raise FileExistsError(f"{output_dir} holds {what}; asked for {wanted}. Choose another folder or remove it.")

    if existing() is not None:
        return output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    try:
        _write_demo(staging, num_entities, captions_per_entity, image_size, seed)
        try:
            os.rename(staging, output_dir)  # atomic; replaces an empty folder
        except OSError:
            # Another process finished first: use its copy if it is the same demo.
            if existing() is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


__all__ = ["DemoEntity", "default_demo_root", "demo_entities", "draw_scene", "is_demo_folder", "make_demo_dataset"]
