"""Running per-feature statistics for the editors' input normalisers (MALMEN and MEND).

Keys and value gradients differ in scale by orders of magnitude between layers and models; standardising them is
what lets one hyper-network initialisation and learning rate work everywhere. Batches are merged exactly
(Chan et al.'s parallel form of Welford's update) in float64, so merging millions of rows stays accurate.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RunningStats(nn.Module):
    """Buffers `count`, `mean`, `m2` (sum of squared deviations) of every row merged by `update`."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        if rows.shape[0] == 0:
            return
        rows = rows.detach().to(self.mean)
        batch_count = float(rows.shape[0])
        batch_mean = rows.mean(dim=0)
        total = float(self.count) + batch_count
        delta = batch_mean - self.mean
        self.m2 += (rows - batch_mean).square().sum(dim=0) + delta.square() * (float(self.count) * batch_count / total)
        self.mean += delta * (batch_count / total)
        self.count += batch_count

    def stats(self) -> tuple[Tensor, Tensor]:
        """(mean, unbiased std), float64; needs at least two rows."""
        if float(self.count) < 2:
            raise RuntimeError(f"the normaliser has seen {int(self.count)} rows; it needs at least 2")
        return self.mean, (self.m2 / (self.count - 1)).sqrt()
