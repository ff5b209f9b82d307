"""The vLLM offline backend (issue 12, item 1).

Two kinds of test, kept apart:
- ``test_real_vllm_*`` run vLLM itself and are skipped where it is not importable or there is no GPU (vLLM pins its
  own torch and transformers; it is not installed in the CPU test environment).
- The rest test OUR code around the generate call with a FAKE ``vllm`` module injected into ``sys.modules``: the
  fake LLM generates with the tiny transformers model on exactly the token ids it is given. They check the
  prompt/batching/cleaning/caching/error path the two backends share; they are NOT tests of vLLM.
"""

import importlib.util
import json
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from entityclip_hf.explain import TransformersExplainer, VLLMExplainer, explain_texts, iter_cache_records, main

from . import test_explain_transformers as transformers_tests

TEXTS = transformers_tests.TEXTS
tiny_models = transformers_tests.tiny_models  # the tiny Llama/GPT-2 folders (a module-scoped fixture)


class FakeCompletion:
    def __init__(self, text):
        self.text = text


class FakeRequestOutput:
    def __init__(self, text):
        self.outputs = [FakeCompletion(text)]


class FakeSamplingParams:
    def __init__(self, max_tokens=16, temperature=1.0, seed=None):
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed


class FakeLLM:
    """Stands in for ``vllm.LLM``: greedy generation with the tiny transformers model, one prompt at a time."""

    instances = []

    def __init__(self, model, fail_longer_than=None, **options):
        self.options = dict(model=model, **options)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.fail_longer_than = fail_longer_than
        self.calls = []
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append([prompt["prompt_token_ids"] for prompt in prompts])
        outputs = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            if self.fail_longer_than is not None and len(ids) > self.fail_longer_than:
                # vLLM raises for the whole call when one prompt exceeds max_model_len
                raise ValueError(f"prompt of {len(ids)} tokens is longer than the maximum model length")
            with torch.inference_mode():
                out = self.model.generate(
                    torch.tensor([ids]), max_new_tokens=sampling_params.max_tokens, do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )  # fmt: skip
            outputs.append(FakeRequestOutput(self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_fake_vllm_gets_the_same_tokens_and_gives_the_same_explanations_as_transformers(fake_vllm, tiny_models, kind):
    reference = TransformersExplainer(tiny_models[kind], batch_size=4, max_new_tokens=5, device="cpu")
    explainer = VLLMExplainer(tiny_models[kind], batch_size=4, max_new_tokens=5, tensor_parallel_size=2)
    llm = FakeLLM.instances[-1]
    assert llm.options["tensor_parallel_size"] == 2 and llm.options["model"] == tiny_models[kind]
    assert explainer.uses_chat_template == (kind == "chat") and explainer.prompt(TEXTS[0]) == reference.prompt(TEXTS[0])
    results = explainer.explain_batch(TEXTS[:4])
    # The token ids vLLM got: the prompt as the transformers backend tokenizes it (special tokens not doubled).
    expected_ids = [
        reference.tokenizer(reference.prompt(t), add_special_tokens=kind == "plain")["input_ids"] for t in TEXTS[:4]
    ]
    assert llm.calls == [expected_ids]
    assert [r.explanation for r in results] == [r.explanation for r in reference.explain_batch(TEXTS[:4])]
    assert all(r.ok for r in results) and len({r.explanation for r in results}) > 1


def test_fake_vllm_failing_call_is_split_until_the_bad_prompt_is_alone(fake_vllm, tiny_models):
    explainer = VLLMExplainer(
        tiny_models["plain"], batch_size=8, max_new_tokens=3, engine_options={"fail_longer_than": 300}
    )
    too_long = "word " * 400
    results = explainer.explain_batch([TEXTS[0], TEXTS[1], too_long, TEXTS[2], TEXTS[3]])
    assert [r.ok for r in results] == [True, True, False, True, True]
    assert "longer than the maximum model length" in results[2].error and results[2].text == too_long
    assert len(FakeLLM.instances[-1].calls) < 9  # halves, not one call per text after the first failure


def test_fake_vllm_cli_backend_writes_the_cache_and_resumes(fake_vllm, tiny_models, tmp_path, capsys):
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps({"caption": t}) + "\n" for t in TEXTS))
    cache = tmp_path / "cache.jsonl"
    argv = ["--input", str(data), "--text-field", "caption", "--cache", str(cache), "--backend", "vllm"]
    argv += ["--model", tiny_models["chat"], "--max-new-tokens", "4", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "on vLLM (chat template, batch size 512)" in out and "5 done" in out
    assert len(FakeLLM.instances[-1].calls) == 1  # all five texts in one generate call
    assert {r["text"] for r in iter_cache_records(cache) if r["ok"]} == set(TEXTS)
    assert main(argv) == 0 and "5 skipped" in capsys.readouterr().out


def test_the_vllm_backend_without_vllm_says_how_to_get_it(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install 'entityclip-hf\\[vllm\\]'"):
        VLLMExplainer(tiny_models["plain"])
    data = tmp_path / "t.txt"
    data.write_text("a text\n")
    with pytest.raises(SystemExit) as stopped:
        main(["--input", str(data), "--cache", str(tmp_path / "c.jsonl"), "--backend", "vllm", "--model", "x"])
    assert stopped.value.code == 2 and "vllm" in capsys.readouterr().err


if importlib.util.find_spec("vllm") is None:
    NO_REAL_VLLM = "vllm is not installed (vllm 0.33 pins torch 2.14 and transformers<5.21, this package needs >=5.23)"
elif not torch.cuda.is_available():
    NO_REAL_VLLM = "vLLM's offline engine needs a GPU and none is visible"
else:
    NO_REAL_VLLM = ""


@pytest.mark.skipif(bool(NO_REAL_VLLM), reason=NO_REAL_VLLM)
def test_real_vllm_generates_into_the_cache(tiny_models, tmp_path):
    explainer = VLLMExplainer(tiny_models["chat"], max_new_tokens=4, gpu_memory_utilization=0.2, max_model_len=1024)
    summary = explain_texts(TEXTS, explainer, tmp_path / "c.jsonl", progress=False)
    assert summary.generated == len(TEXTS)
    reference = TransformersExplainer(tiny_models["chat"], max_new_tokens=4, device="cuda", dtype="float32")
    assert explainer.prompt(TEXTS[0]) == reference.prompt(TEXTS[0])
