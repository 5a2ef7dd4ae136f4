"""`certainty` and `uncertainty`: pairs by the size of DPO's implicit reward margin |β·Δ log-ratio|.

Muldrew et al. (2024) found the pairs the policy is most *certain* about (largest margin) the most useful once
the policy has started to learn: a confident wrong ranking is the costliest to leave uncorrected. `uncertainty`
takes the smallest margins instead, the textbook choice."""

from __future__ import annotations

import numpy as np

from trustray.core.align.acquisition import CandidatePool, register, top


@register("certainty", needs=("implicit_margin",))
def certainty(pool: CandidatePool, budget: int, rng: np.random.Generator) -> list[int]:
    return top(np.abs(pool.statistic("implicit_margin")), budget, rng)


@register("uncertainty", needs=("implicit_margin",))
def uncertainty(pool: CandidatePool, budget: int, rng: np.random.Generator) -> list[int]:
    return top(-np.abs(pool.statistic("implicit_margin")), budget, rng)
