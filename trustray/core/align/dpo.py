"""Direct preference optimisation (Rafailov et al. 2023) of LoRA adapters, in plain torch.

The loss of a pair (x, chosen, rejected) is −log σ(β·[(log π(c|x) − log π_ref(c|x)) − (log π(r|x) − log π_ref(r|x))]),
with the conservative variant's label smoothing ε (Mitchell 2023, TRL's `label_smoothing`) for noisy labels:
−(1 − ε)·log σ(m) − ε·log σ(−m). Log-probabilities are summed over the response tokens only (`encode_chat`'s
labels). The reference is the same model with its adapters turned off (peft's `disable_adapter`), so there is one
copy of the weights, and its log-probabilities are computed once per pair: they never change.

`DPOTrainer` trains only the LoRA adapters of the top decoder layers, so the layers underneath are frozen and
their output for a conversation never changes either: it is cached once (`trustray.core.lm.prefix`) and every
step runs just the adapted layers and the head, the same trick the influence evaluation uses. A step's batch is
drawn from its step number alone (epoch permutations seeded `seed + epoch`), so a resumed run replays exactly the
steps an uninterrupted one takes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from trustray.config import BaseConfig
from trustray.core.influence.warmup import LoraSettings
from trustray.core.lm.batching import IGNORE_INDEX, collate, encode_chat
from trustray.core.lm.losses import model_inputs
from trustray.core.lm.prefix import frozen_prefix_length, prefix_states, skipped_prefix, with_states

OPTIMIZER_FILE = "optimizer.pt"


def default_dpo_lora() -> LoraSettings:
    return LoraSettings(r=8, alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                         "down_proj", "gate_proj"], layers=[-4, -3, -2, -1])


class DPOSettings(BaseConfig):
    """DPO on LoRA adapters of the top layers (TRL's defaults where they apply: β 0.1, sigmoid loss)."""

    beta: float = Field(0.1, gt=0, description="β: how far the policy may move from the reference.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε of conservative DPO: the assumed label noise.")
    learning_rate: float = Field(5e-4, gt=0, description="AdamW learning rate (constant).")
    epochs: int = Field(2, ge=1, description="Passes over the labelled pairs.")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step.")
    max_length: int = Field(160, ge=16, description="Longest prompt plus response, in tokens (the end is cut).")
    lora: LoraSettings = Field(default_factory=default_dpo_lora, description="The trained adapters.")


def dpo_losses(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
               beta: float, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per pair: the (conservative) DPO loss and the implicit reward margin β·Δ log-ratio, from summed log-probs."""
    if beta <= 0 or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"need beta > 0 and 0 <= label_smoothing < 0.5; got {beta}, {label_smoothing}")
    margin = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    losses = (-(1 - label_smoothing) * nn.functional.logsigmoid(margin)
              - label_smoothing * nn.functional.logsigmoid(-margin))
    return losses, margin


def response_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """[B] sums of log p(token) over each row's labelled (response) tokens."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    scored = shift_labels != IGNORE_INDEX
    token_logprobs = torch.log_softmax(shift_logits, dim=-1).gather(
        -1, shift_labels.clamp_min(0)[..., None]).squeeze(-1)
    return (token_logprobs * scored).sum(dim=1)


def encode_conversations(model: nn.Module, tokenizer: Any,
                         conversations: Sequence[tuple[Sequence[Mapping[str, str]], str]], max_length: int,
                         prefix: int) -> list[dict[str, Any]]:
    """(prompt messages, response) pairs as encoded examples, carrying their output of the `prefix` frozen bottom
    layers (none when `prefix` is 0)."""
    examples = [encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": response}], max_length)
                for prompt, response in conversations]
    if prefix == 0 or not examples:
        return examples
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return with_states(examples, prefix_states(model, examples, prefix, pad_token_id=pad))


def conversation_logprobs(model: nn.Module, examples: Sequence[Mapping[str, Any]], prefix: int, pad: int,
                          grad: bool = False, batch_size: int = 16) -> Tensor:
    """[n] summed response log-probs of `encode_conversations`' examples under `model` as it is now."""
    device = next(model.parameters()).device
    results = []
    with torch.set_grad_enabled(grad), skipped_prefix(model, prefix, require_frozen=grad):
        for start in range(0, len(examples), batch_size):
            batch = {key: value.to(device) for key, value in collate(examples[start : start + batch_size], pad).items()}
            results.append(response_logprobs(model(**model_inputs(batch)).logits, batch["labels"]))
    return torch.cat(results) if results else torch.zeros(0)


class DPOTrainer:
    """DPO of a PeftModel's adapters on (prompt messages, chosen, rejected) triples, one AdamW step at a time;
    `seed` orders each epoch's pairs (the adapters' initialisation is the caller's)."""

    def __init__(self, model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[Sequence[Mapping[str, str]], str, str]],
                 settings: DPOSettings, seed: int = 0) -> None:
        if not pairs:
            raise ValueError("DPO needs at least one labelled pair")
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        if not parameters or not hasattr(model, "disable_adapter"):
            raise ValueError("the model must be a PeftModel with trainable adapters (see add_lora)")
        self.model, self.settings, self.seed = model, settings, seed
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prefix = frozen_prefix_length(model)
        self.chosen = encode_conversations(model, tokenizer, [(prompt, chosen) for prompt, chosen, _ in pairs],
                                           settings.max_length, self.prefix)
        self.rejected = encode_conversations(model, tokenizer, [(prompt, rejected) for prompt, _, rejected in pairs],
                                             settings.max_length, self.prefix)
        with model.disable_adapter():
            self.reference_chosen = self.logprobs(self.chosen, grad=False)
            self.reference_rejected = self.logprobs(self.rejected, grad=False)
        self.steps_per_epoch = math.ceil(len(pairs) / settings.batch_size)
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)

    def logprobs(self, examples: Sequence[Mapping[str, Any]], grad: bool, batch_size: int = 16) -> Tensor:
        """[n] summed response log-probs under the model as it is now (adapters on unless disabled by the caller)."""
        return conversation_logprobs(self.model, examples, self.prefix, self.pad, grad, batch_size)

    def step_pairs(self, step: int) -> list[int]:
        """The pair indices of optimizer step `step` (1-based)."""
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        order = torch.randperm(len(self.chosen), generator=torch.Generator().manual_seed(self.seed + epoch))
        size = self.settings.batch_size
        return order[index * size : (index + 1) * size].tolist()

    def step(self, step: int) -> dict[str, float]:
        """Take optimizer step `step`; returns its loss, the share of pairs ranked right and the mean margin."""
        indices = self.step_pairs(step)
        self.model.train()
        policy = self.logprobs([self.chosen[i] for i in indices] + [self.rejected[i] for i in indices], grad=True,
                               batch_size=2 * len(indices))
        losses, margin = dpo_losses(policy[: len(indices)], policy[len(indices) :], self.reference_chosen[indices],
                                    self.reference_rejected[indices], self.settings.beta, self.settings.label_smoothing)
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.eval()
        return {"loss": float(loss.detach()), "accuracy": float((margin > 0).double().mean()),
                "margin": float(margin.detach().mean())}

    def save(self, folder: str | Path) -> None:
        """The adapter (peft's format, loadable by any engine) and the optimizer state."""
        folder = Path(folder)
        self.model.save_pretrained(folder)
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load(self, folder: str | Path) -> None:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        folder = Path(folder)
        set_peft_model_state_dict(self.model, load_peft_weights(str(folder), device=str(self.device)))
        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
