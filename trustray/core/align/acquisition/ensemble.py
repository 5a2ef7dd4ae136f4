"""`ensemble`: the pairs the reward-model heads disagree on most (variance of P(a ≻ b) across heads; query by
committee)."""

from __future__ import annotations

import numpy as np

from trustray.core.align.acquisition import CandidatePool, register, top


@register("ensemble", needs=("ensemble_variance",))
def ensemble(pool: CandidatePool, budget: int, rng: np.random.Generator) -> list[int]:
    return top(pool.statistic("ensemble_variance"), budget, rng)
