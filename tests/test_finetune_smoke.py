"""examples/finetune.py end to end on tiny things: configuration, model sources, outputs, reload, bad data, Hub push."""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoUrl

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))
import finetune  # noqa: E402

SMALL = [
    "--dataset", "demo", "--demo_entities", "8", "--demo_captions", "8",  # 48 / 8 / 8 pairs
    "--tiny_hidden_size", "32", "--tiny_image_size", "32", "--tiny_patch_size", "8",
    "--batch_size", "8", "--eval_batch_size", "8", "--learning_rate", "5e-4",
]  # fmt: skip


def run(script, *args, expect=0, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True, text=True)
    assert result.returncode == expect, result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from entityclip_hf.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("smoke") / "data", num_entities=8, captions_per_entity=8)


@pytest.fixture
def fresh_accelerate_state():
    """In-process runs share Accelerate's process-wide state: reset it so that nothing leaks into other tests."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_distributed_setup_checks_the_process_count():
    from types import SimpleNamespace

    from accelerate import DistributedType

    finetune.check_distributed_setup(SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_GPU), 2)
    with pytest.raises(RuntimeError, match="2 processes launched but Accelerate sees 1"):
        finetune.check_distributed_setup(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO), 2)


def test_fsdp_still_refuses_clip_s_scalar_logit_scale(tiny_clip_config, tmp_path):
    """Why `entityclip_hf.fsdp` reshapes 0-dim parameters: if a torch release lifts the restriction, this fails and
    the reshaping can go."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="scalar parameters"):
            fully_shard(
                EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config)), mesh=init_device_mesh("cpu", (1,))
            )
    finally:
        dist.destroy_process_group()


def test_load_model_folder_loads_best_weights_in_place(tiny_clip_config, tmp_path):
    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

    torch.manual_seed(0)
    EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config)).save_pretrained(tmp_path / "best")
    torch.manual_seed(1)
    model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config))
    finetune.load_model_folder(model, str(tmp_path / "best"))
    saved = EntityCLIPModel.from_pretrained(tmp_path / "best").state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- configuration
def test_config_file_then_command_line_overrides(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"_note": "comments start with _", "learning_rate": 0.5, "batch_size": 3}))
    args = finetune.parse_args(["--config", str(config), "--batch_size=7", "--gradient_checkpointing"])
    assert args.learning_rate == 0.5, "from the file"
    assert args.batch_size == 7, "the command line wins"
    assert args.gradient_checkpointing is True and args.num_epochs == 1, "flags and defaults"
    config.write_text(json.dumps({"learnig_rate": 0.5}))
    with pytest.raises(SystemExit):
        finetune.parse_args(["--config", str(config)])  # a typo is an error, not a silently ignored key
    with pytest.raises(SystemExit):
        finetune.parse_args(["--push_to_hub"])  # needs --hub_model_id


def test_head_learning_rate_applies_to_entityclip_layers_only(tiny_clip_config):
    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

    model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config))
    names = {id(param): name for name, param in model.named_parameters()}

    def learning_rates(flags):
        optimizer = finetune.make_optimizer(finetune.parse_args(flags), model, torch.device("cpu"))
        return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}

    default = learning_rates(["--learning_rate", "1e-4"])
    assert set(default.values()) == {1e-4}, "the paper: one learning rate"
    assert len(default) == len(names), "every parameter is optimised once"
    split = learning_rates(["--learning_rate", "1e-4", "--head_learning_rate", "1e-3"])
    assert {lr for name, lr in split.items() if name.startswith("clip.")} == {1e-4}
    assert {lr for name, lr in split.items() if not name.startswith("clip.")} == {1e-3}
    assert split["itm_head.weight"] == 1e-3 and split["clip.logit_scale"] == 1e-4
    with pytest.raises(SystemExit):
        finetune.parse_args(["--head_learning_rate", "0"])


