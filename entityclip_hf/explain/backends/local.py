"""What the local backends (transformers, vLLM) share: the prompt through the tokenizer, batching and its fallback.

A local backend only has to turn a batch of tokenized prompts into generated strings (``_generate``); the prompt
(chat template or plain), the special tokens, the clean-up of plain continuations, the results and the recovery
from a failing batch are here, once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..prompt import build_messages, build_plain_prompt, clean_plain_continuation
from ..results import ExplanationResult

logger = logging.getLogger(__name__)


class PromptFormatter:
    """The exact prompt a local model gets for a text: through the tokenizer's chat template when it has one.

    Templates that reject a system role (older Mistral ones) get the instructions in the user turn.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_system_role = self.uses_chat_template and self._template_accepts_system_role()

    def _template_accepts_system_role(self) -> bool:
        try:
            self.tokenizer.apply_chat_template(build_messages("x"), tokenize=False, add_generation_prompt=True)
        except Exception:  # jinja's TemplateError from the template's raise_exception, or anything it raises
            return False
        return True

    def prompt(self, text: str) -> str:
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(
                build_messages(text, use_system_role=self.use_system_role), tokenize=False, add_generation_prompt=True
            )
        return build_plain_prompt(text)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        # A chat template writes its own special tokens (BOS...); adding them again would double them.
        encoded = self.tokenizer([self.prompt(text) for text in texts], add_special_tokens=not self.uses_chat_template)
        return [list(ids) for ids in encoded["input_ids"]]


class LocalBatchExplainer:
    """Base of the local backends: ``explain_batch`` around the subclass's ``_generate``.

    Subclasses set ``self.formatter`` (a ``PromptFormatter``), ``model_id``, ``batch_size`` and implement
    ``_generate(texts) -> list[str]`` (one generated string per text, new tokens only, special tokens removed).
    """

    concurrency = 1
    formatter: PromptFormatter

    @property
    def uses_chat_template(self) -> bool:
        return self.formatter.uses_chat_template

    @property
    def use_system_role(self) -> bool:
        return self.formatter.use_system_role

    def prompt(self, text: str) -> str:
        """The exact string the model is given for ``text``."""
        return self.formatter.prompt(text)

    def _generate(self, texts: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def _after_failed_batch(self) -> None:
        """Free what a failed batch may hold (the transformers backend empties the CUDA cache)."""

    def explain_batch(self, texts: Sequence[str]) -> list[ExplanationResult]:
        """Generate for ``texts`` in one call; a failing batch is split in halves until the culprit is alone."""
        try:
            generated = self._generate(texts)
            if len(generated) != len(texts):
                raise RuntimeError(f"the generator returned {len(generated)} outputs for {len(texts)} prompts")
        except Exception as error:  # out of memory, a prompt longer than the context...: isolate the culprit
            if len(texts) > 1:
                logger.warning(
                    "batch of %d failed (%s: %s); retrying it in halves", len(texts), type(error).__name__, error
                )
                self._after_failed_batch()
                middle = len(texts) // 2
                return self.explain_batch(texts[:middle]) + self.explain_batch(texts[middle:])
            return [ExplanationResult.failure(texts[0], f"{type(error).__name__}: {error}")]
        if not self.uses_chat_template:
            generated = [clean_plain_continuation(g) for g in generated]
        return [ExplanationResult.from_generation(text, g) for text, g in zip(texts, generated, strict=True)]
