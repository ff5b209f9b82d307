"""Explanations from vLLM's offline engine (``vllm.LLM``): continuous batching on local GPUs, no server.

Only the generate call is vLLM's: the prompt goes through the same ``PromptFormatter`` as the transformers backend
(the tokenizer's chat template, special tokens added only without one) and vLLM gets the token ids
(``{"prompt_token_ids": ...}``), so both backends give the model the same tokens. Greedy decoding by default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .local import LocalBatchExplainer, PromptFormatter

VLLM_INSTALL_HINT = (
    "the vllm backend needs the vllm package (pip install 'entityclip-hf[vllm]', on a machine with a GPU that vLLM "
    "supports)"
)


def import_vllm():
    """The ``vllm`` module, or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"{VLLM_INSTALL_HINT}: {error}") from error
    return vllm


class VLLMExplainer(LocalBatchExplainer):
    """Explanations from a model run by ``vllm.LLM`` (a folder or a hub name).

    ``batch_size`` texts go to each ``LLM.generate`` call; vLLM schedules them with continuous batching, and each
    call's results are written to the cache before the next starts (a large batch, e.g. 512, keeps the GPU busy;
    a crash loses at most one batch). ``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``
    and ``dtype`` go to ``vllm.LLM``, with any other engine option in ``engine_options``. ``llm`` reuses an
    engine already built (``model_name_or_path`` then only names it).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        *,
        model_id: str | None = None,
        batch_size: int = 512,
        max_new_tokens: int = 160,
        temperature: float = 0.0,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        engine_options: dict[str, Any] | None = None,
        llm=None,
    ):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
        vllm = import_vllm()
        name = str(model_name_or_path)
        self.model_id = model_id or name.rstrip("/")
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        if llm is None:
            options = dict(
                model=name,
                dtype=dtype,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                trust_remote_code=trust_remote_code,
                seed=seed,
            )
            if max_model_len is not None:
                options["max_model_len"] = max_model_len
            options.update(engine_options or {})
            llm = vllm.LLM(**options)
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.formatter = PromptFormatter(self.tokenizer)
        self.sampling_params = vllm.SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, seed=seed if temperature > 0 else None
        )

    def _generate(self, texts: Sequence[str]) -> list[str]:
        prompts = [{"prompt_token_ids": ids} for ids in self.formatter.token_ids(texts)]
        outputs = self.llm.generate(prompts, self.sampling_params, use_tqdm=False)
        # vLLM returns the outputs in the order of the prompts; the text holds the new tokens only.
        return [output.outputs[0].text if output.outputs else "" for output in outputs]
