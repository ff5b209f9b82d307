"""transformers' own common test suites (ModelTesterMixin, ConfigTester, ProcessorTesterMixin), fetched at test time.

The test files are not part of the transformers wheel, but the source distribution of the installed version ships
`tests/test_modeling_common.py`, `tests/test_configuration_common.py` and `tests/test_processing_common.py`. They are
downloaded with pip (once, into a cache folder), never copied into this repository, and imported as the package
`transformers_tests`. The few modules they import that the source distribution leaves out are written here as
stand-ins, each saying what it replaces.

`load_common_tests()` returns the imported modules, or skips the calling test module when pip cannot fetch the sdist.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import transformers

COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_processing_common.py")
PACKAGE = "transformers_tests"

# Modules the common files import that the sdist does not ship. Each stand-in provides exactly the names imported.
STAND_INS = {
    # test_modeling_common.py: `from .exporters.test_export import ExportTesterMixin`. The real mixin adds
    # torch.export tests; ours are in tests/test_clip_compatibility.py (test_torch_export_*).
    "exporters/__init__.py": "",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    # test_modeling_common.py: `from .generation.test_utils import GenerationTesterMixin` (generation models only).
    "generation/__init__.py": "",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    # test_configuration_common.py: `from .utils.test_configuration_utils import config_common_kwargs`, the generic
    # kwargs `check_config_arguments_init` sets (skipped for composite configs such as ours and CLIP's).
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        "    'return_dict': False,\n"
        "    'output_hidden_states': True,\n"
        "    'output_attentions': True,\n"
        "    'dtype': 'float16',\n"
        "    'tie_word_embeddings': False,\n"
        "    'is_encoder_decoder': True,\n"
        "    'architectures': ['BertModel'],\n"
        "    'finetuning_task': 'translation',\n"
        "    'id2label': {0: 'label'},\n"
        "    'label2id': {'label': '0'},\n"
        "    'problem_type': 'regression',\n"
        "}\n"
    ),
}
# test_processing_common.py: `from fetch_hub_objects_for_ci import url_to_local_path` (a top-level module in
# transformers' utils/ that maps fixture URLs to files downloaded for CI). Offline, the fixtures are made locally:
# images are written by `write_image_fixtures`; other modalities are not used by EntityCLIP.
FETCH_HUB_OBJECTS = '''
import os
from pathlib import Path

FIXTURE_DIR = Path(os.environ["ENTITYCLIP_TRANSFORMERS_FIXTURES"])


def url_to_local_path(url, return_url_if_not_found=True):
    local = FIXTURE_DIR / url.rsplit("/", 1)[-1]
    if local.exists():
        return str(local)
    return url if return_url_if_not_found else None
'''


def _cache_root() -> Path:
    base = os.environ.get("ENTITYCLIP_TEST_CACHE") or os.path.join(Path.home(), ".cache", "entityclip-hf-tests")
    return Path(base) / f"transformers-{transformers.__version__}"


def _download_sdist(destination: Path) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
            f"transformers=={transformers.__version__}", "-d", str(destination),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    archives = sorted(destination.glob("transformers-*.tar.gz"))
    if done.returncode != 0 or not archives:
        pytest.skip(
            f"transformers' common tests need the transformers {transformers.__version__} sdist, which pip could not "
            f"fetch: {done.stderr.strip()[-300:]}",
            allow_module_level=True,
        )
    return archives[0]


def _extract(root: Path) -> Path:
    """Unpack the three common files and the stand-ins into root/PACKAGE (atomically: a rename at the end)."""
    package = root / PACKAGE
    if (package / "__init__.py").exists():
        return package
    archive = _download_sdist(root / "sdist")
    staging = Path(tempfile.mkdtemp(dir=root, prefix="staging-"))
    target = staging / PACKAGE
    target.mkdir()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "tests" and parts[2] in COMMON_FILES:
                source = tar.extractfile(member)
                (target / parts[2]).write_bytes(source.read())
    missing = [name for name in COMMON_FILES if not (target / name).exists()]
    if missing:
        pytest.fail(f"the transformers {transformers.__version__} sdist lacks {missing}")
    for relative, text in STAND_INS.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (staging / "fetch_hub_objects_for_ci.py").write_text(FETCH_HUB_OBJECTS)
    (target / "__init__.py").write_text("")
    try:
        os.rename(target, package)
        os.replace(staging / "fetch_hub_objects_for_ci.py", root / "fetch_hub_objects_for_ci.py")
    except OSError:
        pass  # another process unpacked it first
    return package


def write_image_fixtures(folder: Path) -> None:
    """The image fixtures ProcessorTesterMixin names by URL, drawn locally (no Hub)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("coco_sample.png", "pixel_values.png"):
        if not (folder / name).exists():
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / name)


def load_common_tests():
    """Import and return (test_modeling_common, test_configuration_common, test_processing_common)."""
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    _extract(root)
    fixtures = root / "fixtures"
    write_image_fixtures(fixtures)
    os.environ.setdefault("ENTITYCLIP_TRANSFORMERS_FIXTURES", str(fixtures))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return tuple(importlib.import_module(f"{PACKAGE}.{name[:-3]}") for name in COMMON_FILES)
