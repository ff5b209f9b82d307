"""Explanations from a local ``transformers`` causal LM."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

from ..cache import ExplanationResult
from ..prompt import build_messages, build_plain_prompt, clean_plain_continuation

logger = logging.getLogger(__name__)


def _resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class TransformersExplainer:
    """Explanations from a local ``transformers`` causal LM (a path or a hub name), batched with left padding.

    The prompt goes through the tokenizer's chat template when it has one, else the plain prompt is used. Greedy
    decoding by default (``temperature > 0`` samples). ``model_id`` (default: ``model_name_or_path``) is the name
    recorded in the cache.
    """

    concurrency = 1

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        *,
        model_id: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 160,
        temperature: float = 0.0,
        device: str = "auto",
        dtype: str = "auto",
        device_map: str | None = None,
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
        name = str(model_name_or_path)
        self.model_id = model_id or name.rstrip("/")
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

        self.tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        # Decoder-only batched generation pads on the left so that every prompt ends where its new tokens start.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer of {name} has neither a pad nor an eos token; batching needs one")
            self.tokenizer.pad_token = self.tokenizer.eos_token

        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
        if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
            raise ValueError(f"dtype must be 'auto' or a torch dtype name like 'bfloat16', got {dtype!r}")
        self.model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch_dtype, device_map=device_map, trust_remote_code=trust_remote_code
        )
        if device_map is None:
            self.model.to(_resolve_device(device))
        self.model.eval()

        self.uses_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.use_system_role = self.uses_chat_template and self._template_accepts_system_role()
        self.generation_config = self._generation_config()

    def _template_accepts_system_role(self) -> bool:
        try:
            self.tokenizer.apply_chat_template(build_messages("x"), tokenize=False, add_generation_prompt=True)
        except Exception:  # jinja's TemplateError from the template's raise_exception, or anything it raises
            return False
        return True

    def _generation_config(self):
        # A copy of the model's own settings (eos ids, suppressed tokens...) with our decoding choices on top; the
        # model's sampling defaults are cleared for greedy decoding so they neither apply nor warn.
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = self.max_new_tokens
        config.max_length = None
        if self.temperature > 0:
            config.do_sample = True
            config.temperature = self.temperature
        else:
            config.do_sample = False
            config.temperature = config.top_p = config.top_k = None
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        return config

    def prompt(self, text: str) -> str:
        """The exact string the model is given for ``text``."""
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(
                build_messages(text, use_system_role=self.use_system_role), tokenize=False, add_generation_prompt=True
            )
        return build_plain_prompt(text)

    def explain_batch(self, texts: Sequence[str]) -> list[ExplanationResult]:
        """Generate for ``texts`` in one ``generate`` call; a failing batch is retried text by text."""
        import torch

        try:
            # A chat template writes its own special tokens (BOS...); adding them again would double them.
            inputs = self.tokenizer(
                [self.prompt(text) for text in texts],
                padding=True,
                add_special_tokens=not self.uses_chat_template,
                return_tensors="pt",
            ).to(self.model.device)
            with torch.inference_mode():
                output = self.model.generate(**inputs, generation_config=self.generation_config)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            generated = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        except Exception as error:  # out of memory, a prompt longer than the context...: isolate the culprit
            if len(texts) > 1:
                logger.warning(
                    "batch of %d failed (%s: %s); retrying one by one", len(texts), type(error).__name__, error
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                return [result for text in texts for result in self.explain_batch([text])]
            return [ExplanationResult.failure(texts[0], f"{type(error).__name__}: {error}")]
        if not self.uses_chat_template:
            generated = [clean_plain_continuation(g) for g in generated]
        return [ExplanationResult.from_generation(text, g) for text, g in zip(texts, generated, strict=True)]
