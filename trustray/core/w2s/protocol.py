"""The weak-to-strong protocol of Burns et al. (2023) and its measure, the performance gap recovered.

The training examples are split into two halves by a seeded shuffle. The weak supervisor learns the ground truth
of half 1 and labels half 2 with its (soft) predictions; the strong student learns those labels; the strong
ceiling learns half 2's ground truth. All three are scored on a separate test set, and

    PGR = (student − weak) / (ceiling − weak),

the share of the weak-to-ceiling gap the student recovers: 0 when the student is no better than its supervisor, 1
when it matches the ceiling. A gap near zero makes PGR noise (its denominator), so `summarize_pgr` reports the gap
with it, and per-seed PGRs with a t-interval over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def split_halves(count: int, seed: int, strata: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Indices 0..count-1 shuffled by `seed` and cut in two: (half 1: the weak model's ground truth, half 2: what
    it labels for the student). With `strata` (e.g. the class of each example), each stratum is halved on its
    own, so both halves keep the classes' balance; half 1 gets each odd example out."""
    if count < 2:
        raise ValueError(f"the training set needs at least 2 examples to split, got {count}")
    if strata is not None and len(strata) != count:
        raise ValueError(f"{len(strata)} strata for {count} examples")
    rng = np.random.default_rng(seed)
    groups: dict[int, list[int]] = {}
    for index in range(count):
        groups.setdefault(0 if strata is None else int(strata[index]), []).append(index)
    first: list[int] = []
    second: list[int] = []
    for _, members in sorted(groups.items()):
        order = [members[i] for i in rng.permutation(len(members))]
        middle = (len(order) + 1) // 2
        first += order[:middle]
        second += order[middle:]
    return sorted(first), sorted(second)


def performance_gap_recovered(weak: float, ceiling: float, student: float) -> float:
    """(student − weak) / (ceiling − weak); NaN when the ceiling does not beat the weak model at all (then no
    gap exists to recover)."""
    gap = ceiling - weak
    return (student - weak) / gap if gap > 0 else math.nan


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its standard error and two-sided 95% t-interval (None with one seed)."""

    mean: float
    standard_error: float | None
    low: float | None
    high: float | None
    seeds: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "se": self.standard_error, "ci95": None if self.low is None else [self.low, self.high],
                "seeds": self.seeds}


def interval(values: Sequence[float]) -> Interval:
    """Mean, standard error and 95% t-interval of per-seed values (NaNs are dropped and must not be all)."""
    from scipy.stats import t

    finite = [float(value) for value in values if not math.isnan(value)]
    if not finite:
        raise ValueError("no finite value to summarise")
    mean = float(np.mean(finite))
    if len(finite) < 2:
        return Interval(mean, None, None, None, 1)
    error = float(np.std(finite, ddof=1) / math.sqrt(len(finite)))
    half = float(t.ppf(0.975, len(finite) - 1)) * error
    return Interval(mean, error, mean - half, mean + half, len(finite))


def summarize_pgr(weak: Sequence[float], ceiling: Sequence[float], student: Sequence[float]) -> dict[str, object]:
    """Per-seed scores of one (task, loss) → each score's interval, the gap's, per-seed PGR's, and the PGR of the
    means (None without a gap; less noisy than the mean of ratios when a seed's gap is small). Seeds whose gap is ≤ 0 count in
    `seeds_without_gap` and are left out of the per-seed PGR."""
    if not len(weak) == len(ceiling) == len(student) > 0:
        raise ValueError(f"need one weak, ceiling and student score per seed; got {len(weak)}, {len(ceiling)}, "
                         f"{len(student)}")
    per_seed = [performance_gap_recovered(w, c, s) for w, c, s in zip(weak, ceiling, student, strict=True)]
    finite = [value for value in per_seed if not math.isnan(value)]
    of_means = performance_gap_recovered(float(np.mean(weak)), float(np.mean(ceiling)), float(np.mean(student)))
    return {
        "weak": interval(weak).as_dict(),
        "ceiling": interval(ceiling).as_dict(),
        "student": interval(student).as_dict(),
        "gap": interval([c - w for w, c in zip(weak, ceiling, strict=True)]).as_dict(),
        "pgr": interval(finite).as_dict() if finite else None,
        "pgr_of_means": None if math.isnan(of_means) else of_means,
        "seeds_without_gap": len(per_seed) - len(finite),
    }
