"""Bookkeeping of the influence evaluation: fidelity rows, LDS rows, the selections compared and their losses.

All of it works on score matrices keyed by `comparison.score_key` and on plain losses; nothing here trains or
loads a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trustray.core.influence.comparison import EXACT, FEATURE_KINDS, ReductionSpec, parse_score_key, score_key
from trustray.core.influence.fidelity import fidelity_row
from trustray.core.influence.lds import linear_datamodeling_score
from trustray.core.influence.scoring import aggregate_targets, fraction_count

# What the influence pipeline's selection uses (LESS): preconditioned pool gradients, cosine.
LESS_SCORE = ("adam", "cosine")
BASE_METHOD = "base (no fine-tune)"
RANDOM_PREFIX = "random-"
# Random selections draw from seeds 1000, 1001, ...: apart from every other seed of the evaluation.
RANDOM_SEED_BASE = 1000


def fidelity_report(scores: Mapping[str, np.ndarray], tasks: Sequence[str]) -> dict[str, list[dict]]:
    """Per reduction, rows `{dim, features, spearman, top1_overlap, top5_overlap}` against exact LESS scores
    (cosine, aggregated over target tasks)."""
    results: dict[str, list[dict]] = {}
    for kind in FEATURE_KINDS:
        exact_key = next(k for k in scores if k.startswith(f"{kind}/cosine/{EXACT}/"))
        exact = aggregate_targets(scores[exact_key], tasks)
        for key, matrix in scores.items():
            score_kind, metric, reduction, dim = parse_score_key(key)
            if score_kind != kind or metric != "cosine" or reduction == EXACT:
                continue
            row = {"dim": dim, "features": kind, **fidelity_row(exact, aggregate_targets(matrix, tasks))}
            results.setdefault(reduction, []).append(row)
    for rows in results.values():
        rows.sort(key=lambda row: (row["features"], row["dim"]))
    return results


def lds_report(masks: np.ndarray, scores: Mapping[str, np.ndarray], losses: np.ndarray) -> dict[str, Any]:
    """LDS of every score matrix against the target `losses` `[M, T]` of models retrained on `masks` `[M, N]`."""
    rows = []
    for key, matrix in scores.items():
        kind, metric, reduction, dim = parse_score_key(key)
        result = linear_datamodeling_score(masks, matrix, losses)
        rows.append({"reduction": reduction, "dim": dim, "features": kind, "metric": metric,
                     "lds": result["lds"], "lds_sem": result["lds_sem"], "targets_used": result["targets_used"]})
    rows.sort(key=lambda row: (row["features"], row["metric"], row["reduction"], row["dim"]))
    return {"rows": rows, "subset_loss_mean": float(losses.mean()), "subset_loss_std_over_subsets":
            float(losses.mean(axis=1).std()), "n_subsets": len(masks), "subset_size": int(masks[0].sum())}


def selection_methods(
    scores: Mapping[str, np.ndarray], tasks: Sequence[str], n_pool: int, lora_size: int,
    reductions: Sequence[ReductionSpec], top_fraction: float, max_dim: int, random_seeds: int,
) -> dict[str, list[int]]:
    """Pool indices chosen by each method: exact and reduced LESS scores (each reduction at its largest
    evaluated dim up to `max_dim`), `random_seeds` random draws, the full pool."""
    count = fraction_count(n_pool, top_fraction)
    kind, metric = LESS_SCORE
    methods: dict[str, list[int]] = {}
    wanted = {score_key(kind, metric, EXACT, lora_size): EXACT}
    for spec in reductions:
        spec_kind = "sgd" if spec.name == "kron" else kind
        # The largest evaluated dim up to max_dim (PCA's rank is bounded by its fit sample).
        dims = [parse_score_key(key)[3] for key in scores if key.startswith(f"{spec_kind}/{metric}/{spec.key}/")]
        dims = [dim for dim in dims if dim <= max_dim]
        if dims:
            wanted[score_key(spec_kind, metric, spec.key, max(dims))] = f"{spec.key}@{max(dims)}"
    for key, label in wanted.items():
        if key in scores:
            ranked = np.argsort(-aggregate_targets(scores[key], tasks), kind="stable")
            methods[label] = sorted(ranked[:count].tolist())
    for seed in range(random_seeds):
        generator = np.random.default_rng(RANDOM_SEED_BASE + seed)
        methods[f"{RANDOM_PREFIX}{seed}"] = sorted(generator.choice(n_pool, count, replace=False).tolist())
    methods["full"] = list(range(n_pool))
    return methods


def selection_report(
    methods: Mapping[str, Sequence[int]], losses: Mapping[str, Sequence[float]], tasks: Sequence[str],
    base_losses: Sequence[float],
) -> dict[str, Any]:
    """Mean target loss after fine-tuning on each method's selection (`losses[method]`: one per target), per
    task too, against the untuned model and the spread of the random selections."""
    rows: list[dict[str, Any]] = [{"method": BASE_METHOD, "examples": 0, "target_loss": float(np.mean(base_losses))}]
    for name, indices in methods.items():
        method_losses = losses[name]
        per_task = {task: float(np.mean([loss for loss, t in zip(method_losses, tasks, strict=True) if t == task]))
                    for task in sorted(set(tasks))}
        rows.append({"method": name, "examples": len(indices), "target_loss": float(np.mean(method_losses)),
                     "per_task_loss": per_task})
    randoms = [row["target_loss"] for row in rows if row["method"].startswith(RANDOM_PREFIX)]
    return {"rows": rows, "random_mean_loss": float(np.mean(randoms)),
            "random_std_loss": float(np.std(randoms, ddof=1)) if len(randoms) > 1 else None}
