"""LLM explanations of the entities in texts, with a cache that survives crashes and reruns.

EntityCLIP trains with one explanation per text: who or what its entities are, what they look like, where and when.
This module generates them with any local ``transformers`` causal LM (batched, chat template when the model has one)
or any OpenAI-compatible HTTP server (vLLM, TGI, llama.cpp server) with bounded concurrency, timeouts and retries.

Results go to a JSON-lines cache, one object per line::

    {"model": str, "prompt_version": str, "text": str, "explanation": str | null, "ok": bool, "error": str | null}

The file is append-only (flush + fsync per batch), so a killed run loses nothing it already wrote, and a rerun skips
every text that already has an ``ok`` entry for the same (model, prompt version). Failed or empty generations are
recorded with ``ok: false`` and retried on the next run. ``read_explanation_cache`` is what the data loaders use.

Command line: ``entityclip-explain --input captions.jsonl --cache explanations.jsonl --model PATH`` (or
``--server http://127.0.0.1:8000 --server-model NAME``); see ``entityclip-explain --help``.

Layout (one file per role): ``prompt`` (the prompt and its version), ``results`` (one outcome and its checks),
``cache`` (the file), ``backends/`` (transformers, vLLM, OpenAI-compatible HTTP), ``run`` (``explain_texts``),
``batch`` (OpenAI Batch files), ``shards`` (splitting and merging), ``inputs`` (``read_texts``), ``cli``
(``entityclip-explain``). Every public name is importable from ``entityclip_hf.explain``.
"""

from .backends.base import Explainer
from .backends.openai_http import OpenAICompatibleExplainer
from .backends.transformers import TransformersExplainer
from .backends.vllm import VLLMExplainer
from .batch import custom_id_of, export_batch, import_batch
from .cache import CACHE_FIELDS, CacheLockedError, ExplanationCache, iter_cache_records, read_explanation_cache
from .cli import build_parser, main
from .inputs import read_texts
from .prompt import (
    PLAIN_PROMPT_TEMPLATE,
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    USER_PROMPT_TEMPLATE,
    build_messages,
    build_plain_prompt,
    clean_plain_continuation,
)
from .results import DEFAULT_MAX_ANSWER_CHARS, EMPTY_GENERATION_ERROR, ExplanationResult, cap_answer
from .run import CircuitBreakerOpen, ExplainInterrupted, ExplainSummary, explain_texts
from .shards import merge_caches, parse_shard, shard_of, text_hash

__all__ = [
    "CACHE_FIELDS",
    "DEFAULT_MAX_ANSWER_CHARS",
    "EMPTY_GENERATION_ERROR",
    "PLAIN_PROMPT_TEMPLATE",
    "PROMPT_VERSION",
    "SYSTEM_PROMPT",
    "USER_PROMPT_TEMPLATE",
    "CacheLockedError",
    "CircuitBreakerOpen",
    "ExplainInterrupted",
    "ExplainSummary",
    "Explainer",
    "ExplanationCache",
    "ExplanationResult",
    "OpenAICompatibleExplainer",
    "TransformersExplainer",
    "VLLMExplainer",
    "build_messages",
    "build_parser",
    "build_plain_prompt",
    "cap_answer",
    "clean_plain_continuation",
    "custom_id_of",
    "explain_texts",
    "export_batch",
    "import_batch",
    "iter_cache_records",
    "main",
    "merge_caches",
    "parse_shard",
    "read_explanation_cache",
    "read_texts",
    "shard_of",
    "text_hash",
]
