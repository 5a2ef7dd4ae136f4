"""`random`: uniformly random pairs, the baseline every other acquisition function is compared with."""

from __future__ import annotations

import numpy as np

from trustray.core.align.acquisition import CandidatePool, register


@register("random")
def random_pairs(pool: CandidatePool, budget: int, rng: np.random.Generator) -> list[int]:
    return [int(i) for i in rng.permutation(len(pool))[:budget]]
