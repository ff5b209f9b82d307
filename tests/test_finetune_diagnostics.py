"""finetune.py's evaluation diagnostics (ITM AUC, leak indicators), --use_explanations, the tiny tokenizer's corpus."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = [
    "--dataset", "demo", "--demo_entities", "8", "--demo_captions", "8",
    "--tiny_hidden_size", "32", "--tiny_image_size", "32", "--tiny_patch_size", "8",
    "--batch_size", "8", "--eval_batch_size", "8", "--learning_rate", "5e-4", "--test_split", "",
]  # fmt: skip
DIAGNOSTICS = (
    "itm_loss", "itm_auc", "expert_contrastive_loss", "expert_contrastive_loss_shuffled_explanations",
    "expert_contrastive_loss_shuffled_images",
)  # fmt: skip


def finetune(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune.py"), *map(str, args)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from entityclip_hf.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("diag") / "data", num_entities=8, captions_per_entity=8)


def test_eval_logs_itm_auc_and_leak_indicators_and_the_tokenizer_knows_explanation_words(tmp_path, data_root):
    out = tmp_path / "run"
    output = finetune(*SMALL, "--dataset_root", data_root, "--output_dir", out, "--max_steps", 2, "--eval_every", 2)
    for label in ("itm auc", "expert loss", "shuffled explanations", "shuffled images"):
        assert f"| {label} " in output, f"{label} printed beside the losses"
    evaluations = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evaluations = [record for record in evaluations if "eval/rsum" in record]
    assert len(evaluations) == 2
    for record in evaluations:
        assert all(f"eval/{name}" in record for name in DIAGNOSTICS)
        assert 0.0 <= record["eval/itm_auc"] <= 1.0
    # The tiny tokenizer is trained on the explanations too: their words are whole tokens, not characters.
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(out / "best")
    assert tokenizer.tokenize("pictured") == ["pictured</w>"], "a word that only explanations use"


def test_use_explanations_false_trains_without_them(tmp_path, data_root):
    out = tmp_path / "run"
    finetune(*SMALL, "--dataset_root", data_root, "--output_dir", out, "--max_steps", 1, "--use_explanations", "false")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(out / "best")
    assert len(tokenizer.tokenize("pictured")) > 1, "no explanation reached the tokenizer's corpus either"
