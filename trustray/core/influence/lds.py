"""Linear datamodeling score (LDS, Park et al. 2023, TRAK): do summed scores predict retrained models?

Train M models, each on a random subset S_m of the pool, and measure every target's loss. An attribution
method that gives each (training example, target) pair a score predicts that target's outcome for S_m as the
sum of the scores of the examples in S_m. LDS is the Spearman correlation, over the M subsets, between that
prediction and the measured outcome, averaged over targets. A helpful example lowers the loss, so the
outcome correlated with the scores is the negative loss.
"""

from __future__ import annotations

import numpy as np

from trustray.core.influence.fidelity import spearman


def random_subsets(pool_size: int, count: int, fraction: float, seed: int) -> np.ndarray:
    """`count` seeded random subsets of `round(fraction * pool_size)` examples each, as a bool mask `[M, N]`."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    size = round(fraction * pool_size)
    if not 0 < size < pool_size:
        raise ValueError(f"a {fraction} subset of {pool_size} examples would be empty or the whole pool")
    if count < 2:
        raise ValueError(f"LDS needs at least 2 subsets to correlate over, got {count}")
    generator = np.random.default_rng(seed)
    masks = np.zeros((count, pool_size), dtype=bool)
    for row in masks:
        row[generator.choice(pool_size, size=size, replace=False)] = True
    return masks


def linear_datamodeling_score(masks: np.ndarray, scores: np.ndarray, losses: np.ndarray) -> dict[str, float | list]:
    """LDS of `scores` `[N, T]` (pool example x target) against measured `losses` `[M, T]` of models trained on
    `masks` `[M, N]`: `{lds, lds_sem, per_target, targets_used}`.

    Targets whose predicted or measured outcome is constant over the subsets have no ranking and are left
    out of the mean (`targets_used` counts the rest); `lds_sem` is the standard error over targets.
    """
    masks = np.asarray(masks, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if masks.ndim != 2 or scores.ndim != 2 or losses.ndim != 2:
        raise ValueError("masks [M, N], scores [N, T] and losses [M, T] must all be 2-D")
    if masks.shape[1] != scores.shape[0] or masks.shape[0] != losses.shape[0] or scores.shape[1] != losses.shape[1]:
        raise ValueError(f"shapes do not line up: masks {masks.shape}, scores {scores.shape}, losses {losses.shape}")
    predicted = masks @ scores
    per_target = np.array([spearman(predicted[:, t], -losses[:, t]) for t in range(losses.shape[1])])
    used = per_target[np.isfinite(per_target)]
    if len(used) == 0:
        raise ValueError("every target's prediction or loss is constant over the subsets: LDS is undefined")
    sem = float(used.std(ddof=1) / np.sqrt(len(used))) if len(used) > 1 else float("nan")
    return {"lds": float(used.mean()), "lds_sem": sem, "per_target": per_target.tolist(), "targets_used": len(used)}
