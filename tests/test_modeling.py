"""EntityCLIPModel: shapes, losses, gradient flow, explanations, padding, missing explanations, determinism."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from entityclip_hf import EntityCLIPConfig, EntityCLIPModel
from entityclip_hf.modeling_entityclip import EntityCLIPExpertBank

TEXTS = [
    "Angela Merkel meets Emmanuel Macron in Aachen.",
    "Serena Williams wins at Wimbledon on Saturday.",
    "Firefighters battle a wildfire near Santa Rosa, California.",
    "Pope Francis greets the crowd in St. Peter's Square.",
]
EXPLANATIONS = [
    "Angela Merkel is a German politician with short blond hair; Macron is France's president.",
    "Serena Williams is an American tennis player; Wimbledon is played on grass in London.",
    "Santa Rosa is a city in Northern California; wildfires there burn dry hills.",
    "Pope Francis wears white robes; St. Peter's Square is in Vatican City.",
]


@pytest.fixture
def config(tiny_clip_config):
    return EntityCLIPConfig(clip_config=tiny_clip_config)


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return EntityCLIPModel(config).eval()


def make_batch(tokenizer, config, texts=TEXTS, explanations=EXPLANATIONS, seed=0, **tokenizer_kwargs):
    tokenizer_kwargs.setdefault("padding", True)
    generator = torch.Generator().manual_seed(seed)
    vision = config.clip_config.vision_config
    text = tokenizer(list(texts), truncation=True, return_tensors="pt", **tokenizer_kwargs)
    batch = {
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "pixel_values": torch.randn(len(texts), 3, vision.image_size, vision.image_size, generator=generator),
    }
    if explanations is not None:
        present = [e is not None for e in explanations]
        encoded = tokenizer([e or "" for e in explanations], truncation=True, return_tensors="pt", **tokenizer_kwargs)
        mask = encoded["attention_mask"] * torch.tensor(present, dtype=torch.long)[:, None]
        batch["explanation_input_ids"] = encoded["input_ids"]
        batch["explanation_attention_mask"] = mask
    return batch


def test_forward_without_loss_is_clip(model, config, tiny_tokenizer):
    """Without return_loss the forward is CLIPModel's: CLIP fields only, N images x M texts."""
    batch = make_batch(tiny_tokenizer, config)
    with torch.no_grad():
        out = model(**batch)
    dim = config.projection_dim
    assert out.loss is None and out.itm_loss is None and out.itm_logits is None and out.expert_image_embeds is None
    assert out.logits_per_image.shape == (4, 4)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())
    for name in ("image_embeds", "text_embeds"):
        embeds = getattr(out, name)
        assert embeds.shape == (4, dim)
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(4))


def test_forward_scores_n_images_against_m_texts_like_clipmodel(model, config, tiny_tokenizer):
    clip = CLIPModel(config.clip_config).eval()
    clip.load_state_dict(model.clip.state_dict())
    batch = make_batch(tiny_tokenizer, config)
    images, texts = batch["pixel_values"][:3], {k: batch[k][:2] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ours = model(pixel_values=images, **texts)
        theirs = clip(pixel_values=images, **texts)
    assert ours.logits_per_image.shape == (3, 2) and ours.logits_per_text.shape == (2, 3)
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0)


def test_paired_forward_shapes(model, config, tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, config)
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    dim = config.projection_dim
    for name in ("image_embeds", "text_embeds", "expert_image_embeds", "expert_text_embeds"):
        embeds = getattr(out, name)
        assert embeds.shape == (4, dim)
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(4))


