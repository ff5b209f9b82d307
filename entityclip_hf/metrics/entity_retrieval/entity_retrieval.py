"""evaluate module for EntityCLIP's image-text retrieval protocol (R@K, median/mean rank, rsum; chunked).

Load it offline from the installed package::

    import evaluate
    from entityclip_hf.metrics import RETRIEVAL_METRIC_PATH

    metric = evaluate.load(RETRIEVAL_METRIC_PATH)

The computation is :func:`entityclip_hf.metrics.retrieval_metrics`, imported from the package (the one
implementation): evaluate's dependency check sees ``entityclip_hf`` as a library this script needs, so the package
must be installed (editable or not) where the metric is loaded.
"""

import datasets
import evaluate

from entityclip_hf.metrics import DEFAULT_KS, DEFAULT_TIE_TOLERANCE, retrieval_metrics

_CITATION = """\
@inproceedings{wang2025entityclip,
  author={Yaxiong Wang and Lianwei Wu and Lechao Cheng and Zhun Zhong and Meng Wang},
  title={Beyond General Alignment: Fine-Grained Entity-Centric Image-Text Matching with Multimodal Attentive Experts},
  booktitle={Proceedings of the International ACM SIGIR Conference on Research and Development in Information Retrieval (SIGIR 2025)},
  year={2025},
  note={arXiv:2410.17810}
}
"""

_DESCRIPTION = """\
Image-text retrieval with one gallery per split: row i of `image_embeds` and row i of `text_embeds` are a pair, and
each query's only positive is its own pair. Scores both directions (image->text `i2t_`, text->image `t2i_`):
R@K in percent, the median rank (floor of the median, as the released EntityCLIP code) and the mean rank (1-based),
and rsum = R@1 + R@5 + R@10 of both directions. Ties count against the query (rank = 1 + number of OTHER items
scoring >= the positive, up to `tie_tolerance`), so a collapsed model with identical embeddings scores rank N,
not R@1 = 100.
Computed in blocks of `chunk_size` queries x gallery items: the N x N similarity matrix is never built.
"""

_KWARGS_DESCRIPTION = """
Args:
    image_embeds: list of N image embeddings (each a list/array of D floats); row i pairs with text i.
    text_embeds: list of N text embeddings (D floats each), same order.
    chunk_size (int, default 4096): rows per block; bounds the working memory (~5 * chunk_size**2 bytes).
    ks (tuple of int, default (1, 5, 10, 50, 100)): recall cut-offs; R@K with K >= N is 100.
    normalize (bool, default True): cosine similarity (True, as the paper) or raw dot product (False).
    device (str, optional): where the matrix products run (default: CPU).
    tie_tolerance (float, default 1e-6): items scoring within tie_tolerance * max(1, |positive|) below the positive
        tie with it (float32 products round equal dot products differently by block shape); 0 compares exactly.
    explanation_embeds (list of N embeddings, optional; a row of NaN: no explanation): each text's explanation
        embedding; given, texts are fused with their explanation, normalize((1 - w) t + w e), in both directions.
    explanation_weight (float, default 0.5): w of that fusion.
Returns:
    dict with `i2t_R@K` and `t2i_R@K` for each K, `i2t_median_rank`, `i2t_mean_rank`, `t2i_median_rank`,
    `t2i_mean_rank` and `rsum`.
Examples:
    >>> import evaluate
    >>> from entityclip_hf.metrics import RETRIEVAL_METRIC_PATH
    >>> metric = evaluate.load(RETRIEVAL_METRIC_PATH)
    >>> metric.add_batch(image_embeds=[[1.0, 0.0], [0.0, 1.0]], text_embeds=[[0.9, 0.1], [0.2, 0.8]])
    >>> metric.add_batch(image_embeds=[[-1.0, 0.0]], text_embeds=[[-0.7, -0.1]])
    >>> results = metric.compute(ks=(1, 5))
    >>> results["i2t_R@1"], results["t2i_median_rank"], results["rsum"]
    (100.0, 1.0, 600.0)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EntityRetrieval(evaluate.Metric):
    """Image-text retrieval metrics of EntityCLIP (both directions, one gallery, pessimistic ties)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "image_embeds": datasets.List(datasets.Value("float32")),
                    "text_embeds": datasets.List(datasets.Value("float32")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2410.17810", "https://github.com/wangyxxjtu/ETE"],
        )

    def _compute(
        self,
        image_embeds,
        text_embeds,
        chunk_size=4096,
        ks=DEFAULT_KS,
        normalize=True,
        device=None,
        tie_tolerance=DEFAULT_TIE_TOLERANCE,
        explanation_embeds=None,
        explanation_weight=0.5,
    ):
        return retrieval_metrics(
            image_embeds,
            text_embeds,
            chunk_size=chunk_size,
            ks=ks,
            normalize=normalize,
            device=device,
            tie_tolerance=tie_tolerance,
            explanation_embeds=explanation_embeds,
            explanation_weight=explanation_weight,
        )
