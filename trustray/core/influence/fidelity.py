"""Fidelity of reduced influence scores against exact (unreduced) ones: rank correlation and top-set overlap.

Both inputs are per-training-example scores `[N]` (already aggregated over targets). Spearman's ρ is the Pearson
correlation of average ranks (ties share the mean of the ranks they span), so it matches the textbook and
scipy definitions; the overlaps ask how much of the exact top-f% a reduced score would select.
"""

from __future__ import annotations

import numpy as np

from trustray.core.influence.scoring import fraction_count


def _as_vector(scores: np.ndarray) -> np.ndarray:
    vector = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(vector)):
        raise ValueError("scores contain NaN or infinite values")
    return vector


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks, ascending, with tied values given the mean of the ranks they occupy."""
    vector = _as_vector(scores)
    order = np.argsort(vector, kind="stable")
    _, first, counts = np.unique(vector[order], return_index=True, return_counts=True)
    ranks = np.empty(len(vector))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors; NaN when either is constant (no ranking to compare)."""
    rank_a, rank_b = average_ranks(a), average_ranks(b)
    if len(rank_a) != len(rank_b):
        raise ValueError(f"score vectors differ in length: {len(rank_a)} vs {len(rank_b)}")
    rank_a, rank_b = rank_a - rank_a.mean(), rank_b - rank_b.mean()
    denominator = np.sqrt((rank_a**2).sum() * (rank_b**2).sum())
    return float((rank_a * rank_b).sum() / denominator) if denominator > 0 else float("nan")


def _top(scores: np.ndarray, k: int) -> set[int]:
    """Indices of the `k` highest scores; ties broken by the lower index."""
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


def top_overlap(reference: np.ndarray, approx: np.ndarray, fraction: float) -> float:
    """|top-f of `reference` ∩ top-f of `approx`| / k, with k = `fraction_count(N, fraction)` (at least 1)."""
    reference, approx = _as_vector(reference), _as_vector(approx)
    if len(reference) != len(approx):
        raise ValueError(f"score vectors differ in length: {len(reference)} vs {len(approx)}")
    if len(reference) == 0:
        raise ValueError("cannot compare empty score vectors")
    k = fraction_count(len(reference), fraction)
    return len(_top(reference, k) & _top(approx, k)) / k


def fidelity_row(exact_scores: np.ndarray, reduced_scores: np.ndarray) -> dict[str, float]:
    """`{spearman, top1_overlap, top5_overlap}` of reduced against exact per-example scores."""
    return {
        "spearman": spearman(exact_scores, reduced_scores),
        "top1_overlap": top_overlap(exact_scores, reduced_scores, 0.01),
        "top5_overlap": top_overlap(exact_scores, reduced_scores, 0.05),
    }
