"""`entityclip-eval` and `entityclip-search encode` with 2 launched CPU processes (gloo) give what 1 process gives.

The gallery has an odd number of pairs (23, batches of 5): the processes encode 12 and 11 rows, so a padded last
batch would show up as a duplicated row. One launch per command (module fixture), run under the two launchers users
have: `accelerate launch -m entityclip_hf.evaluation` and `torchrun -m entityclip_hf.retrieval encode`; the
1-process references run in this process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from entityclip_hf import distributed

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
ACCELERATE += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
PAIRS = "23"


def launched(command):
    result = subprocess.run(command, env={**os.environ, **ENV}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    from entityclip_hf import EntityCLIPConfig, EntityCLIPModel
    from entityclip_hf.evaluation import run as evaluate
    from entityclip_hf.retrieval.cli import run as search
    from entityclip_hf.tiny_models import tiny_clip_config, tiny_processor

    root = tmp_path_factory.mktemp("distributed_evaluation")
    processor = tiny_processor()
    torch.manual_seed(0)
    model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config(processor.tokenizer)))
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    data = ["--root", str(root / "data"), "--max-samples", PAIRS, "--batch-size", "5", "--device", "cpu"]
    data += ["--no-progress"]
    common = ["--model", str(root / "model"), *data]
    evaluate([*common, "--dataset", "demo", "--output", str(root / "one.json")])  # also builds the demo data
    search(["encode", *common, "--images-from", "demo", "--output", str(root / "one.safetensors")])
    eval_stdout = launched(
        [
            *ACCELERATE,
            "-m",
            "entityclip_hf.evaluation",
            *common,
            "--dataset",
            "demo",
            "--output",
            str(root / "two.json"),
        ]
    )
    encode_stdout = launched(
        [*TORCHRUN, "-m", "entityclip_hf.retrieval", "encode", *common, "--images-from", "demo",
         "--output", str(root / "two.safetensors")]
    )  # fmt: skip
    return root, eval_stdout, encode_stdout


def test_evaluation_with_two_processes_gives_the_one_process_metrics(outputs):
    root, stdout, _ = outputs
    one, two = (json.loads((root / name).read_text()) for name in ("one.json", "two.json"))
    assert two["num_processes"] == 2 and "num_processes" not in one
    assert one["num_pairs"] == two["num_pairs"] == int(PAIRS)
    assert two["metrics"] == one["metrics"]
    assert stdout.count("rsum (R@1+R@5+R@10") == 1, "the main process alone prints the table"
    assert "x 2 processes" in stdout


def test_encode_with_two_processes_writes_the_one_process_file(outputs):
    from entityclip_hf.retrieval import load_embeddings

    root, _, stdout = outputs
    one, two = (load_embeddings(root / name) for name in ("one.safetensors", "two.safetensors"))
    assert two.ids == one.ids and len(set(two.ids)) == int(PAIRS), "in order, each row once"
    assert two.embeddings.shape == one.embeddings.shape == (int(PAIRS), 32)
    torch.testing.assert_close(two.embeddings, one.embeddings, rtol=0, atol=1e-6)
    assert two.metadata == one.metadata
    assert stdout.count("wrote 23 image embeddings") == 1


@pytest.mark.parametrize(("rows", "processes"), [(23, 2), (2, 3), (0, 2), (100, 7)])
def test_shards_cover_every_row_once_in_order(rows, processes):
    shards = [distributed.shard_range(rows, p, processes) for p in range(processes)]
    assert [row for shard in shards for row in shard] == list(range(rows))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
