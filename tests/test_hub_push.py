"""Hub sharing, offline: the Hub API is mocked and the test reads what the single commit would upload.

HF_HUB_OFFLINE stays set (conftest): any real HTTP request would raise, so passing also proves that nothing but the
mocked `create_repo` / `create_commit` was asked of the Hub.
"""

import json
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl
from safetensors.torch import load as load_safetensors_bytes

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel
from entityclip_hf.hub import (
    REQUIRED_CODE_FILES,
    push_entityclip_to_hub,
    push_folder_to_hub,
    render_model_card,
    save_hub_folder,
)

REPO_ID = "alice/entityclip-news"
METRICS = {
    "i2t_R@1": 41.25,
    "i2t_R@5": 70.5,
    "i2t_R@10": 80.0,
    "i2t_R@50": 95.0,
    "i2t_R@100": 98.75,
    "i2t_median_rank": 2.0,
    "i2t_mean_rank": 7.125,
    "t2i_R@1": 39.0,
    "t2i_R@5": 68.25,
    "t2i_R@10": 79.5,
    "t2i_R@50": 94.0,
    "t2i_R@100": 99.0,
    "t2i_median_rank": 2.0,
    "t2i_mean_rank": 6.5,
    "rsum": 378.5,
    "val_contrastive_loss": 1.875,
}
TRAINING_ARGS = {
    "model": "openai/clip-vit-base-patch32",
    "learning_rate": 1e-5,
    "batch_size": 192,
    "hub_token": "hf_secret_value",
    "api_key": "sk-secret-value",
    "output_dir": "/home/alice/runs/secret-project",
    "dataset": "n24news",
}


@pytest.fixture(scope="module")
def model(tiny_clip_config):
    torch.manual_seed(0)
    return EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config, num_text_experts=3)).eval()


class RecordedCommit:
    """Mocks of HfApi.create_repo / create_commit that keep the uploaded bytes (the temp folder is gone after)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.commit_calls = []
        self.repo_calls = []

    def create_repo(self, repo_id, **kwargs):
        self.repo_calls.append((repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        self.commit_calls.append((repo_id, kwargs))
        for operation in operations:
            with open(operation.path_or_fileobj, "rb") as handle:
                self.files[operation.path_in_repo] = handle.read()
        return mock.sentinel.commit_info

    def json(self, name):
        return json.loads(self.files[name])

    def card(self):
        return ModelCard(self.files["README.md"].decode("utf-8"))


@pytest.fixture
def hub():
    recorded = RecordedCommit()
    with (
        mock.patch.object(
            HfApi, "create_repo", autospec=True, side_effect=lambda api, *a, **k: recorded.create_repo(*a, **k)
        ),
        mock.patch.object(
            HfApi, "create_commit", autospec=True, side_effect=lambda api, *a, **k: recorded.create_commit(*a, **k)
        ),
    ):
        yield recorded


def test_push_uploads_everything_in_one_commit(model, tiny_processor, hub):
    result = push_entityclip_to_hub(
        model,
        tiny_processor,
        REPO_ID,
        metrics=METRICS,
        dataset_name="N24News",
        dataset_split="test",
        training_args=TRAINING_ARGS,
        private=True,
        commit_message="EntityCLIP N24News",
    )
    assert result is mock.sentinel.commit_info
    assert hub.repo_calls == [(REPO_ID, {"private": True, "exist_ok": True, "repo_type": "model"})]
    assert len(hub.commit_calls) == 1, "one commit: the repository is never seen half-written"
    repo_id, kwargs = hub.commit_calls[0]
    assert repo_id == REPO_ID and kwargs["commit_message"] == "EntityCLIP N24News"

    files = set(hub.files)
    assert {"model.safetensors", "config.json", "README.md", "processor_config.json", "tokenizer.json"} <= files
    assert set(REQUIRED_CODE_FILES) <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)

    # Weights: exactly the model's.
    weights = load_safetensors_bytes(hub.files["model.safetensors"])
    state = model.state_dict()
    assert set(weights) == set(state)
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]), name
    # Config with auto_map for trust_remote_code users; processor with its own.
    config = hub.json("config.json")
    assert config["model_type"] == "entityclip" and config["num_text_experts"] == 3
    assert config["auto_map"] == {
        "AutoConfig": "configuration_entityclip.EntityCLIPConfig",
        "AutoModel": "modeling_entityclip.EntityCLIPModel",
        "AutoModelForZeroShotImageClassification": "modeling_entityclip.EntityCLIPModel",
    }
    assert hub.json("processor_config.json")["auto_map"] == {
        "AutoProcessor": "processing_entityclip.EntityCLIPProcessor"
    }
    # The code files are the package's own.
    import entityclip_hf

    package = entityclip_hf.__path__[0]
    for name in REQUIRED_CODE_FILES:
        with open(f"{package}/{name}", "rb") as handle:
            assert hub.files[name] == handle.read(), name

    # Our card, not transformers' default one.
    card = hub.card()
    text = card.text
    assert "EntityCLIP" in text and "trust_remote_code=True" in text and f'"{REPO_ID}"' in text
    assert "{{" not in text and "{%" not in text
    assert card.data.base_model == "openai/clip-vit-base-patch32"
    assert card.data.library_name == "transformers"
    results = {result.metric_type: result for result in card.data.eval_results}
    assert set(results) == {name.lower() for name in METRICS if name != "val_contrastive_loss"}
    assert results["i2t_r@1"].metric_value == 41.25 and results["t2i_mean_rank"].metric_value == 6.5
    assert {(r.dataset_name, r.dataset_split, r.task_type) for r in results.values()} == {
        ("N24News", "test", "image-text-retrieval")
    }
    assert "| Image → text | 41.25 | 70.50 | 80.00 | 95.00 | 98.75 | 2 | 7.12 |" in text
    assert "| Text → image | 39.00 | 68.25 | 79.50 | 94.00 | 99.00 | 2 | 6.50 |" in text
    assert "rsum: **378.50**" in text and "`val_contrastive_loss` | 1.8750" in text
    # Hyper-parameters, without the credentials or the publisher's local paths.
    assert "| `learning_rate` | `1e-05` |" in text and "| `batch_size` | `192` |" in text
    for secret in ("hf_secret_value", "sk-secret-value", "/home/alice", "hub_token", "api_key"):
        assert secret not in hub.files["README.md"].decode("utf-8"), secret


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    sys.modules["entityclip_hf"] = None  # this process cannot import the package
    import torch
    from transformers import AutoModel, AutoProcessor

    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__name__ == "EntityCLIPProcessor", type(processor)
    inputs = processor(text=["Merkel meets Macron in Aachen."], return_tensors="pt")
    with torch.no_grad():
        print(model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output.tolist())
    """
)