def test_eval_mode_paired_forward_is_deterministic_and_uses_the_hardest_negatives(model, config, tiny_tokenizer):
    from entityclip_hf.losses import hardest_negatives

    batch = make_batch(tiny_tokenizer, config)
    with torch.no_grad():
        first, second = model(**batch, return_loss=True), model(**batch, return_loss=True)
    torch.testing.assert_close(first.loss, second.loss, rtol=0, atol=0)
    torch.testing.assert_close(first.itm_logits, second.itm_logits, rtol=0, atol=0)
    # The negative-text pairs are (image i, its most similar other text): their scores equal a pairing by hand.
    negative_texts = hardest_negatives(first.logits_per_image)
    pairs = {k: batch[k] for k in ("pixel_values",)}
    texts = {k: batch[k][negative_texts] for k in batch if k != "pixel_values"}
    with torch.no_grad():
        by_hand = model.match_probability(**pairs, **texts)
    torch.testing.assert_close(first.itm_logits[4:8].softmax(-1)[:, 0], by_hand, rtol=1e-5, atol=1e-6)


def test_forward_with_loss_combines_the_three_terms(model, config, tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, config)
    torch.manual_seed(1)
    out = model(**batch, return_loss=True)
    for term in (out.loss, out.contrastive_loss, out.expert_contrastive_loss, out.itm_loss):
        assert term.ndim == 0 and torch.isfinite(term)
    expected = out.contrastive_loss + config.beta * out.expert_contrastive_loss + config.gamma * out.itm_loss
    torch.testing.assert_close(out.loss, expected)
    # Positives, then (image, negative text), then (negative image, text).
    assert out.itm_logits.shape == (12, 2)
    assert out.itm_labels.tolist() == [0] * 4 + [1] * 8
    # The CLIP term is CLIP's own loss on the same logits.
    labels = torch.arange(4)
    clip_loss = (F.cross_entropy(out.logits_per_image, labels) + F.cross_entropy(out.logits_per_text, labels)) / 2
    torch.testing.assert_close(out.contrastive_loss, clip_loss)


def test_tuple_output(model, config, tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, config)
    with torch.no_grad():
        as_tuple = model(**batch, return_loss=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].ndim == 0


def _grad_norms(model, prefix):
    norms = [p.grad.norm() for n, p in model.named_parameters() if n.startswith(prefix) and p.grad is not None]
    return torch.stack(norms).sum().item() if norms else 0.0


@pytest.mark.parametrize(
    ("term", "reached", "untouched"),
    [
        ("contrastive_loss", ["clip."], ["vision_experts.", "text_experts.", "shared_experts.", "itm_head."]),
        (
            "expert_contrastive_loss",
            ["clip.", "vision_experts.", "text_experts.", "shared_experts.", "image_gate.", "text_gate."],
            ["itm_head.", "fusion_gate."],
        ),
        (
            "itm_loss",
            ["clip.", "vision_experts.", "text_experts.", "shared_experts.", "fusion_gate.", "itm_head."],
            ["image_gate.", "text_gate."],
        ),
    ],
)
def test_each_loss_term_reaches_its_parameters(model, config, tiny_tokenizer, term, reached, untouched):
    model.train()
    batch = make_batch(tiny_tokenizer, config)
    getattr(model(**batch, return_loss=True), term).backward()
    for prefix in reached:
        assert _grad_norms(model, prefix) > 0, f"{term} sends no gradient to {prefix}"
    for prefix in untouched:
        assert _grad_norms(model, prefix) == 0, f"{term} should not reach {prefix}"