def test_paper_config_is_the_released_recipe():
    args = finetune.parse_args(["--config", str(EXAMPLES / "configs" / "paper_vitb32.json")])
    assert args.model == "openai/clip-vit-base-patch32" and args.dataset == "n24news"
    assert (args.batch_size, args.learning_rate, args.num_epochs, args.seed) == (192, 1e-5, 20, 42)
    assert (args.lr_scheduler, args.warmup_steps, args.weight_decay) == ("cosine", 0, 0.0)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)  # torch's Adam defaults
    assert (args.beta, args.gamma) == (0.1, 0.1)
    assert args.best_metric == "contrastive_loss", "the paper keeps the lowest validation contrastive loss"


def test_demo_config_parses():
    args = finetune.parse_args(["--config", str(EXAMPLES / "configs" / "demo.json")])
    assert args.model == "tiny" and args.dataset == "demo" and not args.push_to_hub


def test_no_weight_decay_on_biases_norms_and_logit_scale(tiny_clip_config):
    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

    model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config))
    args = finetune.parse_args(["--weight_decay", "0.1"])
    decay, no_decay = finetune.make_optimizer(args, model, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert len(decayed) + len(not_decayed) == len(names)
    assert "clip.logit_scale" in not_decayed
    assert {"vision_experts.ln_1_weight", "vision_experts.query_bias", "image_gate.bias"} <= not_decayed
    assert not any("bias" in n or "norm" in n for n in decayed), sorted(decayed)
    assert {"vision_experts.query_weight", "itm_head.weight", "clip.text_projection.weight"} <= decayed


# ---------------------------------------------------------------------------------------------- the main job
def test_train_evaluate_save_then_reload_in_a_fresh_process(tmp_path, data_root):
    out = tmp_path / "run"
    output = run(
        EXAMPLES / "finetune.py", *SMALL, "--dataset_root", data_root, "--output_dir", out,
        "--max_steps", 6, "--eval_every", 3, "--report_to", "tensorboard",
    )  # fmt: skip
    assert "eval step 0: i2t R@1" in output and "eval step 6: i2t R@1" in output, "one line per evaluation"
    assert "validation before:" in output and "validation after:" in output
    results = json.loads((out / "results.json").read_text())
    assert results["initial"]["rsum"] >= 0 and results["final"]["rsum"] >= 0 and results["test"]["i2t_R@1"] >= 0
    assert results["final"]["contrastive_loss"] < results["initial"]["contrastive_loss"], "it learns"
    assert list(out.glob("**/events.out.tfevents*")), "TensorBoard tracker wrote events"
    for folder in ("best", "final"):
        assert {"config.json", "model.safetensors", "modeling_entityclip.py", "tokenizer.json"} <= {
            p.name for p in (out / folder).iterdir()
        }

    # A fresh process that loads best/ through AutoModel / AutoProcessor with trust_remote_code, then searches.
    output = run(EXAMPLES / "search_demo.py", out / "best", "--dataset", "jsonl", "--dataset_root", data_root)
    assert "loaded transformers_modules." in output, "the model ran from the code files saved beside the weights"
    assert output.count('query: "') == 3 and output.count("\n  5. ") == 3


def test_resuming_a_finished_run_trains_nothing_and_still_reports(tmp_path, data_root):
    steps = ["--max_steps", 3, "--test_split", "", "--output_dir", tmp_path / "run", "--dataset_root", data_root]
    run(EXAMPLES / "finetune.py", *SMALL, *steps)
    first = json.loads((tmp_path / "run" / "results.json").read_text())
    output = run(EXAMPLES / "finetune.py", *SMALL, *steps, "--resume")
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "trained to step 3" in output
    assert again["final"] == first["final"], "the same model, evaluated again"


def test_the_readme_main_job_script_runs_end_to_end(tmp_path):
    """examples/demo.sh, shortened to 2 epochs: accelerate launch, before/after R@K, test table, fresh-process search."""
    env = {
        **os.environ,
        "OUT": str(tmp_path / "demo"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's accelerate and python
    }
    result = subprocess.run(
        ["bash", str(EXAMPLES / "demo.sh"), "--num_epochs=2"], env=env, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for expected in ("validation before:", "validation after:", "test split, best/", "loaded transformers_modules."):
        assert expected in output, expected
    assert output.count('query: "') == 3 and "demo finished in" in output


def test_a_new_run_refuses_an_used_output_dir(tmp_path, data_root, fresh_accelerate_state, capsys):
    (tmp_path / "checkpoints" / "step_3").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:  # would silently mix two runs' checkpoints
        finetune.main([*SMALL, "--dataset_root", str(data_root), "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "holds an earlier run" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "step_3").exists(), "nothing deleted without --overwrite_output_dir"


def test_overwrite_output_dir_deletes_only_the_earlier_run(tmp_path, data_root):
    (tmp_path / "checkpoints" / "step_3").mkdir(parents=True)
    (tmp_path / "entityclip").mkdir()
    (tmp_path / "entityclip" / "events.out.tfevents.old").write_text("old run")
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("the user's own file")
    steps = ["--max_steps", 1, "--eval_split", "", "--test_split", "", "--dataset_root", data_root]
    run(EXAMPLES / "finetune.py", *SMALL, *steps, "--output_dir", tmp_path, "--overwrite_output_dir")
    assert not (tmp_path / "checkpoints" / "step_3").exists() and (tmp_path / "checkpoints" / "step_1").exists()
    assert not (tmp_path / "entityclip" / "events.out.tfevents.old").exists(), "old TensorBoard events do not mix in"
    assert json.loads((tmp_path / "results.json").read_text())["best_step"] is None
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"


def test_start_from_a_clip_checkpoint_then_continue_in_bf16_with_checkpointing(tmp_path, data_root, tiny_processor):
    from transformers import CLIPModel

    from entityclip_hf.tiny_models import tiny_clip_config

    clip_folder = tmp_path / "clip"
    CLIPModel(tiny_clip_config(tiny_processor.tokenizer)).save_pretrained(clip_folder)
    tiny_processor.tokenizer.save_pretrained(clip_folder)
    tiny_processor.image_processor.save_pretrained(clip_folder)
    steps = ["--max_steps", 2, "--eval_split", "", "--test_split", ""]
    run(EXAMPLES / "finetune.py", *SMALL, *steps, "--dataset_root", data_root, "--model", clip_folder,
        "--output_dir", tmp_path / "from_clip")  # fmt: skip
    config = json.loads((tmp_path / "from_clip" / "final" / "config.json").read_text())
    assert config["model_type"] == "entityclip"

    output = run(
        EXAMPLES / "finetune.py", *SMALL, *steps, "--dataset_root", data_root,
        "--model", tmp_path / "from_clip" / "final", "--output_dir", tmp_path / "continued",
        "--mixed_precision", "bf16", "--gradient_checkpointing", "--gamma", "0.5",
    )  # fmt: skip
    assert '"mixed_precision": "bf16"' in output
    records = [json.loads(line) for line in (tmp_path / "continued" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert json.loads((tmp_path / "continued" / "final" / "config.json").read_text())["gamma"] == 0.5


def test_best_holds_the_weights_of_the_best_evaluation_and_logit_scale_stays_clamped(
    tmp_path, data_root, tiny_processor
):
    import math

    from safetensors.torch import load_file
    from transformers import CLIPModel

    from entityclip_hf.tiny_models import tiny_clip_config

    clip = CLIPModel(tiny_clip_config(tiny_processor.tokenizer))
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)  # far above the clamp, log(100): the first step must bring it back
    clip.save_pretrained(tmp_path / "clip")
    tiny_processor.tokenizer.save_pretrained(tmp_path / "clip")
    tiny_processor.image_processor.save_pretrained(tmp_path / "clip")
    out = tmp_path / "run"
    run(
        EXAMPLES / "finetune.py", *SMALL, "--dataset_root", data_root, "--model", tmp_path / "clip",
        "--output_dir", out, "--max_steps", 6, "--eval_every", 2, "--save_every", 2, "--keep_checkpoints", 3,
        "--best_metric", "contrastive_loss", "--test_split", "",
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["eval/contrastive_loss"]) for r in records if "eval/contrastive_loss" in r]
    assert [step for step, _ in losses] == [0, 2, 4, 6]
    best_step = min(losses, key=lambda item: item[1])[0]  # the lowest; min() keeps the first of equal values
    assert best_step > 0, "training lowered the validation loss"
    best = load_file(out / "best" / "model.safetensors")
    at_best_step = load_file(out / "checkpoints" / f"step_{best_step}" / "model.safetensors")
    assert best.keys() == at_best_step.keys()
    assert all(torch.equal(best[name], at_best_step[name]) for name in best), f"best/ is the model of step {best_step}"
    for folder in ("best", "final"):
        logit_scale = load_file(out / folder / "model.safetensors")["clip.logit_scale"]
        assert logit_scale.item() <= math.log(100) + 1e-6, f"{folder}: clamped after each optimizer step"


def test_compile_trains_like_eager_and_saves_plain_weight_names(tmp_path, data_root):
    from safetensors import safe_open

    inductor_cache = tmp_path / "inductor"

    def train(name, *flags):
        steps = ["--max_steps", 2, "--eval_split", "", "--test_split", "", "--output_dir", tmp_path / name]
        env = {"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}  # its own cache: shows that inductor really compiled
        run(EXAMPLES / "finetune.py", *SMALL, *steps, "--dataset_root", data_root, *flags, env=env)
        log = (tmp_path / name / "train_log.jsonl").read_text().splitlines()
        losses = [json.loads(line)["train/loss"] for line in log if "train/loss" in line]
        with safe_open(tmp_path / name / "final" / "model.safetensors", "pt") as weights:
            return losses, set(weights.keys())

    eager_losses, eager_names = train("eager")
    assert not any(inductor_cache.rglob("*.py")), "the eager run compiles nothing"
    compiled_losses, compiled_names = train("compiled", "--compile")
    assert any(inductor_cache.rglob("*.py")), "inductor generated kernels"
    assert compiled_names == eager_names, "compiled encoders keep the model's weight names (no _orig_mod.)"
    assert len(compiled_losses) == 2
    # Same seed, same batches: inductor's kernels round differently, nothing more.
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-3, atol=1e-4)


def test_an_undecodable_image_does_not_stop_training(tmp_path, data_root):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    first = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    image = data / first["image"]
    image.write_bytes(image.read_bytes()[:400])  # truncated: unreadable at training time
    output = run(
        EXAMPLES / "finetune.py", *SMALL, "--dataset", "jsonl", "--dataset_root", data, "--output_dir", tmp_path / "o",
        "--num_epochs", 1, "--eval_split", "", "--test_split", "", "--check_images", "none",  # broke after loading
    )  # fmt: skip
    assert first["id"] in output and "replaced by good rows" in output, "the bad row is named"
    records = [json.loads(line) for line in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 7)), "every step of the epoch ran"


def test_push_to_hub_uploads_best_with_a_card(tmp_path, data_root, fresh_accelerate_state):
    uploaded = {}

    def create_commit(api, repo_id, operations, **kwargs):
        uploaded.update({op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})
        return mock.sentinel.commit

    with (
        mock.patch.object(HfApi, "create_repo", autospec=True, return_value=RepoUrl("https://hf.co/me/demo")),
        mock.patch.object(HfApi, "create_commit", autospec=True, side_effect=create_commit),
    ):
        results = finetune.main(
            [*SMALL, "--dataset_root", str(data_root), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
             "--push_to_hub", "--hub_model_id", "me/demo"]
        )  # fmt: skip
    assert {"model.safetensors", "config.json", "modeling_entityclip.py", "README.md"} <= set(uploaded)
    card = uploaded["README.md"].decode()
    assert f"{results['test']['i2t_R@1']:.1f}" in card, "the card carries the test metrics of best/"
    # The Hub reads the metrics from the card's model-index metadata.
    from huggingface_hub import ModelCard

    eval_results = ModelCard(card).data.eval_results
    by_name = {(r.dataset_split, r.metric_type): r.metric_value for r in eval_results}
    assert by_name[("test", "rsum")] == pytest.approx(results["test"]["rsum"], abs=0.01)
    assert by_name[("test", "i2t_r@1")] == pytest.approx(results["test"]["i2t_R@1"], abs=0.01)
    assert {r.dataset_name for r in eval_results} == {"demo"}
