"""The LoRA variant of the Bradley–Terry reward model: the chat model's top layers adapt (LoRA) under K linear heads.

A response's reward is r_k(x) = w_kᵀ h(x), with h(x) the adapted model's final hidden state pooled over the
response (its mean, or the last token's), and K heads sharing the adapted body. Each head is trained on its own
bootstrap resample of the pairs, drawn as Poisson(1) weights per pair and head (the online bootstrap of Oza &
Russell 2001), so one pass trains them all and their spread is the ensemble's disagreement, as with the
frozen-feature `RewardEnsemble`; predictions are the heads' mean, and a temperature can be fitted afterwards on a
calibration split (`trustray.core.align.calibration.fit_temperature`). The loss is the logistic Bradley–Terry
loss −log σ(r(chosen) − r(rejected)), by AdamW on the adapters and heads. The frozen layers underneath are cached
once per conversation (`trustray.core.lm.prefix`), so a step runs only the adapted layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trustray.core.align.dpo import encode_conversations
from trustray.core.align.reward import PairPredictions
from trustray.core.lm.batching import IGNORE_INDEX, collate
from trustray.core.lm.prefix import decoder_layers, frozen_prefix_length, skipped_prefix

Conversation = tuple[Sequence[Mapping[str, str]], str]


class LoraRewardModel:
    """K reward heads on a LoRA-adapted chat model (see the module docstring); `model` is a PeftModel."""

    def __init__(self, model: nn.Module, tokenizer: Any, heads: int = 5, pooling: str = "mean",
                 max_length: int = 160, seed: int = 0) -> None:
        if not hasattr(model, "get_base_model"):
            raise ValueError("the model must be a PeftModel with trainable adapters (see add_lora)")
        if heads < 1 or pooling not in ("last", "mean"):
            raise ValueError(f"need heads >= 1 and pooling 'last' or 'mean'; got {heads}, {pooling!r}")
        self.model, self.tokenizer, self.pooling, self.max_length = model, tokenizer, pooling, max_length
        self.device = next(model.parameters()).device
        self.prefix = frozen_prefix_length(model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generator = torch.Generator().manual_seed(seed)
        hidden = model.config.hidden_size
        self.heads = nn.Parameter(torch.randn(heads, hidden, generator=generator).to(self.device) * hidden ** -0.5)
        self.seed = seed
        self.temperature = 1.0

    def _hidden(self, examples: Sequence[Mapping[str, Any]], grad: bool, batch_size: int) -> Tensor:
        """[n, hidden] pooled final hidden states of encoded examples (adapters on)."""
        body = self.model.get_base_model().model
        decoder_layers(self.model)  # a Llama-shaped model, as the prefix cache needs
        pooled = []
        with torch.set_grad_enabled(grad), skipped_prefix(self.model, self.prefix, require_frozen=grad):
            for start in range(0, len(examples), batch_size):
                batch = {key: value.to(self.device)
                         for key, value in collate(examples[start : start + batch_size], self.pad).items()}
                key = "inputs_embeds" if "inputs_embeds" in batch else "input_ids"
                states = body(**{key: batch[key]}, attention_mask=batch["attention_mask"]).last_hidden_state.float()
                if self.pooling == "last":
                    last = batch["attention_mask"].sum(dim=1) - 1
                    pooled.append(states[torch.arange(len(last)), last])
                else:
                    response = (batch["labels"] != IGNORE_INDEX).to(states.dtype)[..., None]
                    pooled.append((states * response).sum(dim=1) / response.sum(dim=1).clamp_min(1))
        return torch.cat(pooled)

    def encode(self, conversations: Sequence[Conversation]) -> list[dict[str, Any]]:
        return encode_conversations(self.model, self.tokenizer, conversations, self.max_length, self.prefix)

    def fit(self, chosen: Sequence[Conversation], rejected: Sequence[Conversation], epochs: int = 3,
            batch_size: int = 8, learning_rate: float = 1e-3) -> list[float]:
        """Train the adapters and heads on (chosen ≻ rejected) pairs; returns each epoch's mean loss."""
        if len(chosen) != len(rejected) or not chosen:
            raise ValueError(f"need as many chosen as rejected conversations, at least one; got {len(chosen)}, "
                             f"{len(rejected)}")
        chosen_examples, rejected_examples = self.encode(chosen), self.encode(rejected)
        generator = torch.Generator().manual_seed(self.seed)
        weights = torch.poisson(torch.ones(len(self.heads), len(chosen)), generator=generator).to(self.device)
        parameters = [p for p in self.model.parameters() if p.requires_grad] + [self.heads]
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
        self.model.train()
        losses = []
        for epoch in range(epochs):
            order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(self.seed + 1 + epoch))
            total = 0.0
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size].tolist()
                hidden = self._hidden([chosen_examples[i] for i in rows] + [rejected_examples[i] for i in rows],
                                      grad=True, batch_size=2 * len(rows))
                gaps = (hidden[: len(rows)] - hidden[len(rows) :]) @ self.heads.T  # [b, K]
                weight = weights[:, rows].T
                loss = (nn.functional.softplus(-gaps) * weight).sum() / weight.sum().clamp_min(1.0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(rows)
            losses.append(total / len(order))
        self.model.eval()
        self.temperature = 1.0
        return losses

    @torch.no_grad()
    def head_rewards(self, conversations: Sequence[Conversation], batch_size: int = 16) -> Tensor:
        """Every head's reward of each conversation's response, [K, n]."""
        return (self.heads @ self._hidden(self.encode(conversations), grad=False, batch_size=batch_size).T).double()

    def compare(self, a: Sequence[Conversation], b: Sequence[Conversation]) -> PairPredictions:
        """P(a ≻ b) per pair (mean of the heads' at the fitted temperature), the heads' variance, the mean gap."""
        gaps = self.head_rewards(a) - self.head_rewards(b)
        probabilities = torch.sigmoid(gaps / self.temperature)
        return PairPredictions(probabilities.mean(dim=0), probabilities.var(dim=0, unbiased=False), gaps.mean(dim=0))

    def calibrate(self, a: Sequence[Conversation], b: Sequence[Conversation], a_preferred: Tensor) -> float:
        from trustray.core.align.calibration import fit_temperature

        self.temperature = fit_temperature(self.head_rewards(a) - self.head_rewards(b), a_preferred)
        return self.temperature
