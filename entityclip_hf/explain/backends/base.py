"""What a generator backend gives the run: one result per text, errors returned, never raised."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..results import ExplanationResult


class Explainer(Protocol):
    """What ``explain_texts`` needs from a generator."""

    model_id: str  # the "model" of the cache key
    batch_size: int  # texts per ``explain_batch`` call
    concurrency: int  # ``explain_batch`` calls in flight at once (threads)

    def explain_batch(self, texts: Sequence[str]) -> list[ExplanationResult]:
        """One result per text, in order; errors are returned as failures, never raised."""
        ...
