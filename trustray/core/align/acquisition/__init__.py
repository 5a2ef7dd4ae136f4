"""Acquisition functions: which candidate pairs to send to a labeler, given a budget.

Each function lives in its own module and registers itself with `@register("name")`; adding one is one file and
one line in `_MODULES`. A function takes a `CandidatePool` (one row per candidate pair, with whatever statistics
the loop computed) and returns the indices of at most `budget` distinct pairs. It names the statistics it
needs in `needs`, so the loop computes only those and a missing one is an error, not a silent random choice.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class CandidatePool:
    """Candidate pairs: `prompt_index` [n] names each pair's prompt; `statistics` maps a name to an [n] array:

    - `policy_entropy`: the policy's predictive entropy of the pair's prompt (estimated from sampled completions);
    - `implicit_margin`: DPO's implicit reward margin of the pair (`trustray.core.align.uncertainty`);
    - `ensemble_variance`: the reward ensemble's variance of P(a ≻ b) across heads;
    - `ood_score`: the (relative) Mahalanobis score of the pair's responses.
    """

    prompt_index: np.ndarray
    statistics: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompt_index = np.asarray(self.prompt_index)
        for name, values in self.statistics.items():
            values = np.asarray(values, dtype=np.float64)
            if values.shape != self.prompt_index.shape:
                raise ValueError(f"statistic {name!r} has shape {values.shape}, the pool {self.prompt_index.shape}")
            if not np.isfinite(values).all():
                raise ValueError(f"statistic {name!r} has non-finite values")
            self.statistics[name] = values

    def __len__(self) -> int:
        return len(self.prompt_index)

    def statistic(self, name: str) -> np.ndarray:
        if name not in self.statistics:
            raise KeyError(f"the candidate pool has no {name!r} statistic (has {sorted(self.statistics)})")
        return self.statistics[name]


class Acquisition(Protocol):
    needs: tuple[str, ...]

    def __call__(self, pool: CandidatePool, budget: int, rng: np.random.Generator) -> list[int]: ...


ACQUISITIONS: dict[str, Acquisition] = {}
_MODULES = ("random_pairs", "entropy", "margin", "hybrid", "ensemble", "ood")


def register(name: str, needs: tuple[str, ...] = ()) -> Callable[[Callable], Acquisition]:
    def add(function: Callable) -> Acquisition:
        if name in ACQUISITIONS:
            raise ValueError(f"acquisition {name!r} is registered twice")
        function.needs = needs
        ACQUISITIONS[name] = function
        return function

    return add


def top(scores: np.ndarray, budget: int, rng: np.random.Generator) -> list[int]:
    """Indices of the `budget` largest scores, ties broken at random."""
    order = np.lexsort((rng.random(len(scores)), -scores))
    return [int(i) for i in order[:budget]]


def acquire(name: str, pool: CandidatePool, budget: int, seed: int = 0) -> list[int]:
    """The pairs `name` picks from `pool`: at most `budget` distinct indices."""
    if budget < 0:
        raise ValueError(f"budget must be non-negative, got {budget}")
    function = get_acquisition(name)
    for statistic in function.needs:
        pool.statistic(statistic)
    picked = function(pool, min(budget, len(pool)), np.random.default_rng(seed))
    if len(set(picked)) != len(picked) or any(not 0 <= i < len(pool) for i in picked):
        raise RuntimeError(f"acquisition {name!r} returned repeated or out-of-range indices")
    return picked


def get_acquisition(name: str) -> Acquisition:
    for module in _MODULES:  # each registers itself on first import; later imports are cached no-ops
        importlib.import_module(f"{__name__}.{module}")
    if name not in ACQUISITIONS:
        raise ValueError(f"unknown acquisition function {name!r}; available: {', '.join(sorted(ACQUISITIONS))}")
    return ACQUISITIONS[name]
