#!/usr/bin/env bash
# The main job on the built-in demo dataset, on a laptop CPU in a few minutes: fine-tune a tiny EntityCLIP with
# `accelerate launch examples/finetune.py`, print validation R@K before and after, save best/ and final/, then reload
# best/ in a fresh process through AutoModel (trust_remote_code) and search the test images with text queries.
#
#   bash examples/demo.sh                      # outputs in outputs/demo
#   OUT=/tmp/demo bash examples/demo.sh --num_epochs=4      # extra flags go to finetune.py
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/demo}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # nothing here needs the Hub
start=$(date +%s)

accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    examples/finetune.py --config examples/configs/demo.json --output_dir "$OUT" --overwrite_output_dir "$@"

python examples/search_demo.py "$OUT/best" --dataset jsonl --dataset_root "$OUT/data" --top_k 5

echo "demo finished in $(( $(date +%s) - start )) s"
