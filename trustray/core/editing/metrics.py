"""Edit metrics, teacher-forced: does the model predict every answer token given the prompt?

ES / GS / LS in the editing literature are per-example token accuracies averaged over examples: the fraction of
answer tokens that are the argmax of the model's next-token distribution when the previous gold tokens are fed.
`exact` is stricter: every answer token right. For locality, `agreement` compares the edited model with the
unedited one (same argmax) rather than with a gold answer a 135M model may never have known.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trustray.core.lm.losses import model_inputs


def _positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(mask over logits positions that predict a label, the labels they predict) — transformers alignment."""
    targets = labels[:, 1:]
    return targets != -100, targets


def answer_window(labels: Tensor) -> int:
    """How many final positions of a batch hold every position whose next token is labelled.

    Passed to the model as `logits_to_keep`, so the vocabulary projection (most of a small model's cost) runs on
    the answers only, not on the prompts.
    """
    labelled = (labels[:, 1:] != -100).any(dim=0).nonzero()
    return labels.shape[1] - int(labelled[0]) if len(labelled) else labels.shape[1]


@torch.no_grad()
def answer_predictions(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(argmax predictions [B, T-1], targets [B, T-1], mask [B, T-1]) at the answer positions of a batch.

    Predictions outside the answer window are -1 (never compared: the mask is False there).
    """
    mask, targets = _positions(batch["labels"])
    keep = answer_window(batch["labels"])
    logits = model(**model_inputs(batch), logits_to_keep=keep).logits
    predictions = torch.full_like(targets, -1)
    predictions[:, targets.shape[1] - keep + 1 :] = logits[:, :-1].argmax(dim=-1)
    return predictions, targets, mask


def token_accuracy(predictions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Per example: the fraction of answer tokens predicted right `[B]`."""
    correct = ((predictions == targets) & mask).sum(dim=1).float()
    return correct / mask.sum(dim=1).clamp(min=1)


def exact_match(predictions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Per example: 1.0 when every answer token is predicted right `[B]`."""
    return (((predictions == targets) | ~mask).all(dim=1)).float()


def agreement(predictions: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """Per example: the fraction of answer positions where two models predict the same token `[B]`."""
    return (((predictions == reference) & mask).sum(dim=1).float()) / mask.sum(dim=1).clamp(min=1)


def known_tokens(predictions: Tensor, reference: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per example: (answer tokens the reference model predicted right, how many of those `predictions` still
    predict right), each `[B]`."""
    was_right = mask & (reference == targets)
    return was_right.sum(dim=1), (was_right & (predictions == targets)).sum(dim=1)
