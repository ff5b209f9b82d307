"""Search a dataset's test images with a fine-tuned EntityCLIP folder, loaded the way a Hub user would load it.

The model and processor are loaded with `AutoModel` / `AutoProcessor` and `trust_remote_code=True` BEFORE anything
of this package is imported, so they run from the code files saved beside the weights (as for someone who has only
the folder or the Hub repository); the package is then used only for the data loader and the search helpers.

    python examples/search_demo.py outputs/demo/best --dataset_root outputs/demo/data
    python examples/search_demo.py outputs/demo/best --dataset_root outputs/demo/data --query "Oren Ambrose in Tessaly"
"""

import argparse
import time

import torch
from transformers import AutoModel, AutoProcessor


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a save_pretrained folder (e.g. a training run's best/) or a Hub repository id")
    parser.add_argument("--dataset", default="jsonl", help="load_entity_dataset name (a finetune demo run: jsonl)")
    parser.add_argument("--dataset_root", required=True, help="the dataset's folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--query", action="append", help="a text query (repeatable); default: 3 of the split's texts")
    parser.add_argument("--top_k", type=int, default=5)
    args = parser.parse_args(argv)

    started = time.time()
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    print(f"loaded {type(model).__module__}.{type(model).__name__} and {type(processor).__name__} from {args.model}")

    from entityclip_hf.data import load_entity_dataset
    from entityclip_hf.retrieval import EmbeddingIndex, encode_images, encode_texts

    gallery = load_entity_dataset(args.dataset, args.dataset_root)[args.split]
    index = EmbeddingIndex(encode_images(model, processor, gallery, progress=False))
    texts, ids = gallery["text"], gallery["id"]
    queries = args.query or [texts[i] for i in range(0, len(texts), max(1, len(texts) // 3))][:3]
    hits = index.search(encode_texts(model, processor, queries, progress=False), k=min(args.top_k, len(index)))
    print(f"{len(index)} {args.split} images indexed in {time.time() - started:.1f} s")
    for query, scores, rows in zip(queries, hits.scores.tolist(), hits.indices.tolist(), strict=True):
        print(f'\nquery: "{query}"')
        for rank, (score, row) in enumerate(zip(scores, rows, strict=True), start=1):
            mark = "  <- described by the query" if texts[row] == query else ""
            print(f"  {rank}. {score:.3f}  {ids[row]}: {texts[row]}{mark}")


if __name__ == "__main__":
    main()
