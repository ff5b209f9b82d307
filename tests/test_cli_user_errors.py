"""Every user error of examples/finetune.py and the commands ends in one "error:" line and a non-zero exit status;
tracebacks are for bugs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))
import finetune  # noqa: E402

from entityclip_hf import evaluation as evaluation_cli  # noqa: E402
from entityclip_hf import explain, retrieval  # noqa: E402
from entityclip_hf.data import cli as data_cli  # noqa: E402


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.json").write_text('{"batch_size": 3,')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "latin.txt").write_bytes(b"Caf\xe9 in Z\xfcrich.\n")
    (tmp_path / "ok.txt").write_text("Merkel in Aachen.\n")
    (tmp_path / "run" / "checkpoints" / "step_3").mkdir(parents=True)
    return tmp_path


def error_line(capsys, prog: str) -> str:
    """The last line of stderr, which must be the one "error:" line (argparse may print its usage above it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{prog}: error: "), err
    return line


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--dataset", "n24news"], "--dataset n24news needs --dataset_root"),
        (["--dataset", "n24news", "--dataset_root", "{tmp}/nowhere"], "--dataset_root {tmp}/nowhere: no such folder"),
        (["--dataset", "n24news", "--dataset_root", "{tmp}/empty"], "n24news: no image folder imgs/ or images/ in"),
        # Not a layout: a datasets source, here a Hub id that the offline cache lacks.
        (
            ["--dataset", "nytimes"],
            "nytimes: not a dataset layout (demo, goodnews, jsonl, n24news, visualnews), no such",
        ),
        (
            ["--dataset", "{tmp}/no/such"],
            "not demo or a layout (demo, goodnews, jsonl, n24news, visualnews), no such file",
        ),
        (["--config", "{tmp}/missing.json"], "--config {tmp}/missing.json: [Errno 2] No such file"),
        (["--config", "{tmp}/broken.json"], "--config {tmp}/broken.json: Expecting property name"),
        (["--config", "{tmp}/list.json"], "expected a JSON object of flag values, got list"),
        (["--model", "{tmp}/no-model"], "--model {tmp}/no-model: no such folder"),
        (["--model", "{tmp}/empty"], "--model {tmp}/empty: cannot load it (Unrecognized model in"),
        (["--explanations", "{tmp}/gone.json"], "--explanations: no file or folder {tmp}/gone.json"),
        (["--resume", "{tmp}/empty"], "--resume {tmp}/empty: not a complete checkpoint (no trainer_state.json)"),
        (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
        (["--keep_checkpoints", "0"], "--keep_checkpoints must be >= 1, got 0"),
        (["--check_images", "full"], "argument --check_images: invalid choice: 'full'"),
        (["--output_dir", "{tmp}/run"], "{tmp}/run holds an earlier run (checkpoints): pass --resume"),
    ],
)
def test_finetune_user_errors(files, capsys, fresh_accelerate_state, arguments, message):
    tiny = ["--demo_entities", "4", "--demo_captions", "4", "--batch_size", "4", "--tiny_hidden_size", "32"]
    arguments = [argument.replace("{tmp}", str(files)) for argument in arguments]
    defaults = [] if "--output_dir" in arguments else ["--output_dir", str(files / "out")]
    with pytest.raises(SystemExit) as exit_info:
        finetune.main([*tiny, *defaults, *arguments])
    assert exit_info.value.code == 2
    assert message.replace("{tmp}", str(files)) in error_line(capsys, "finetune.py")
    assert (files / "run" / "checkpoints" / "step_3").exists(), "nothing deleted"


def test_finetune_user_error_in_a_fresh_process_has_no_traceback():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune.py"), "--dataset", "n24news"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "finetune.py: error: --dataset n24news needs --dataset_root (the folder holding its files)"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["n24news"], "n24news: pass the dataset folder as root. Expected layout: N24News/; news/nytimes_train.json"),
        (["n24news", "--root", "{tmp}/nowhere"], "n24news: no folder {tmp}/nowhere. Expected layout:"),
        (["jsonl", "--root", "{tmp}/empty"], "jsonl: no split file for train, validation, test"),
        (["jsonl", "--root", "{tmp}/empty", "--splits", "final"], "unknown split 'final'"),
        (["nytimes", "--root", "{tmp}"], "nytimes: not a dataset layout (demo, goodnews, jsonl, n24news, visualnews)"),
    ],
)
def test_entityclip_data_user_errors(files, capsys, arguments, message):
    assert data_cli.main([argument.replace("{tmp}", str(files)) for argument in arguments]) == 2
    assert message.replace("{tmp}", str(files)) in error_line(capsys, "entityclip-data")


