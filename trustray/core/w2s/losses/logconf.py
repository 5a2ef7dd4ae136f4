"""`logconf`: the auxiliary confidence loss of Burns et al. (2023), §4.3.2.

The target mixes the supervisor's labels with the student's own hardened predictions:
target = (1 − c)·weak + c·hard(student), so a student confident enough to disagree with its supervisor is
encouraged to keep disagreeing instead of imitating the supervisor's errors. Hardening is adaptive, as in
openai/weak-to-strong: with two classes, the student's predictions are thresholded so the batch gets the weak
labels' class balance (the threshold is that quantile of P(class 0)); with more classes, the argmax is taken.
c rises linearly from 0 to `aux_coef` over the first `warmup_fraction` of training, as the paper describes (the
reference code instead uses c = step_fraction · aux_coef during warm-up and then jumps to aux_coef).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trustray.core.w2s.losses import check_inputs, register


def hardened(probabilities: Tensor, weak_balance: Tensor) -> Tensor:
    """One-hot student predictions: thresholded to the weak labels' class balance with two classes, argmax
    otherwise."""
    classes = probabilities.shape[1]
    if classes == 2:
        threshold = torch.quantile(probabilities[:, 0], weak_balance[1].clamp(0.0, 1.0))
        first = probabilities[:, 0] >= threshold
        return torch.stack([first, ~first], dim=1).to(probabilities.dtype)
    return F.one_hot(probabilities.argmax(dim=1), classes).to(probabilities.dtype)


@register("logconf")
class AuxiliaryConfidence:
    def __init__(self, aux_coef: float = 0.5, warmup_fraction: float = 0.2) -> None:
        if not 0.0 <= aux_coef <= 1.0 or not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"aux_coef and warmup_fraction must be in [0, 1]; got {aux_coef}, {warmup_fraction}")
        self.aux_coef, self.warmup_fraction = aux_coef, warmup_fraction

    def coefficient(self, step_fraction: float) -> float:
        if self.warmup_fraction == 0.0:
            return self.aux_coef
        return self.aux_coef * min(1.0, step_fraction / self.warmup_fraction)

    def __call__(self, logits: Tensor, targets: Tensor, step_fraction: float) -> Tensor:
        check_inputs(logits, targets, step_fraction)
        logits, targets = logits.float(), targets.float()
        coefficient = self.coefficient(step_fraction)
        strong = hardened(torch.softmax(logits, dim=1).detach(), targets.mean(dim=0))
        return F.cross_entropy(logits, (1.0 - coefficient) * targets + coefficient * strong)
