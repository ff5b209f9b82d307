"""Explanations from a local ``transformers`` causal LM."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

from .local import LocalBatchExplainer, PromptFormatter

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


class TransformersExplainer(LocalBatchExplainer):
    """Explanations from a local ``transformers`` causal LM (a path or a hub name), batched with left padding.

    The prompt goes through the tokenizer's chat template when it has one, else the plain prompt is used (see
    ``LocalBatchExplainer``: everything but the ``generate`` call is shared with the vLLM backend). Greedy
    decoding by default (``temperature > 0`` samples). ``model_id`` (default: ``model_name_or_path``) is the name
    recorded in the cache.
    """

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

        self.formatter = PromptFormatter(self.tokenizer)
        self.generation_config = self._generation_config()

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

    def _after_failed_batch(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate(self, texts: Sequence[str]) -> list[str]:
        import torch

        # Left padding with the attention mask: a text's greedy output does not depend on its batch neighbours.
        inputs = self.tokenizer.pad(
            {"input_ids": self.formatter.token_ids(texts)}, padding=True, return_tensors="pt"
        ).to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=self.generation_config)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
