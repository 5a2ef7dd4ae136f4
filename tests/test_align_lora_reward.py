"""The LoRA reward model: rewards through the cached prefix equal the full model's, training ranks the training
pairs right, the heads disagree (bootstrap), and temperature scaling is fitted."""

from __future__ import annotations

import pytest
import torch

from trustray.core.align.lora_reward import LoraRewardModel
from trustray.core.influence.warmup import LoraSettings, add_lora
from trustray.core.lm.batching import IGNORE_INDEX, collate

torch.set_num_threads(1)
QUESTIONS = ["What is the capital of France?", "What is the capital of Italy?", "Where is Apple headquartered?",
             "Where is Microsoft headquartered?", "Who developed relativity?", "What is the largest ocean?"]
CHOSEN = [([{"role": "user", "content": q}], "The capital answer is here, said at length.") for q in QUESTIONS]
REJECTED = [([{"role": "user", "content": q}], "No.") for q in QUESTIONS]


def _reward_model(folder: str, heads: int = 3) -> LoraRewardModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                     LoraSettings(r=4, target_modules=["q_proj", "v_proj", "o_proj"], layers=[-1]))
    return LoraRewardModel(model, AutoTokenizer.from_pretrained(folder), heads=heads, max_length=96)


def test_cached_prefix_rewards_equal_the_full_model(tiny_llama_dir):
    reward_model = _reward_model(tiny_llama_dir)
    assert reward_model.prefix == 1
    rewards = reward_model.head_rewards(CHOSEN[:3])
    examples = [{k: v for k, v in e.items() if k != "inputs_embeds"} for e in reward_model.encode(CHOSEN[:3])]
    batch = collate(examples, reward_model.pad)
    with torch.no_grad():
        states = reward_model.model.get_base_model().model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        response = (batch["labels"] != IGNORE_INDEX).float()[..., None]
        pooled = (states * response).sum(dim=1) / response.sum(dim=1)
    torch.testing.assert_close(rewards, (reward_model.heads.detach() @ pooled.T).double(), atol=1e-4, rtol=1e-4)


def test_training_ranks_the_pairs_and_the_heads_disagree(tiny_llama_dir):
    reward_model = _reward_model(tiny_llama_dir)
    before = reward_model.compare(CHOSEN, REJECTED).probability
    losses = reward_model.fit(CHOSEN, REJECTED, epochs=8, batch_size=3, learning_rate=1e-2)
    assert losses[-1] < losses[0]
    after = reward_model.compare(CHOSEN, REJECTED)
    assert (after.probability > 0.5).all() and after.probability.mean() > before.mean()
    assert (after.variance > 0).any()
    temperature = reward_model.calibrate(CHOSEN[:3] + REJECTED[3:], REJECTED[:3] + CHOSEN[3:],
                                         torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    assert temperature > 0 and reward_model.temperature == temperature
    with pytest.raises(ValueError):
        reward_model.fit(CHOSEN, REJECTED[:2])