def test_total_loss_reaches_every_parameter(model, config, tiny_tokenizer):
    # DDP fails on parameters without a gradient: every parameter must sit in the graph of the total loss.
    model.train()
    model(**make_batch(tiny_tokenizer, config), return_loss=True).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_explanations_change_experts_and_itm_but_not_clip_features(model, config, tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, config)
    other = make_batch(tiny_tokenizer, config, explanations=list(reversed(EXPLANATIONS)))
    with torch.no_grad():
        out, out_other = model(**batch, return_loss=True), model(**other, return_loss=True)
    assert not torch.allclose(out.expert_image_embeds, out_other.expert_image_embeds)
    assert not torch.allclose(out.expert_text_embeds, out_other.expert_text_embeds)
    assert not torch.allclose(out.itm_logits, out_other.itm_logits)
    torch.testing.assert_close(out.image_embeds, out_other.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(out.text_embeds, out_other.text_embeds, rtol=0, atol=0)
    with torch.no_grad():
        image_features = model.get_image_features(batch["pixel_values"]).pooler_output
        text_features = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
    torch.testing.assert_close(F.normalize(image_features, dim=-1), out.image_embeds)
    torch.testing.assert_close(F.normalize(text_features, dim=-1), out.text_embeds)


def test_features_equal_plain_clip_on_the_same_weights(model, config, tiny_tokenizer):
    clip = CLIPModel(config.clip_config).eval()
    clip.load_state_dict(model.clip.state_dict())
    batch = make_batch(tiny_tokenizer, config)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(batch["pixel_values"]).pooler_output,
            clip.get_image_features(pixel_values=batch["pixel_values"]).pooler_output,
            rtol=0,
            atol=0,
        )
        torch.testing.assert_close(
            model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output,
            clip.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output,
            rtol=0,
            atol=0,
        )


def test_padding_does_not_change_results(model, config, tiny_tokenizer):
    dynamic = make_batch(tiny_tokenizer, config)  # padded to the longest in the batch
    full = make_batch(tiny_tokenizer, config, padding="max_length", max_length=77)
    assert dynamic["input_ids"].shape[1] < 30 and full["input_ids"].shape[1] == 77
    with torch.no_grad():
        out_dynamic, out_full = model(**dynamic, return_loss=True), model(**full, return_loss=True)
    for name in ("text_embeds", "expert_image_embeds", "expert_text_embeds", "itm_logits"):
        torch.testing.assert_close(getattr(out_dynamic, name), getattr(out_full, name), rtol=1e-5, atol=1e-5)


def test_short_sample_padded_to_10_or_40_tokens(model, config, tiny_tokenizer):
    texts, explanations = ["Merkel in Aachen", "Obama"], ["Merkel, German", "Obama"]
    outputs = []
    for length in (10, 40):
        batch = make_batch(tiny_tokenizer, config, texts, explanations, padding="max_length", max_length=length)
        assert batch["input_ids"].shape[1] == length and batch["attention_mask"][:, -1].sum() == 0
        with torch.no_grad():
            outputs.append(model(**batch, return_loss=True))
    for name in ("expert_image_embeds", "expert_text_embeds", "itm_logits"):
        torch.testing.assert_close(getattr(outputs[0], name), getattr(outputs[1], name), rtol=1e-5, atol=1e-5)


def test_a_sample_is_unaffected_by_its_batch_mates_padding(model, config, tiny_tokenizer):
    # Sample 0 alone (padded to its own length) and beside a much longer text must give the same expert outputs.
    texts = [TEXTS[0], TEXTS[1] + " " + TEXTS[2] + " " + TEXTS[3]]
    explanations = [EXPLANATIONS[0], " ".join(EXPLANATIONS)]
    pair = make_batch(tiny_tokenizer, config, texts=texts, explanations=explanations)
    alone = make_batch(tiny_tokenizer, config, texts=texts[:1], explanations=explanations[:1])
    alone["pixel_values"] = pair["pixel_values"][:1]
    with torch.no_grad():
        out_pair, out_alone = model(**pair, return_loss=True), model(**alone, return_loss=True)
    for name in ("expert_image_embeds", "expert_text_embeds", "itm_logits"):
        torch.testing.assert_close(getattr(out_pair, name)[:1], getattr(out_alone, name), rtol=1e-5, atol=1e-5)


