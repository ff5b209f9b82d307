"""``entityclip-explain``: the command line over the explanation package."""

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
from .cache import CacheLockedError
from .inputs import read_texts
from .prompt import PROMPT_VERSION
from .run import ExplainInterrupted, explain_texts

logger = logging.getLogger("entityclip_hf.explain")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entityclip-explain",
        description="Generate LLM explanations of the entities in texts into a resumable JSON-lines cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True, help="JSON-lines, JSON or plain-text file(s) of texts")
    parser.add_argument("--text-field", default="text", help="field holding the text in JSON records")
    parser.add_argument("--cache", required=True, help="JSON-lines cache file (created or appended to)")
    backend = parser.add_mutually_exclusive_group(required=True)
    backend.add_argument("--model", help="local transformers causal LM: a folder or a hub name")
    backend.add_argument("--server", help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--server-model", help="model name the server serves (required with --server)")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat", help="server API to call")
    # No default shown here: --help must never print a key taken from the environment.
    parser.add_argument("--api-key", help="server API key; default: the OPENAI_API_KEY environment variable")
    parser.add_argument("--model-name", help="name recorded in the cache (default: --model or --server-model)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="longest explanation, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per generate call (local model)")
    parser.add_argument("--device", default="auto", help="local model device: auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--device-map", help="spread a large local model over devices, e.g. 'auto' (accelerate)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the local model's own code")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (server)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each server answer")
    parser.add_argument("--retries", type=int, default=3, help="retries on connection errors, timeouts, 429, 5xx")
    parser.add_argument("--limit", type=int, help="only the first N distinct texts")
    parser.add_argument("--no-retry-failed", action="store_true", help="skip texts whose earlier attempts failed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns 0 when every text has an explanation, 1 when some failed, 130 if stopped."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.server and not args.server_model:
        parser.error("--server needs --server-model (the model name the server serves)")
    if args.limit is not None and args.limit < 0:
        parser.error("--limit must be >= 0")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)

    try:
        texts = read_texts(args.input, args.text_field)
    except (OSError, ValueError) as error:
        parser.error(str(error))

    try:
        if args.server:
            explainer: Explainer = OpenAICompatibleExplainer(
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
            where = f"{explainer.url} (model {args.server_model}, concurrency {args.concurrency})"
        else:
            explainer = TransformersExplainer(
                args.model,
                model_id=args.model_name,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                device=args.device,
                dtype=args.dtype,
                device_map=args.device_map,
                trust_remote_code=args.trust_remote_code,
            )
            template = "chat template" if explainer.uses_chat_template else "plain prompt"
            where = f"{args.model} on {explainer.model.device} ({template}, batch size {args.batch_size})"
    except ValueError as error:
        parser.error(str(error))
    print(
        f"entityclip-explain: {len(texts)} texts from {len(args.input)} file(s) -> {args.cache}\n"
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
        )
    except ExplainInterrupted as interrupt:
        print(f"entityclip-explain: {interrupt.summary}", flush=True)
        print("entityclip-explain: everything finished is in the cache; rerun the same command to continue", flush=True)
        return 130
    except KeyboardInterrupt:  # before generation started: nothing to lose
        return 130
    except CacheLockedError as error:
        print(f"entityclip-explain: error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm if previous_sigterm is not None else signal.SIG_DFL)
    print(f"entityclip-explain: {summary}", flush=True)
    for error in summary.errors:
        print(f"  failed: {error}", flush=True)
    return 1 if summary.failed else 0
