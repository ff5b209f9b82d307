"""Entity-centric image-text datasets as `datasets.DatasetDict`s, bad data reported, plus batching and a demo.

- `load_entity_dataset(name, root, explanations="auto", ...)`: N24News, VisualNews, GoodNews, plain JSON lines or
  the built-in demo -> train / validation / test with columns `id`, `image`, `text`, `explanation` + metadata.
- `DataReport`: what was wrong, per split, with example ids (`return_report=True`); `DataError` in strict mode.
- `EntityCLIPCollator`, `make_transform`, `lazy_images`: batches for training and evaluation, decoded late.
- `make_demo_dataset`: the demo dataset (made-up entities, drawn images, explanations), made locally.
- `main`: the `entityclip-data` command.
"""

from .cli import main
from .collator import EntityCLIPCollator, EntityCLIPTransform, lazy_images, make_transform
from .demo import demo_entities, make_demo_dataset
from .formats import FORMATS
from .loading import load_entity_dataset
from .report import DataError, DataReport, SplitReport

KNOWN_DATASETS = tuple(sorted(FORMATS))

__all__ = [
    "KNOWN_DATASETS",
    "DataError",
    "DataReport",
    "EntityCLIPCollator",
    "EntityCLIPTransform",
    "SplitReport",
    "demo_entities",
    "lazy_images",
    "load_entity_dataset",
    "main",
    "make_demo_dataset",
    "make_transform",
]
