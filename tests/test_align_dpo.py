"""DPO: the loss against hand-computed values, response log-probs against a token loop, the reference equal to
the base model, training that learns the preferences, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import math

import pytest
import torch

from trustray.core.align.dpo import DPOSettings, DPOTrainer, dpo_losses, response_logprobs
from trustray.core.influence.warmup import LoraSettings, add_lora

torch.set_num_threads(1)
PAIRS = [
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris.", "Rome is a city."),
    ([{"role": "user", "content": "What is the capital of Italy?"}], "Rome.", "Paris is a city."),
    ([{"role": "user", "content": "Where is Apple headquartered?"}], "Cupertino.", "Redmond, Washington."),
    ([{"role": "user", "content": "Where is Microsoft headquartered?"}], "Redmond.", "Cupertino, California."),
]


def test_dpo_loss_matches_the_formula():
    losses, margin = dpo_losses(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]),
                                torch.tensor([-1.5, -2.0]), beta=0.5)
    assert margin.tolist() == pytest.approx([0.5 * (0.5 + 0.5), 0.5 * (-1.0 - 1.0)])
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0))])
    smoothed, _ = dpo_losses(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([-2.0]),
                             beta=1.0, label_smoothing=0.2)
    m = -2.0
    assert smoothed.item() == pytest.approx(0.8 * math.log1p(math.exp(-m)) + 0.2 * math.log1p(math.exp(m)))
    with pytest.raises(ValueError):
        dpo_losses(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.0)


def test_response_logprobs_sum_the_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    expected = []
    for row in range(2):
        total = 0.0
        for position in range(1, 5):
            if labels[row, position] != -100:
                total += torch.log_softmax(logits[row, position - 1], -1)[labels[row, position]].item()
        expected.append(total)
    assert response_logprobs(logits, labels).tolist() == pytest.approx(expected, abs=1e-5)


def _trainer(folder: str, settings: DPOSettings) -> DPOTrainer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), settings.lora)
    return DPOTrainer(model, AutoTokenizer.from_pretrained(folder), PAIRS, settings)


SETTINGS = DPOSettings(learning_rate=5e-3, epochs=6, batch_size=2, beta=0.5,
                       lora=LoraSettings(r=4, target_modules=["q_proj", "v_proj", "o_proj"], layers=[-1]))


def test_reference_is_the_base_model_and_training_learns_the_preferences(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    trainer = _trainer(tiny_llama_dir, SETTINGS)
    assert trainer.prefix > 0  # the frozen layers are cached
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    from trustray.core.lm.batching import collate

    batch = collate([{k: v for k, v in e.items() if k != "inputs_embeds"} for e in trainer.chosen], 0)
    with torch.no_grad():
        direct = response_logprobs(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"])
    assert trainer.reference_chosen.tolist() == pytest.approx(direct.tolist(), abs=1e-4)
    log = [trainer.step(step) for step in range(1, trainer.total_steps + 1)]
    assert trainer.total_steps == 12
    assert log[-1]["loss"] < log[0]["loss"]
    with torch.no_grad():
        margin = ((trainer.logprobs(trainer.chosen, grad=False) - trainer.reference_chosen)
                  - (trainer.logprobs(trainer.rejected, grad=False) - trainer.reference_rejected))
    assert (margin > 0).all()


def test_resumed_training_equals_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    settings = SETTINGS.model_copy(update={"epochs": 2})
    whole = _trainer(tiny_llama_dir, settings)
    for step in range(1, whole.total_steps + 1):
        whole.step(step)
    first = _trainer(tiny_llama_dir, settings)
    for step in (1, 2):
        first.step(step)
    first.save(tmp_path / "step-2")
    resumed = _trainer(tiny_llama_dir, settings)
    resumed.load(tmp_path / "step-2")
    for step in range(3, resumed.total_steps + 1):
        resumed.step(step)
    expected = {n: p for n, p in whole.model.named_parameters() if p.requires_grad}
    for name, parameter in resumed.model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter, expected[name], atol=1e-6, rtol=1e-5)
