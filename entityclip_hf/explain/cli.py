"""``entityclip-explain``: the command line over the explanation package.

``entityclip-explain --input ... --cache ... (--model PATH | --server URL [URL ...])`` generates; the subcommands
``export-batch``, ``import-batch`` and ``merge`` handle OpenAI Batch files and sharded caches.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from .backends.base import Explainer
from .backends.openai_http import OpenAICompatibleExplainer
from .backends.transformers import TransformersExplainer
from .batch import DEFAULT_REQUESTS_PER_FILE, export_batch, import_batch
from .cache import CacheLockedError
from .inputs import read_texts
from .prompt import PROMPT_VERSION
from .results import DEFAULT_MAX_ANSWER_CHARS
from .run import DEFAULT_MAX_CONSECUTIVE_FAILURES, CircuitBreakerOpen, ExplainInterrupted, explain_texts
from .shards import merge_caches, parse_shard

logger = logging.getLogger("entityclip_hf.explain")

SUBCOMMANDS = ("export-batch", "import-batch", "merge")
EXIT_CIRCUIT_BREAKER = 3


def _shard(value: str) -> tuple[int, int]:
    try:
        return parse_shard(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help="JSON-lines, JSON or plain-text file(s) of texts")
    parser.add_argument("--text-field", default="text", help="field holding the text in JSON records")
    parser.add_argument("--cache", required=True, help="JSON-lines cache file (created or appended to)")
    parser.add_argument("--limit", type=int, help="only the first N distinct texts")
    parser.add_argument(
        "--shard", type=_shard, help="i/N: only the texts of shard i of N (0-based, by a stable text hash)"
    )
    parser.add_argument("--no-retry-failed", action="store_true", help="skip texts whose earlier attempts failed")


def _add_answer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-answer-chars",
        type=int,
        default=DEFAULT_MAX_ANSWER_CHARS,
        help="a longer answer is recorded as a failure (0: no cap)",
    )
    parser.add_argument(
        "--truncate-long-answers", action="store_true", help="cut an answer over --max-answer-chars instead"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entityclip-explain",
        description="Generate LLM explanations of the entities in texts into a resumable JSON-lines cache. "
        f"Subcommands: {', '.join(SUBCOMMANDS)} (entityclip-explain SUBCOMMAND --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_selection_arguments(parser)
    backend = parser.add_mutually_exclusive_group(required=True)
    backend.add_argument("--model", help="local causal LM for --backend: a folder or a hub name")
    backend.add_argument(
        "--server",
        nargs="+",
        action="extend",
        help="OpenAI-compatible server URL(s), e.g. http://127.0.0.1:8000; several are load-balanced",
    )
    parser.add_argument(
        "--backend", choices=("transformers", "vllm"), default="transformers", help="engine running --model"
    )
    parser.add_argument("--server-model", help="model name the server serves (required with --server)")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat", help="server API to call")
    # No default shown here: --help must never print a key taken from the environment.
    parser.add_argument("--api-key", help="server API key; default: the OPENAI_API_KEY environment variable")
    parser.add_argument("--model-name", help="name recorded in the cache (default: --model or --server-model)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="longest explanation, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    parser.add_argument(
        "--batch-size", type=int, help="texts per generate call (local model; default 8, 512 with vllm)"
    )
    parser.add_argument("--device", default="auto", help="transformers device: auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--device-map", help="spread a large transformers model over devices, e.g. 'auto'")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: share of GPU memory")
    parser.add_argument("--max-model-len", type=int, help="vllm: context length (default: the model's)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the local model's own code")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (server)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="total seconds for each server request (connect + answer)"
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="retries on connection errors (resets too), timeouts, 429, 5xx"
    )
    parser.add_argument(
        "--max-consecutive-failures",
        type=int,
        default=DEFAULT_MAX_CONSECUTIVE_FAILURES,
        help=f"stop (exit code {EXIT_CIRCUIT_BREAKER}) after this many failures in a row; 0: never",
    )
    _add_answer_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)


def _check_common(parser: argparse.ArgumentParser, args) -> None:
    if args.limit is not None and args.limit < 0:
        parser.error("--limit must be >= 0")
    if getattr(args, "max_answer_chars", 1) < 0:
        parser.error("--max-answer-chars must be >= 0 (0: no cap)")


def _build_explainer(parser: argparse.ArgumentParser, args) -> tuple[Explainer, str]:
    if args.server:
        explainer = OpenAICompatibleExplainer(
            args.server,
            args.server_model,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
            endpoint=args.endpoint,
            model_id=args.model_name,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            timeout=args.timeout,
            retries=args.retries,
            concurrency=args.concurrency,
        )
        return explainer, f"{', '.join(explainer.urls)} (model {args.server_model}, concurrency {args.concurrency})"
    if args.backend == "vllm":
        from .backends.vllm import VLLMExplainer

        batch_size = args.batch_size or 512
        explainer = VLLMExplainer(
            args.model,
            model_id=args.model_name,
            batch_size=batch_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            trust_remote_code=args.trust_remote_code,
        )
        template = "chat template" if explainer.uses_chat_template else "plain prompt"
        return explainer, f"{args.model} on vLLM ({template}, batch size {batch_size})"
    batch_size = args.batch_size or 8
    explainer = TransformersExplainer(
        args.model,
        model_id=args.model_name,
        batch_size=batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
    )
    template = "chat template" if explainer.uses_chat_template else "plain prompt"
    return explainer, f"{args.model} on {explainer.model.device} ({template}, batch size {batch_size})"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns 0 when every text has an explanation, 1 when some failed, 130 if stopped,
    3 when the circuit breaker stopped the run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.server and not args.server_model:
        parser.error("--server needs --server-model (the model name the server serves)")
    if args.server and args.backend != "transformers":
        parser.error("--backend chooses the engine for --model; with --server the server is the engine")
    _check_common(parser, args)
    # A Hub id is 'name' or 'user/name': anything else that does not exist is a missing folder.
    if args.model and not os.path.exists(os.path.expanduser(args.model)):
        if os.path.isabs(args.model) or args.model.startswith((".", "~")) or args.model.count("/") > 1:
            parser.error(f"--model {args.model}: no such folder")
    _configure_logging()

    try:
        texts = read_texts(args.input, args.text_field)
    except UnicodeDecodeError as error:  # which file, at which byte: the decoder only knows its buffer's position
        from ..data.formats import first_utf8_error

        located = (first_utf8_error(path) for path in args.input if os.path.isfile(path))
        parser.error(next((message for message in located if message), str(error)))
    except (OSError, ValueError) as error:
        parser.error(str(error))

    try:
        explainer, where = _build_explainer(parser, args)
    except ImportError as error:
        parser.error(str(error))
    except (OSError, ValueError) as error:  # a model folder or Hub id that cannot be loaded, a bad option value
        first_line = str(error).splitlines()[0] if str(error) else repr(error)
        parser.error(f"--model {args.model}: cannot load it: {first_line}" if args.model else first_line)
    shard = "" if args.shard is None else f" (shard {args.shard[0]}/{args.shard[1]})"
    print(
        f"entityclip-explain: {len(texts)} texts from {len(args.input)} file(s){shard} -> {args.cache}\n"
        f"  generator: {where}\n  cache key: model={explainer.model_id!r} prompt_version={PROMPT_VERSION!r}",
        flush=True,
    )

    # A scheduler's SIGTERM (preemption, timeout) goes the same orderly way as Ctrl-C.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if in_main_thread else None
    try:
        summary = explain_texts(
            texts,
            explainer,
            args.cache,
            retry_failed=not args.no_retry_failed,
            limit=args.limit,
            progress=not args.no_progress,
            shard=args.shard,
            max_answer_chars=args.max_answer_chars or None,
            truncate_long_answers=args.truncate_long_answers,
            max_consecutive_failures=args.max_consecutive_failures or None,
        )
    except ExplainInterrupted as interrupt:
        print(f"entityclip-explain: {interrupt.summary}", flush=True)
        print("entityclip-explain: everything finished is in the cache; rerun the same command to continue", flush=True)
        return 130
    except KeyboardInterrupt:  # before generation started: nothing to lose
        return 130
    except CircuitBreakerOpen as stopped:
        print(f"entityclip-explain: {stopped.summary}", flush=True)
        print(f"entityclip-explain: error: {stopped}", file=sys.stderr, flush=True)
        return EXIT_CIRCUIT_BREAKER
    except CacheLockedError as error:
        print(f"entityclip-explain: error: {error}", file=sys.stderr, flush=True)
        return 1
    except OSError as error:  # the cache cannot be opened or written (a folder, no permission, a full disk)
        print(f"entityclip-explain: error: cache {args.cache}: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm if previous_sigterm is not None else signal.SIG_DFL)
    print(f"entityclip-explain: {summary}", flush=True)
    for error in summary.errors:
        print(f"  failed: {error}", flush=True)
    return 1 if summary.failed else 0


def build_subcommand_parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"entityclip-explain {name}", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    if name == "export-batch":
        parser.description = "Write the texts a cache still lacks as OpenAI Batch requests (JSON lines)."
        _add_selection_arguments(parser)
        parser.add_argument("--output", required=True, help="request file to write (a sidecar .ids.jsonl beside it)")
        parser.add_argument("--server-model", required=True, help="the model name put in each request's body")
        parser.add_argument("--model-name", help="name recorded in the cache (default: --server-model)")
        parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
        parser.add_argument("--max-new-tokens", type=int, default=160, help="max_tokens of each request")
        parser.add_argument("--temperature", type=float, default=0.0)
        parser.add_argument(
            "--requests-per-file", type=int, default=DEFAULT_REQUESTS_PER_FILE, help="split into files of this size"
        )
    elif name == "import-batch":
        parser.description = "Read OpenAI Batch output (and error) files into a cache; importing twice adds nothing."
        parser.add_argument("--results", nargs="+", required=True, help="Batch output / error file(s)")
        parser.add_argument("--requests", nargs="+", required=True, help="the request file(s) export-batch wrote")
        parser.add_argument("--cache", required=True, help="JSON-lines cache file (created or appended to)")
        _add_answer_arguments(parser)
    else:
        parser.description = (
            "Merge caches (files or folders of *.jsonl, e.g. one per shard) into one file, written atomically: "
            "per (model, text) the current prompt version's ok record wins, then the later one."
        )
        parser.add_argument("sources", nargs="+", help="cache files or folders")
        parser.add_argument("--output", required=True, help="the merged cache file (replaced atomically)")
        parser.add_argument("--keep-failures", action="store_true", help="keep failures of texts with no ok record")
    return parser


def _subcommand(name: str, argv: list[str]) -> int:
    parser = build_subcommand_parser(name)
    args = parser.parse_args(argv)
    _configure_logging()
    try:
        if name == "merge":
            counts = merge_caches(args.sources, args.output, keep_failures=args.keep_failures)
            print(
                f"entityclip-explain merge: {counts['records_read']} records from {counts['files']} file(s) -> "
                f"{counts['written']} records ({counts['ok']} explanations) in {args.output}",
                flush=True,
            )
            return 0
        if name == "export-batch":
            _check_common(parser, args)
            texts = read_texts(args.input, args.text_field)
            written = export_batch(
                texts,
                args.cache,
                args.output,
                args.server_model,
                model_id=args.model_name,
                endpoint=args.endpoint,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                retry_failed=not args.no_retry_failed,
                limit=args.limit,
                shard=args.shard,
                requests_per_file=args.requests_per_file,
            )
            files = ", ".join(str(path) for path in written.files) or "no file (nothing to ask)"
            print(
                f"entityclip-explain export-batch: {written.requests} requests ({written.skipped} already in the "
                f"cache, {written.unstorable} unstorable texts left out) -> {files}",
                flush=True,
            )
            return 0
        imported = import_batch(
            args.results,
            args.requests,
            args.cache,
            max_answer_chars=args.max_answer_chars or None,
            truncate_long_answers=args.truncate_long_answers,
        )
        print(f"entityclip-explain import-batch: {imported}", flush=True)
        for error in imported.errors:
            print(f"  failed: {error}", flush=True)
        if imported.unreadable:  # answers paid for and not in the cache: never a silent success
            print(
                f"entityclip-explain import-batch: error: {imported.unreadable} output line(s) not imported: not JSON, "
                "or a custom_id none of the --requests files knows (the request files of another export?); "
                "the warnings above name them",
                file=sys.stderr,
                flush=True,
            )
        return 1 if imported.failed or imported.unreadable else 0
    except (OSError, ValueError) as error:
        parser.error(str(error))
    except CacheLockedError as error:
        print(f"entityclip-explain {name}: error: {error}", file=sys.stderr, flush=True)
        return 1
