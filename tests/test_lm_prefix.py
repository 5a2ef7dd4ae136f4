"""Cached frozen layers: the same losses, gradients and training as the full model; layers restored."""

from __future__ import annotations

import pytest
import torch

from trustray.core.influence.gradients import per_example_gradients
from trustray.core.influence.warmup import LoraSettings, WarmupSettings, add_lora, train_lora
from trustray.core.lm.batching import collate, encode_chat
from trustray.core.lm.losses import example_losses
from trustray.core.lm.prefix import (
    decoder_layers,
    frozen_prefix_length,
    prefix_states,
    skipped_prefix,
    with_states,
)

torch.set_num_threads(1)
MESSAGES = [
    [{"role": "user", "content": f"Tell me about topic {i}."},
     {"role": "assistant", "content": "It is a thing " * (i + 1)}]
    for i in range(6)
]


def _model(folder: str, layers: list[int] | None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = add_lora(model, LoraSettings(r=2, target_modules=["q_proj", "v_proj"], layers=layers))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the adapter an effect
            torch.nn.init.normal_(parameter, std=0.05)
    return model


@pytest.fixture(scope="module")
def examples(tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return [encode_chat(tokenizer, messages, 48) for messages in MESSAGES]


def test_lora_layers_accept_negative_indices_and_reject_out_of_range(tiny_llama_dir):
    model = _model(tiny_llama_dir, [-1])
    assert frozen_prefix_length(model) == 1
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in name for name in names)
    assert frozen_prefix_length(_model(tiny_llama_dir, None)) == 0
    with pytest.raises(ValueError, match="out of range"):
        _model(tiny_llama_dir, [2])


def test_cached_prefix_gives_the_same_losses_and_per_example_gradients(tiny_llama_dir, examples):
    model = _model(tiny_llama_dir, [-1]).eval()
    full = collate(examples, 0)
    losses, grads = example_losses(model, full), per_example_gradients(model, full)
    layers = frozen_prefix_length(model)
    states = prefix_states(model, examples, layers, batch_size=4)
    assert [s.shape[0] for s in states] == [len(e["input_ids"]) for e in examples]
    original = list(decoder_layers(model))
    with skipped_prefix(model, layers):
        cached = collate(with_states(examples, states), 0)
        assert "input_ids" not in cached and cached["inputs_embeds"].shape[:2] == full["input_ids"].shape
        torch.testing.assert_close(example_losses(model, cached), losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(per_example_gradients(model, cached).flat(), grads.flat(), rtol=1e-4, atol=1e-7)
    assert list(decoder_layers(model)) == original  # the real layers are back


def test_training_through_the_cache_matches_training_the_full_model(tiny_llama_dir, examples):
    settings = WarmupSettings(learning_rate=1e-2, epochs=1, batch_size=3, grad_accumulation=1, warmup_ratio=0.0)
    full = _model(tiny_llama_dir, [-1])
    train_lora(full, examples, settings, progress_bar=False)
    cached = _model(tiny_llama_dir, [-1])
    layers = frozen_prefix_length(cached)
    states = prefix_states(cached, examples, layers)
    with skipped_prefix(cached, layers):
        train_lora(cached, with_states(examples, states), settings, progress_bar=False)
    for (name, a), (_, b) in zip(full.named_parameters(), cached.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_refuses_to_skip_trainable_layers_or_mix_inputs(tiny_llama_dir, examples):
    model = _model(tiny_llama_dir, None)
    with pytest.raises(ValueError, match="trainable"), skipped_prefix(model, 1):
        pass
    with pytest.raises(ValueError, match="no frozen prefix"):
        prefix_states(model, examples, 0)
    states = prefix_states(_model(tiny_llama_dir, [-1]), examples[:1], 1)
    with pytest.raises(ValueError, match="every example"):
        collate([*with_states(examples[:1], states), examples[1]], 0)
