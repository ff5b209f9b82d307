"""FSDP2 training (`finetune.py --fsdp`, torch's `fully_shard`) with 2 CPU processes (gloo), against DDP.

Two launches share their results across the tests (module fixtures):
- `tests/fsdp_worker.py` under torchrun: in the same 2 processes, one training forward/backward of one global batch
  of 16 under DDP, FSDP2 and FSDP2 with activation checkpointing, gradients compared tensor by tensor; then the
  sharded and the full training state saved, loaded into fresh sharded models and stepped again;
- `finetune.py` under `accelerate launch`: DDP, FSDP2 (activation checkpointing, gradient clipping, sharded
  checkpoints) and a run resumed mid-epoch from the FSDP2 run's step-2 checkpoint that writes full checkpoints.
The full loss (gamma 0.1) is compared: both wrappings draw the same ITM negatives (same RNG per process).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.finetune_runs import ENV, REPO, assert_final_weights_follow, log_by_step, run_finetune

WORKER = str(REPO / "tests" / "fsdp_worker.py")
STEPS = 6
COMMON = [
    "--dataset", "demo", "--demo_entities", "8", "--demo_captions", "8",  # 48 pairs, 2 x 8 a step: 3 steps an epoch
    "--tiny_hidden_size", "32", "--tiny_image_size", "32", "--tiny_patch_size", "8",
    "--batch_size", "8", "--learning_rate", "5e-4", "--max_steps", str(STEPS), "--eval_every", "3",
    "--save_every", "2", "--keep_checkpoints", "3", "--eval_batch_size", "8", "--test_split", "", "--cpu",
    "--max_grad_norm", "1.0", "--adam_epsilon", "1e-6",  # epsilon: see test_training_distributed.py
]  # fmt: skip
LOSSES = ("train/loss", "train/contrastive_loss", "train/expert_contrastive_loss", "train/itm_loss")
sys.path.insert(0, str(REPO / "examples"))


def launch(output_dir, *args):
    return run_finetune(*COMMON, "--output_dir", output_dir, *args, processes=2)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    result_file = tmp_path_factory.mktemp("fsdp_worker") / "results.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    result = subprocess.run(
        [*command, WORKER, str(result_file)], env={**os.environ, **ENV}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result_file.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_runs")
    data = ["--dataset_root", str(root / "data")]
    outputs = {
        "ddp": launch(root / "ddp", *data),
        "fsdp": launch(root / "fsdp", *data, "--fsdp", "--gradient_checkpointing"),
    }
    step_2 = root / "fsdp" / "checkpoints" / "step_2"  # 2 of the epoch's 3 steps: mid-epoch
    outputs["resumed"] = launch(root / "resumed", *data, "--fsdp", "--fsdp_state_dict", "full", "--resume", str(step_2))
    return root, outputs


# ------------------------------------------------------------------------------------------------ one step
def test_fsdp2_gradients_equal_ddp_on_the_same_global_batch(worker):
    assert worker["scalars_reshaped"] == ["clip.logit_scale"]
    assert worker["all_parameters_sharded"], "every parameter a DTensor, logit_scale included"
    assert worker["shard_units"] == 4 + 3  # CLIP's 2 + 2 encoder layers, 3 expert banks
    for ddp_loss, fsdp_loss in worker["losses"]:  # each process's loss
        assert fsdp_loss == pytest.approx(ddp_loss, rel=1e-6)
    assert worker["nonzero_gradients"] == worker["gradients"]
    # <= 1: every gradient tensor equal to 1e-5 of its size (see relative_differences in the worker).
    assert max(worker["gradient_difference_fsdp_vs_ddp"].values()) <= 1.0, worker["gradient_difference_fsdp_vs_ddp"]
    # The measure sees a gradient that was not averaged over the processes.
    assert worker["gradient_difference_process_local_vs_ddp"] > 100


def test_activation_checkpointing_under_fsdp2_recomputes_and_keeps_the_gradients(worker):
    forward_calls, total_calls = worker["checkpointed_layer_calls"]
    assert forward_calls > 0 and total_calls == 2 * forward_calls, "each checkpointed layer runs again in backward"
    assert worker["gradient_difference_checkpointed_vs_ddp"] <= 1.0


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_training_state_round_trips_in_both_kinds(worker, kind):
    assert worker[f"{kind}_loaded_kind"] == kind
    assert worker[f"{kind}_loaded_parameters_difference"] == 0.0
    assert worker[f"{kind}_next_step_difference"] == 0.0, "Adam's moments and step count came back too"
    assert worker["full_state_dict_logit_scale_shape"] == [] and worker["full_state_dict_keys_match"]


# ------------------------------------------------------------------------------------------------ finetune.py
def test_finetune_fsdp_follows_ddp_step_by_step(runs):
    root, outputs = runs
    assert "model wrapping: fsdp2 (torch fully_shard): 7 sharded units" in outputs["fsdp"]
    assert "model wrapping: ddp" in outputs["ddp"]
    ddp, ddp_runs = log_by_step(root / "ddp")
    sharded, sharded_runs = log_by_step(root / "fsdp")
    assert ddp_runs[0]["num_processes"] == sharded_runs[0]["num_processes"] == 2
    assert sorted(ddp) == sorted(sharded) == list(range(STEPS + 1))
    for step in range(1, STEPS + 1):
        for name in LOSSES:
            assert sharded[step][name] == pytest.approx(ddp[step][name], rel=1e-5, abs=1e-6), (step, name)
    for step in (0, 3, 6):
        for name in ("eval/contrastive_loss", "eval/rsum", "eval/itm_auc"):
            assert sharded[step][name] == pytest.approx(ddp[step][name], rel=1e-5), (step, name)
    assert ddp[STEPS]["train/contrastive_loss"] < ddp[1]["train/contrastive_loss"] - 0.05, "training moved"
    assert_final_weights_follow(root / "fsdp", root / "ddp")


def test_mid_epoch_resume_of_an_fsdp_run_equals_the_straight_run(runs):
    root, _ = runs
    straight, _ = log_by_step(root / "fsdp")
    resumed, resumed_runs = log_by_step(root / "resumed")
    assert resumed_runs[0]["resumed_from"].endswith("step_2")
    assert sorted(resumed) == list(range(3, STEPS + 1))
    for step in range(3, STEPS + 1):
        for name in LOSSES:
            assert resumed[step][name] == pytest.approx(straight[step][name], rel=1e-6, abs=1e-7), (step, name)
    final_straight = load_file(root / "fsdp" / "final" / "model.safetensors")
    final_resumed = load_file(root / "resumed" / "final" / "model.safetensors")
    for key in final_straight:
        torch.testing.assert_close(final_resumed[key], final_straight[key], rtol=0, atol=1e-6, msg=key)


def test_checkpoints_hold_the_kind_asked_for(runs):
    from entityclip_hf import fsdp

    root, _ = runs
    sharded = root / "fsdp" / "checkpoints" / "step_6"
    full = root / "resumed" / "checkpoints" / "step_6"
    assert fsdp.saved_kind(str(sharded)) == "sharded" and fsdp.saved_kind(str(full)) == "full"
    assert (sharded / "random_states_1.pkl").exists() and (sharded / "scheduler.bin").exists()
    weights = load_file(full / fsdp.FULL_MODEL_FILE)  # an ordinary state dict: the final weights, 0-dim scale
    assert weights["clip.logit_scale"].shape == torch.Size([])
    final = load_file(root / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(weights[key], final[key]) for key in final)


def test_best_and_final_are_ordinary_folders_that_automodel_and_clip_export_load(runs, tmp_path):
    from transformers import AutoModel, CLIPModel

    from entityclip_hf import EntityCLIPModel
    from entityclip_hf.export import export_clip

    root, _ = runs
    for name in ("best", "final"):
        folder = root / "fsdp" / name
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == "modeling_entityclip.EntityCLIPModel"
        assert not list(folder.glob("_fsdp*.py")), "torch's FSDP class files must not be copied beside the weights"
        weights = load_file(folder / "model.safetensors")
        assert weights["clip.logit_scale"].shape == torch.Size([])
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        assert model.clip.logit_scale.shape == torch.Size([])
        assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())
        assert type(EntityCLIPModel.from_pretrained(folder)).__name__ == "EntityCLIPModel"
    exported = export_clip(root / "fsdp" / "final", tmp_path / "clip")
    clip = CLIPModel.from_pretrained(exported)
    weights = load_file(root / "fsdp" / "final" / "model.safetensors")
    assert torch.equal(clip.logit_scale, weights["clip.logit_scale"])
    assert torch.equal(clip.visual_projection.weight, weights["clip.visual_projection.weight"])


# ------------------------------------------------------------------------------------------------ refusals
def _accelerator(distributed_type="MULTI_CPU", num_processes=2, mixed_precision="no", fsdp_version=None):
    from accelerate import DistributedType

    plugin = SimpleNamespace(fsdp_version=fsdp_version)
    return SimpleNamespace(
        distributed_type=DistributedType[distributed_type], num_processes=num_processes,
        mixed_precision=mixed_precision, state=SimpleNamespace(fsdp_plugin=plugin),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "accelerator", "message"),
    [
        ({"fsdp": True}, {"num_processes": 1}, "launch 2 or more"),
        ({"fsdp": True}, {"mixed_precision": "fp16"}, "use bf16"),
        ({"fsdp": True, "compile": True}, {}, "--compile"),
        ({"fsdp": True}, {"distributed_type": "FSDP", "fsdp_version": 2}, "use one of them"),
        ({}, {"distributed_type": "FSDP", "fsdp_version": 1}, "fsdp_version: 2"),
    ],
)
def test_sharding_setups_that_cannot_work_are_refused(flags, accelerator, message):
    from training_fsdp import check_sharding_setup
    from training_guards import UsageError

    args = SimpleNamespace(**{"fsdp": False, "compile": False, **flags})
    with pytest.raises(UsageError, match=message):
        check_sharding_setup(args, _accelerator(**accelerator))
    check_sharding_setup(
        SimpleNamespace(fsdp=False, compile=False), _accelerator(distributed_type="FSDP", fsdp_version=2)
    )
    check_sharding_setup(SimpleNamespace(fsdp=True, compile=False), _accelerator(mixed_precision="bf16"))
