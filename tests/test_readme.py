"""The README's promises: its first two commands, CI running the test command, and a Python example that runs."""

import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers import CLIPModel

from entityclip_hf.tiny_models import tiny_image_processor

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def fenced_blocks(language: str) -> list[str]:
    return [block.strip() for block in re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)]


def test_readme_starts_with_the_main_job_and_the_tests_each_installing_what_it_needs():
    main_job, tests = fenced_blocks("bash")[:2]
    before_first_heading = README.split("\n## ", 1)[0]
    assert main_job in before_first_heading and tests in before_first_heading
    for command in (main_job, tests):
        assert "\n" not in command, "one command each"
        # On a CPU machine the CPU build of torch must come first, or pip pulls the multi-GB CUDA one.
        assert command.index("pip install torch==2.13.0") < command.index("pip install -e ")
    assert "examples/demo.sh" in main_job
    assert '".[dev]"' in tests and "pytest" in tests and "ruff check" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    tests = fenced_blocks("bash")[1]
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci_lines


def test_python_example_runs_on_a_local_clip_checkpoint(tiny_clip_config, tiny_tokenizer, tmp_path):
    """The README's example, with the Hub id replaced by a tiny CLIP checkpoint saved here (nothing downloads)."""
    example = next(block for block in fenced_blocks("python") if "from_clip_pretrained" in block)
    clip_folder = tmp_path / "tiny-clip"
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config).save_pretrained(clip_folder)
    tiny_tokenizer.save_pretrained(clip_folder)
    tiny_image_processor(32).save_pretrained(clip_folder)
    assert '"openai/clip-vit-base-patch32"' in example
    script = example.replace('"openai/clip-vit-base-patch32"', repr(str(clip_folder)))
    script += (
        "\nassert loading_info['missing_keys'] and not any(k.startswith('clip.') for k in loading_info['missing_keys'])"
        "\nassert torch.isfinite(output.loss) and match.shape == (2,) and image_embeds.shape == text_embeds.shape"
        "\nassert type(reloaded).__name__ == 'EntityCLIPModel'"
        "\nprint('README example ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "README example ok" in result.stdout
