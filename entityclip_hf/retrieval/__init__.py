"""Retrieval with EntityCLIP: encode galleries to embedding files, search them, rerank the top hits with GI-ITM.

EntityCLIP retrieves with its fine-tuned CLIP embeddings (the experts only shape training), so a gallery is encoded
once, stored as a safetensors file with its ids, and searched with a matrix product per query block. The GI-ITM head
(`EntityCLIPModel.match_probability`) can then rerank a query's top-k candidates.

    from entityclip_hf.retrieval import EmbeddingIndex, encode_images, encode_texts, rerank_with_itm, save_embeddings

    gallery = encode_images(model, processor, dataset["image"] or a list of images/paths, batch_size=64)
    save_embeddings("gallery.safetensors", gallery, ids=dataset["id"])
    index = EmbeddingIndex.from_file("gallery.safetensors")
    hits = index.search(encode_texts(model, processor, ["Angela Merkel in Aachen"]), k=20)

Works with plain `CLIPModel` checkpoints too (for baselines); reranking needs EntityCLIP's ITM head. From the
command line: `entityclip-search {encode,search} --help` (or `python -m entityclip_hf.retrieval`).

One module per role: `encode` (images, texts, explanations -> embeddings), `embeddings` (embedding files),
`index` (search), `rerank` (GI-ITM), `cli` (entityclip-search).
"""


from __future__ import annotations

from .cli import main, run
from .embeddings import EMBEDDINGS_FORMAT, StoredEmbeddings, load_embeddings, save_embeddings
from .encode import encode_explanations, encode_images, encode_texts, fuse_explanation_embeddings
from .index import EmbeddingIndex, SearchResults, add_embeddings_column, faiss_available
from .rerank import RankedCandidate, match_probabilities, rerank_texts_with_itm, rerank_with_itm

__all__ = [
    "EMBEDDINGS_FORMAT",
    "EmbeddingIndex",
    "RankedCandidate",
    "SearchResults",
    "StoredEmbeddings",
    "add_embeddings_column",
    "encode_explanations",
    "encode_images",
    "encode_texts",
    "faiss_available",
    "fuse_explanation_embeddings",
    "load_embeddings",
    "main",
    "match_probabilities",
    "rerank_texts_with_itm",
    "rerank_with_itm",
    "run",
    "save_embeddings",
]
