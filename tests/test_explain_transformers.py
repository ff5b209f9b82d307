"""Explanations from a local transformers causal LM: a tiny randomly initialised Llama generates for real."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from entityclip_hf.explain import (
    PLAIN_PROMPT_TEMPLATE,
    SYSTEM_PROMPT,
    TransformersExplainer,
    explain_texts,
    iter_cache_records,
    main,
    read_explanation_cache,
)

TEXTS = [
    "Barack Obama speaks at the White House in Washington.",
    "The Eiffel Tower at night.",
    "Serena Williams wins at Wimbledon in London, July 2015, wearing white.",
    "Angela Merkel.",
    "A crowd gathers at Times Square in New York on New Year's Eve.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Like older Mistral templates: only user/assistant turns.
NO_SYSTEM_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "[INST] {{ message['content'] }} [/INST]{% endfor %}"
)


def build_tokenizer():
    """A real byte-level BPE trained on the prompt and the texts, with bos/eos/pad tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([PLAIN_PROMPT_TEMPLATE, *TEXTS] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_llm(folder, tokenizer, suppress_tokens, chat_template=None, architecture="llama"):
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    if architecture == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            initializer_range=0.5,  # large random weights: the gibberish depends on the text it follows
            **special_ids,
        )
        model = LlamaForCausalLM(config)
    else:  # learned absolute positions: a prompt longer than n_positions cannot run
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=512, **special_ids)
        model = GPT2LMHeadModel(config)
    model.generation_config.suppress_tokens = suppress_tokens
    model.save_pretrained(folder)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llms")
    tokenizer = build_tokenizer()
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    return {
        # Special tokens suppressed: the gibberish never stops early, so every output is non-empty.
        "plain": save_tiny_llm(root / "plain", tokenizer, special),
        "chat": save_tiny_llm(root / "chat", tokenizer, special, CHAT_TEMPLATE),
        "no_system": save_tiny_llm(root / "no_system", tokenizer, special, NO_SYSTEM_CHAT_TEMPLATE),
        # Every ordinary token suppressed: the model can only say end-of-text, i.e. an empty generation.
        "empty": save_tiny_llm(root / "empty", tokenizer, ordinary),
        "gpt2": save_tiny_llm(root / "gpt2", tokenizer, special, architecture="gpt2"),
    }


def test_batched_generation_matches_one_by_one_and_strips_the_prompt(tiny_models):
    explainer = TransformersExplainer(tiny_models["plain"], batch_size=8, max_new_tokens=6, device="cpu")
    assert not explainer.uses_chat_template and explainer.prompt(TEXTS[0]) == PLAIN_PROMPT_TEMPLATE.format(
        text=TEXTS[0]
    )
    assert explainer.tokenizer.padding_side == "left"
    batched = explainer.explain_batch(TEXTS)
    alone = [explainer.explain_batch([text])[0] for text in TEXTS]
    assert [r.text for r in batched] == TEXTS
    assert all(r.ok and r.explanation for r in batched)
    assert (
        len({r.explanation for r in batched}) > 1
    )  # outputs depend on the text, so the comparison below means something
    # Left padding with the attention mask: a text's greedy output does not depend on its batch neighbours.
    assert [r.explanation for r in batched] == [r.explanation for r in alone]
    for result in batched:  # only the new tokens: neither the instructions nor the text come back
        assert result.text not in result.explanation and "Explanation:" not in result.explanation
        new_ids = explainer.tokenizer(result.explanation, add_special_tokens=False)["input_ids"]
        assert len(new_ids) <= 3 * explainer.max_new_tokens


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny_models):
    explainer = TransformersExplainer(tiny_models["chat"], batch_size=2, max_new_tokens=4, device="cpu")
    assert explainer.uses_chat_template and explainer.use_system_role
    prompt = explainer.prompt(TEXTS[1])
    assert prompt.startswith("<|system|>" + SYSTEM_PROMPT) and prompt.endswith("<|assistant|>")
    assert TEXTS[1] in prompt
    results = explainer.explain_batch(TEXTS[:3])
    assert all(r.ok for r in results)


def test_template_without_system_role_gets_the_instructions_in_the_user_turn(tiny_models):
    explainer = TransformersExplainer(tiny_models["no_system"], batch_size=2, max_new_tokens=4, device="cpu")
    assert explainer.uses_chat_template and not explainer.use_system_role
    prompt = explainer.prompt(TEXTS[0])
    assert prompt.startswith("[INST] " + SYSTEM_PROMPT) and TEXTS[0] in prompt
    assert explainer.explain_batch([TEXTS[0]])[0].ok


def test_empty_generations_are_recorded_as_failures(tiny_models, tmp_path):
    explainer = TransformersExplainer(tiny_models["empty"], batch_size=4, max_new_tokens=4, device="cpu")
    cache = tmp_path / "cache.jsonl"
    summary = explain_texts(TEXTS, explainer, cache, progress=False)
    assert (summary.generated, summary.failed) == (0, len(TEXTS))
    records = list(iter_cache_records(cache))
    assert len(records) == len(TEXTS)
    assert all(r["ok"] is False and r["explanation"] is None and r["error"] == "empty generation" for r in records)
    assert read_explanation_cache(cache) == {}


def test_failing_batch_is_retried_text_by_text(tiny_models):
    explainer = TransformersExplainer(tiny_models["gpt2"], batch_size=4, max_new_tokens=3, device="cpu")
    too_long = "word " * 600  # past GPT-2's n_positions=512: this text alone cannot be generated
    results = explainer.explain_batch([TEXTS[0], too_long, TEXTS[1]])
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].text == too_long and results[1].error


def test_cli_with_a_local_model_resumes_from_its_cache(tiny_models, tmp_path, capsys):
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps({"id": i, "caption": t}) + "\n" for i, t in enumerate(TEXTS + TEXTS[:2])))
    cache = tmp_path / "out" / "explanations.jsonl"
    argv = ["--input", str(data), "--text-field", "caption", "--cache", str(cache), "--model", tiny_models["chat"]]
    argv += ["--batch-size", "2", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--limit", "3"]) == 0
    assert "5 texts (3 unique): 3 done, 0 skipped" in capsys.readouterr().out  # two repeats within the limit
    assert main(argv) == 0
    assert "7 texts (5 unique): 2 done, 3 skipped" in capsys.readouterr().out
    records = list(iter_cache_records(cache))
    assert sorted(r["text"] for r in records) == sorted(TEXTS)
    assert {r["model"] for r in records} == {tiny_models["chat"]}
    assert set(read_explanation_cache(cache, model=tiny_models["chat"])) == set(TEXTS)