def test_entityclip_data_missing_explanation_file_and_bad_numbers(files, capsys):
    root = files / "mine"
    root.mkdir()
    (root / "train.jsonl").write_text(json.dumps({"image": "a.jpg", "text": "A."}) + "\n")
    assert data_cli.main(["jsonl", "--root", str(root), "--explanations", str(files / "gone.json")]) == 2
    assert f"explanation file or folder not found: {files / 'gone.json'}" in error_line(capsys, "entityclip-data")
    with pytest.raises(SystemExit) as exit_info:
        data_cli.main(["jsonl", "--root", str(root), "--num-proc", "0"])
    assert exit_info.value.code == 2 and "--num-proc must be >= 1" in error_line(capsys, "entityclip-data")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_clip_config, tiny_processor):
    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config)).save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "{tmp}/no-model", "--dataset", "demo", "--root", "{tmp}/demo"], "--model: {tmp}/no-model: no such model folder"),
        (["--model", "{tmp}/empty", "--dataset", "demo", "--root", "{tmp}/demo"], "--model: Unrecognized model in {tmp}/empty"),
        (["--model", "{model}", "--dataset", "jsonl", "--root", "{tmp}/nowhere"], "jsonl: no folder {tmp}/nowhere. Expected layout:"),
        (["--model", "{model}", "--dataset", "jsonl"], "--dataset jsonl needs --root"),
        (["--model", "{model}", "--dataset", "demo", "--min-gallery-size", "0"], "--min-gallery-size must be >= 1"),
        (["--model", "{model}", "--dataset", "demo", "--device", "quantum"], "--device 'quantum'"),
    ],
)  # fmt: skip
def test_entityclip_eval_user_errors(files, model_folder, capsys, arguments, message):
    def fill(text):
        return text.replace("{tmp}", str(files)).replace("{model}", str(model_folder))

    with pytest.raises(SystemExit) as exit_info:
        evaluation_cli.run([*map(fill, arguments), "--no-progress"])
    assert exit_info.value.code not in (0, None)
    assert fill(message) in error_line(capsys, "entityclip-eval")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["search", "--model", "{tmp}/no-model", "--index", "{tmp}/x.safetensors", "--query", "a"], "{tmp}/no-model: no such model folder"),
        (["search", "--model", "{model}", "--index", "{tmp}/list.json", "--query", "a"], "list.json"),
        (["search", "--model", "{model}", "--index", "{tmp}/x.safetensors", "--query", "a", "--device", "quantum"], "--device 'quantum'"),
        (["encode", "--model", "{model}", "--images-from", "jsonl", "--root", "{tmp}/nowhere", "--output", "{tmp}/e.safetensors"], "no folder {tmp}/nowhere"),
    ],
)  # fmt: skip
def test_entityclip_search_user_errors(files, model_folder, capsys, arguments, message):
    def fill(text):
        return text.replace("{tmp}", str(files)).replace("{model}", str(model_folder))

    arguments = [*map(fill, arguments), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        retrieval.run(arguments)
    assert exit_info.value.code == 2
    assert fill(message) in error_line(
        capsys, f"entityclip-search {arguments[0]}" if "--device" not in arguments else "entityclip-search"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--input", "{tmp}/latin.txt"], "{tmp}/latin.txt: not UTF-8 text at byte offset 3: bytes b'\\xe9'"),
        (["--input", "{tmp}/missing.txt"], "No such file or directory"),
        (["--input", "{tmp}/broken.json"], "{tmp}/broken.json: not valid JSON"),
        (["--input", "{tmp}/ok.txt", "--model", "{tmp}/no-model"], "--model {tmp}/no-model: no such folder"),
        (["--input", "{tmp}/ok.txt", "--model", "{tmp}/empty"], "--model {tmp}/empty: cannot load it:"),
    ],
)
def test_entityclip_explain_user_errors(files, capsys, arguments, message):
    arguments = [argument.replace("{tmp}", str(files)) for argument in arguments]
    if "--model" not in arguments:
        arguments += ["--server", "http://127.0.0.1:9", "--server-model", "m"]
    with pytest.raises(SystemExit) as exit_info:
        explain.main([*arguments, "--cache", str(files / "cache.jsonl")])
    assert exit_info.value.code == 2
    assert message.replace("{tmp}", str(files)) in error_line(capsys, "entityclip-explain")


def test_entityclip_explain_cache_that_is_a_folder(files, capsys):
    arguments = ["--input", str(files / "ok.txt"), "--server", "http://127.0.0.1:9", "--server-model", "m"]
    assert explain.main([*arguments, "--cache", str(files / "empty"), "--retries", "0", "--no-progress"]) == 2
    assert f"cache {files / 'empty'}: [Errno 21] Is a directory" in error_line(capsys, "entityclip-explain")
