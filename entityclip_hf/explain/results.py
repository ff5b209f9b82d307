"""The outcome of one generation, and the checks every backend's outcome goes through before the cache."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .prompt import clean_plain_continuation

EMPTY_GENERATION_ERROR = "empty generation"


@dataclass(frozen=True)
class ExplanationResult:
    """The outcome of one generation: an explanation, or the error that prevented it."""

    text: str
    explanation: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.explanation)

    @classmethod
    def from_generation(cls, text: str, generated: str | None) -> ExplanationResult:
        """Wrap a model's output; an empty (or whitespace-only) output is a failure, never an explanation."""
        explanation = (generated or "").strip()
        if not explanation:
            return cls(text=text, error=EMPTY_GENERATION_ERROR)
        return cls(text=text, explanation=explanation)

    @classmethod
    def failure(cls, text: str, error: str) -> ExplanationResult:
        return cls(text=text, error=error or "unknown error")


DEFAULT_MAX_ANSWER_CHARS = 16384


def cap_answer(result: ExplanationResult, max_chars: int | None, truncate: bool = False) -> ExplanationResult:
    """Keep an answer within ``max_chars`` characters: a longer one becomes a failure, or is cut with ``truncate``.

    An explanation is a few sentences; a much longer answer is a model that did not stop or a server gone wrong,
    and storing it whole would bloat the cache and every dataset built from it. A cut answer ends at the last
    whitespace before the cap.
    """
    if max_chars is None or not result.ok or len(result.explanation) <= max_chars:
        return result
    if truncate:
        cut = result.explanation[:max_chars]
        space = cut.rfind(" ")
        return ExplanationResult(result.text, (cut[:space] if space > max_chars // 2 else cut).rstrip())
    return ExplanationResult.failure(
        result.text,
        f"answer too long: {len(result.explanation)} characters > the cap of {max_chars} "
        "(--max-answer-chars; --truncate-long-answers cuts instead)",
    )


def result_from_completion(text: str, answer: Any, endpoint: str = "chat") -> ExplanationResult:
    """The explanation in an OpenAI (chat) completion object, or a failure saying what is wrong with it.

    Used for a server's answer and for a line of a Batch output file alike; ``endpoint`` is ``"chat"``
    (``choices[0].message.content``) or ``"completions"`` (``choices[0].text``, cleaned like a plain continuation).
    """
    try:
        choice = answer["choices"][0]
        generated = choice["message"]["content"] if endpoint == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError):
        return ExplanationResult.failure(text, f"unexpected answer: {json.dumps(answer)[:300]}")
    if generated is not None and not isinstance(generated, str):
        return ExplanationResult.failure(text, f"unexpected answer: {json.dumps(answer)[:300]}")
    if endpoint == "completions":
        generated = clean_plain_continuation(generated or "")
    return ExplanationResult.from_generation(text, generated)
