"""`xent`: cross-entropy against the supervisor's soft labels (naive weak-to-strong fine-tuning)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from trustray.core.w2s.losses import check_inputs, register


@register("xent")
class CrossEntropy:
    def __call__(self, logits: Tensor, targets: Tensor, step_fraction: float) -> Tensor:
        check_inputs(logits, targets, step_fraction)
        return F.cross_entropy(logits.float(), targets.float())