def test_missing_explanations_train(model, config, tiny_tokenizer):
    model.train()
    batch = make_batch(tiny_tokenizer, config, explanations=[EXPLANATIONS[0], None, EXPLANATIONS[2], None])
    out = model(**batch, return_loss=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_a_missing_explanation_is_gated_out(model, config, tiny_tokenizer):
    # A sample without explanation must give the same expert embeddings whatever its explanation tokens hold.
    with_none = make_batch(tiny_tokenizer, config, explanations=[None, *EXPLANATIONS[1:]])
    garbage = dict(with_none)
    garbage["explanation_input_ids"] = with_none["explanation_input_ids"].clone()
    garbage["explanation_input_ids"][0, 1:5] = 7
    with torch.no_grad():
        a, b = model(**with_none, return_loss=True), model(**garbage, return_loss=True)
    torch.testing.assert_close(a.expert_image_embeds, b.expert_image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(a.itm_logits, b.itm_logits, rtol=0, atol=0)


@pytest.mark.parametrize("explanations", ["absent", "all_none"])
def test_batches_without_any_explanation_train(model, config, tiny_tokenizer, explanations):
    model.train()
    batch = make_batch(tiny_tokenizer, config, explanations=None if explanations == "absent" else [None] * 4)
    out = model(**batch, return_loss=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_shared_experts_only_config_handles_missing_explanations(tiny_clip_config, tiny_tokenizer):
    config = EntityCLIPConfig(clip_config=tiny_clip_config, num_vision_experts=0, num_text_experts=0)
    model = EntityCLIPModel(config)
    batch = make_batch(tiny_tokenizer, config, explanations=[EXPLANATIONS[0], None, None, EXPLANATIONS[3]])
    out = model(**batch, return_loss=True)
    assert torch.isfinite(out.loss)
    # Without explanation and without own experts, the expert embedding falls back to the CLIP embedding.
    torch.testing.assert_close(out.expert_image_embeds[1], out.image_embeds[1])


def test_single_pair_batch_has_no_negatives_but_trains(model, config, tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, config, texts=TEXTS[:1], explanations=EXPLANATIONS[:1])
    out = model(**batch, return_loss=True)
    assert torch.isfinite(out.loss) and out.itm_logits.shape == (1, 2)


def test_determinism_with_a_seed(config, tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, config)

    def run():
        torch.manual_seed(123)
        model = EntityCLIPModel(config)
        out = model(**batch, return_loss=True)
        return out.loss.detach(), out.itm_logits.detach()

    (loss_a, itm_a), (loss_b, itm_b) = run(), run()
    assert torch.equal(loss_a, loss_b) and torch.equal(itm_a, itm_b)


def test_bf16_autocast_keeps_the_loss_finite(model, config, tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, config)
    with torch.no_grad():
        model.clip.logit_scale.fill_(config.logit_scale_max)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, return_loss=True)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(config, tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, config)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = EntityCLIPModel(config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.clip.text_model.encoder.layers[0].gradient_checkpointing
        torch.manual_seed(5)
        out = model(**batch, return_loss=True)
        out.loss.backward()
        results.append((out.loss.detach(), model.clip.vision_model.embeddings.patch_embedding.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_sdpa_is_the_default_and_matches_eager(tiny_clip_config, tiny_tokenizer):
    sdpa_config = EntityCLIPConfig(clip_config=tiny_clip_config)
    torch.manual_seed(0)
    sdpa_model = EntityCLIPModel(sdpa_config).eval()
    assert sdpa_model.clip.text_model.config._attn_implementation == "sdpa"
    eager_model = EntityCLIPModel(EntityCLIPConfig(clip_config=tiny_clip_config, attn_implementation="eager")).eval()
    eager_model.load_state_dict(sdpa_model.state_dict())
    assert eager_model.clip.text_model.config._attn_implementation == "eager"
    batch = make_batch(tiny_tokenizer, sdpa_config)
    with torch.no_grad():
        a, b = sdpa_model(**batch, return_loss=True), eager_model(**batch, return_loss=True)
    torch.testing.assert_close(a.expert_text_embeds, b.expert_text_embeds, rtol=1e-4, atol=1e-5)


def test_clamp_logit_scale(model, config):
    with torch.no_grad():
        model.clip.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert model.clip.logit_scale.item() == pytest.approx(config.logit_scale_max)
    with torch.no_grad():
        model.clip.logit_scale.fill_(-3.0)
    model.clamp_logit_scale()
    assert model.clip.logit_scale.item() == 0.0


def test_match_probability_scores_each_pair(model, config, tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, config)
    with torch.no_grad():
        probability = model.match_probability(**batch)
        logits = model(**batch, return_loss=True).itm_logits[:4]  # the positive pairs come first
    assert probability.shape == (4,)
    assert ((probability > 0) & (probability < 1)).all()
    torch.testing.assert_close(probability, logits.softmax(-1)[:, 0])


def test_forward_rejects_mismatched_batches(model, config, tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, config)
    batch["pixel_values"] = batch["pixel_values"][:3]
    with pytest.raises(ValueError, match="got 3 images and 4 texts"):
        model(**batch, return_loss=True)
    with pytest.raises(ValueError, match="got 3 images and 4 texts"):
        model.match_probability(**batch)
    batch = make_batch(tiny_tokenizer, config)
    batch["explanation_input_ids"] = batch["explanation_input_ids"][:2]
    batch["explanation_attention_mask"] = batch["explanation_attention_mask"][:2]
    with pytest.raises(ValueError, match="`explanation_input_ids` has 2 rows"):
        model(**batch, return_loss=True)


def _reference_expert(bank, expert, query_sequence, key_sequence, key_mask, position):
    """One expert as the paper writes it, over every query token, with plain per-expert weights."""
    dim, heads = bank.dim, bank.num_heads
    head_dim = dim // heads

    def norm(x, weight, bias):
        return F.layer_norm(x, (dim,), weight[expert], bias[expert], bank.eps)

    x, y = norm(query_sequence, bank.ln_1_weight, bank.ln_1_bias), norm(key_sequence, bank.ln_1_weight, bank.ln_1_bias)
    queries = x @ bank.query_weight[expert] + bank.query_bias[expert]
    keys, values = (y @ bank.key_value_weight[expert] + bank.key_value_bias[expert]).split(dim, dim=-1)
    split = lambda t: t.view(t.shape[0], heads, head_dim).transpose(0, 1)  # noqa: E731
    scores = split(queries) @ split(keys).transpose(1, 2) / head_dim**0.5
    scores = scores.masked_fill(~key_mask[None, None, :], float("-inf"))
    attended = (scores.softmax(-1) @ split(values)).transpose(0, 1).reshape(-1, dim)
    hidden = query_sequence + attended @ bank.out_weight[expert] + bank.out_bias[expert]
    mlp = norm(hidden, bank.ln_2_weight, bank.ln_2_bias) @ bank.fc1_weight[expert] + bank.fc1_bias[expert]
    mlp = mlp * torch.sigmoid(1.702 * mlp)
    hidden = hidden + mlp @ bank.fc2_weight[expert] + bank.fc2_bias[expert]
    return hidden[position]


@pytest.mark.parametrize("num_heads", [1, 4])
def test_batched_expert_bank_equals_full_per_expert_blocks(num_heads):
    torch.manual_seed(0)
    bank = EntityCLIPExpertBank(num_experts=3, dim=16, num_heads=num_heads, mlp_ratio=4.0, eps=1e-5)
    for parameter in bank.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    queries = torch.randn(2, 7, 16)  # two query sequences; the read-out token is position 3
    keys = torch.randn(2, 5, 16)
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    outputs = bank(queries[:, 3], bank.keys_values(keys, key_mask))
    assert outputs.shape == (2, 3, 16)
    for sample in range(2):
        for expert in range(3):
            expected = _reference_expert(bank, expert, queries[sample], keys[sample], key_mask[sample], 3)
            torch.testing.assert_close(outputs[sample, expert], expected, rtol=1e-4, atol=1e-5)
    # Pairing queries with other key sequences picks those keys.
    crossed = bank(
        queries[:, 3], bank.keys_values(keys, key_mask), query_rows=torch.tensor([0]), key_rows=torch.tensor([1])
    )
    expected = _reference_expert(bank, 1, queries[0], keys[1], key_mask[1], 3)
    torch.testing.assert_close(crossed[0, 1], expected, rtol=1e-4, atol=1e-5)


def test_new_layers_start_from_pytorchs_defaults_as_the_released_code(config):
    """Experts as nn.MultiheadAttention + nn.Linear (xavier q/k/v, zero in-projection biases), gates/head as nn.Linear."""
    torch.manual_seed(0)
    model = EntityCLIPModel(config)
    dim = config.projection_dim
    bank = model.vision_experts
    in_projection_bound = (6.0 / (4 * dim)) ** 0.5
    for weight in (bank.query_weight, bank.key_value_weight):
        assert weight.abs().max() <= in_projection_bound
        assert weight.std().item() == pytest.approx(in_projection_bound / 3**0.5, rel=0.1)
    for bias in (bank.query_bias, bank.key_value_bias, bank.out_bias):
        assert torch.count_nonzero(bias) == 0
    assert bank.fc1_bias.abs().max() <= dim**-0.5 and torch.count_nonzero(bank.fc1_bias) == bank.fc1_bias.numel()
    for linear in (model.image_gate, model.text_gate, model.fusion_gate, model.itm_head):
        bound = linear.in_features**-0.5
        assert linear.weight.abs().max() <= bound and linear.bias.abs().max() <= bound
        assert torch.count_nonzero(linear.bias) == linear.bias.numel()
    # CLIP's own layers keep CLIP's scheme (not the generic std 0.02), and logit_scale its init value.
    q_proj = model.clip.text_model.encoder.layers[0].self_attn.q_proj.weight
    text = config.clip_config.text_config
    expected_std = text.hidden_size**-0.5 * (2 * text.num_hidden_layers) ** -0.5
    assert q_proj.std().item() == pytest.approx(expected_std, rel=0.15)
    assert model.clip.logit_scale.item() == pytest.approx(config.clip_config.logit_scale_init_value)


def test_config_exposes_clips_tower_configs(config):
    assert config.get_text_config() is config.clip_config.text_config
    assert config.text_config is config.clip_config.text_config
    assert config.vision_config is config.clip_config.vision_config


@pytest.mark.parametrize("return_loss", [False, True])
def test_hidden_states_and_attentions_are_passed_through(config, tiny_tokenizer, return_loss):
    eager = EntityCLIPConfig(clip_config=config.clip_config.to_dict(), attn_implementation="eager")
    model = EntityCLIPModel(eager).eval()
    batch = make_batch(tiny_tokenizer, eager)
    with torch.no_grad():
        out = model(**batch, return_loss=return_loss, output_hidden_states=True, output_attentions=True)
    layers = eager.clip_config.text_config.num_hidden_layers
    assert len(out.text_model_output.hidden_states) == layers + 1
    assert len(out.vision_model_output.attentions) == eager.clip_config.vision_config.num_hidden_layers
    with torch.no_grad():
        plain = model(**batch, return_loss=return_loss)
    assert plain.text_model_output.hidden_states is None and plain.vision_model_output.attentions is None


@pytest.mark.parametrize("gradient", [True, False])
def test_explanation_encoder_gradient_option(config, tiny_tokenizer, gradient):
    """Opt-in cheaper explanations: same forward, no gradient through the text encoder's explanation pass."""
    torch.manual_seed(0)
    reference = EntityCLIPModel(config).eval()
    option = EntityCLIPModel(EntityCLIPConfig(clip_config=config.clip_config, explanation_encoder_gradient=gradient))
    option.load_state_dict(reference.state_dict())
    option.eval()
    seen = []
    option.clip.text_projection.register_forward_hook(lambda module, args, output: seen.append(output.requires_grad))
    batch = make_batch(tiny_tokenizer, config)
    out = option(**batch, return_loss=True)
    assert seen == [True, gradient]  # the texts' pass, then the explanations' pass
    torch.testing.assert_close(out.loss, reference(**batch, return_loss=True).loss, rtol=0, atol=0)
    out.loss.backward()
    assert option.shared_experts.key_value_weight.grad.abs().sum() > 0  # the experts still learn from explanations
