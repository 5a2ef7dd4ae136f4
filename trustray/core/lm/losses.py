"""Per-example next-token losses of a collated batch (labels == -100 are not scored)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over each example's labelled tokens (labels == -100 are ignored)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=-100, reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != -100).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's inputs of a collated batch: token ids, or cached hidden states as `inputs_embeds`."""
    key = "inputs_embeds" if "inputs_embeds" in batch else "input_ids"
    return {key: batch[key], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def example_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Each example's mean loss over its labelled tokens `[B]`, without gradients."""
    return per_example_loss(model(**model_inputs(batch)).logits, batch["labels"]).float()
