"""`entropy`: the prompts the policy is least sure how to answer first (Muldrew et al. 2024's predictive
entropy), one pair per prompt before any prompt gets a second."""

from __future__ import annotations

import numpy as np

from trustray.core.align.acquisition import CandidatePool, register


def spread_over_prompts(pool: CandidatePool, order: list[int], budget: int) -> list[int]:
    """`budget` pairs taken in `order`, but each prompt's k-th pair only after every listed prompt's (k−1)-th."""
    rank_in_prompt: dict[int, int] = {}
    keyed = []
    for position, index in enumerate(order):
        prompt = int(pool.prompt_index[index])
        rank_in_prompt[prompt] = rank_in_prompt.get(prompt, -1) + 1
        keyed.append((rank_in_prompt[prompt], position, index))
    return [index for _, _, index in sorted(keyed)[:budget]]


@register("entropy", needs=("policy_entropy",))
def entropy(pool: CandidatePool, budget: int, rng: np.random.Generator) -> list[int]:
    scores = pool.statistic("policy_entropy")
    order = np.lexsort((rng.random(len(pool)), -scores))
    return spread_over_prompts(pool, [int(i) for i in order], budget)