def test_uploaded_files_load_without_the_package(model, tiny_processor, hub, tmp_path):
    push_entityclip_to_hub(model, tiny_processor, REPO_ID)
    folder = tmp_path / "downloaded"
    folder.mkdir()
    for name, content in hub.files.items():
        (folder / name).write_bytes(content)
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    run = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    inputs = tiny_processor(text=["Merkel meets Macron in Aachen."], return_tensors="pt")
    with torch.no_grad():
        expected = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
    torch.testing.assert_close(
        torch.tensor(json.loads(run.stdout.strip().splitlines()[-1])), expected, rtol=1e-5, atol=1e-6
    )


def test_push_folder_reloads_a_saved_run(model, tiny_processor, hub, tmp_path):
    best = tmp_path / "best"
    model.save_pretrained(best)
    tiny_processor.save_pretrained(best)
    (best / "README.md").write_text("transformers' default card")
    push_folder_to_hub(best, REPO_ID, metrics=METRICS, dataset_name="demo", dataset_split="validation")
    assert len(hub.commit_calls) == 1
    weights = load_safetensors_bytes(hub.files["model.safetensors"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    card = hub.card()
    assert "transformers' default card" not in card.text
    assert {r.dataset_split for r in card.data.eval_results} == {"validation"}


def test_push_folder_needs_a_saved_model_and_processor(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_folder_to_hub(tmp_path, REPO_ID)
    model.save_pretrained(tmp_path / "model-only")
    with pytest.raises(FileNotFoundError, match="no EntityCLIP processor"):
        push_folder_to_hub(tmp_path / "model-only", REPO_ID)


def test_card_without_metrics_says_so_and_has_no_model_index(model):
    card = render_model_card(model, REPO_ID)
    assert card.data.eval_results is None
    assert "No evaluation results were given" in card.text
    assert "training hyper-parameters were not recorded" in card.text
    assert card.data.base_model is None


def test_bad_card_inputs_are_refused(model):
    with pytest.raises(ValueError, match="'i2t_R@1' must be a finite number"):
        render_model_card(model, REPO_ID, metrics={"i2t_R@1": float("nan")}, dataset_name="demo")
    with pytest.raises(ValueError, match="without dataset_name"):
        render_model_card(model, REPO_ID, metrics={"rsum": 1.0})
    with pytest.raises(ValueError, match="repo_id must look like 'user/name'"):
        render_model_card(model, "no-namespace")
    with pytest.raises(ValueError, match="not a valid Hub repository id"):
        render_model_card(model, "alice/bad name!")


def test_push_refuses_a_folder_that_would_not_load_remotely(model, tiny_processor, tmp_path, monkeypatch):
    monkeypatch.setattr(EntityCLIPModel, "_auto_class", None)  # as if the class had not been registered
    with mock.patch.object(HfApi, "create_commit") as create_commit, mock.patch.object(HfApi, "create_repo"):
        with pytest.raises(RuntimeError, match="would not load with trust_remote_code: .*modeling_entityclip.py"):
            push_entityclip_to_hub(model, tiny_processor, REPO_ID)
        create_commit.assert_not_called()
    with pytest.raises(TypeError, match="model must be an EntityCLIPModel"):
        save_hub_folder(torch.nn.Linear(2, 2), tiny_processor, tmp_path, REPO_ID)
