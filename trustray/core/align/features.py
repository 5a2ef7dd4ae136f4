"""Frozen-backbone features of (prompt, response) conversations: what the reward heads and the OOD score read.

A conversation's feature is the frozen chat model's final hidden state (after the last norm) at the response's
last token, the template's end-of-turn token: the position that has read the whole exchange, as in the reward
models of Ouyang et al. (2022) and TRL's `RewardTrainer` (`pooling="last"`); or the mean of those states over
the response's tokens (`pooling="mean"`), which a frozen model that was never trained to summarise a reply in
its last token often reads better. The backbone is never trained here, so each feature is
computed once and can be cached with its conversation. Batches are right-padded (`trustray.core.lm.batching`),
so a feature does not depend on the batch it is computed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trustray.core.lm.batching import IGNORE_INDEX, collate, encode_chat


def response_features(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[Mapping[str, str]]],
                      responses: Sequence[str], batch_size: int = 16, max_length: int = 256,
                      pooling: str = "last") -> Tensor:
    """[n, hidden] float32 features of each prompt's messages followed by its response (an assistant turn).

    A conversation longer than `max_length` tokens keeps its start, so its feature is read at the last kept
    token; `encode_chat` raises when the prompt alone fills `max_length`.
    """
    depth = model.config.num_hidden_layers
    return response_features_at(model, tokenizer, prompts, responses, [depth], batch_size, max_length, pooling)[depth]


@torch.no_grad()
def response_features_at(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[Mapping[str, str]]],
                         responses: Sequence[str], layers: Sequence[int], batch_size: int = 16,
                         max_length: int = 256, pooling: str = "last") -> dict[int, Tensor]:
    """`response_features` read after each of `layers` decoder layers (the model's depth: its final, normed
    states; a lower l: the raw output of layer l, what a model cut to its first l layers would see before its
    norm), from one forward pass: {layer: [n, hidden]}."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling is 'last' or 'mean', got {pooling!r}")
    depth = model.config.num_hidden_layers
    if not layers or any(not 1 <= layer <= depth for layer in layers):
        raise ValueError(f"layers must be in [1, {depth}], got {list(layers)}")
    examples = [encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": response}], max_length)
                for prompt, response in zip(prompts, responses, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
    features: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad)
        # hidden_states[l] is layer l's output for l < depth; the last entry is the final, normed one.
        states = backbone.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                output_hidden_states=True).hidden_states
        response = (batch["labels"] != IGNORE_INDEX).to(device)[..., None]
        last = (batch["attention_mask"].sum(dim=1) - 1).to(device)
        for layer in layers:
            hidden = states[layer]
            if pooling == "last":
                features[layer].append(hidden[torch.arange(len(last)), last].float().cpu())
            else:
                mask = response.to(hidden.dtype)
                features[layer].append(((hidden * mask).sum(dim=1) / mask.sum(dim=1)).float().cpu())
    return {layer: torch.cat(parts) if parts else torch.zeros(0, model.config.hidden_size)
            for layer, parts in features.items()}
