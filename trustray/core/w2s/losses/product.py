"""`product`: cross-entropy against the normalised product of the supervisor's labels and the student's own
predictions, target ∝ weak^alpha · student^beta (openai/weak-to-strong's `product_loss_fn`): where the student is
confident, its own belief outweighs a hesitant supervisor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trustray.core.w2s.losses import check_inputs, register


@register("product")
class Product:
    def __init__(self, alpha: float = 1.0, beta: float = 1.0) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be non-negative; got {alpha}, {beta}")
        self.alpha, self.beta = alpha, beta

    def __call__(self, logits: Tensor, targets: Tensor, step_fraction: float) -> Tensor:
        check_inputs(logits, targets, step_fraction)
        logits, targets = logits.float(), targets.float()
        product = torch.softmax(logits, dim=1).detach().pow(self.beta) * targets.pow(self.alpha)
        return F.cross_entropy(logits, product / product.sum(dim=1, keepdim=True).clamp_min(1e-12))
