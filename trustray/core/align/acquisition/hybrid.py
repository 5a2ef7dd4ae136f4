"""`hybrid` (Muldrew et al. 2024): keep the pairs of the highest-entropy prompts, `PROMPT_FACTOR` times the
budget of them, then take the most certain pairs (largest implicit reward margin) among those."""

from __future__ import annotations

import numpy as np

from trustray.core.align.acquisition import CandidatePool, register, top
from trustray.core.align.acquisition.entropy import entropy

PROMPT_FACTOR = 2


@register("hybrid", needs=("policy_entropy", "implicit_margin"))
def hybrid(pool: CandidatePool, budget: int, rng: np.random.Generator) -> list[int]:
    shortlist = np.asarray(entropy(pool, min(len(pool), PROMPT_FACTOR * budget), rng))
    margins = np.abs(pool.statistic("implicit_margin"))[shortlist]
    return [int(shortlist[i]) for i in top(margins, budget, rng)]
