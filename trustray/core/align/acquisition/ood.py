"""`ood`: the pairs whose responses lie furthest from what the reward model was trained on (relative
Mahalanobis score)."""

from __future__ import annotations

import numpy as np

from trustray.core.align.acquisition import CandidatePool, register, top


@register("ood", needs=("ood_score",))
def ood(pool: CandidatePool, budget: int, rng: np.random.Generator) -> list[int]:
    return top(pool.statistic("ood_score"), budget, rng)
