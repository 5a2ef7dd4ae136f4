"""Confidence intervals for evaluation means: percentile bootstrap, and paired bootstrap for differences.

Paired: both conditions answered the same questions, so the difference is resampled per question, which is far
tighter than comparing two independent intervals when the conditions agree on most questions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 10_000


def _check(values: np.ndarray, confidence: float) -> None:
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("need a non-empty 1-d sequence of per-question values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (e.g. per-question 0/1 correctness)."""
    array = np.asarray(values, dtype=np.float64)
    _check(array, confidence)
    rows = np.random.default_rng(seed).integers(0, len(array), size=(resamples, len(array)))
    means = array[rows].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_difference(first: Sequence[float], second: Sequence[float], confidence: float = 0.95,
                      resamples: int = RESAMPLES, seed: int = 0) -> dict[str, float | list[float]]:
    """Mean of `first - second` over the same questions and its paired bootstrap interval."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same length, got {len(a)} and {len(b)}")
    difference = a - b
    low, high = bootstrap_ci(difference, confidence, resamples, seed)
    return {"mean": float(difference.mean()), "ci": [low, high]}
