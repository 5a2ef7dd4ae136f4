"""Exact against reduced gradient influence at one checkpoint: a grid of reductions and dims, scored both ways.

Score matrices `[pool, target]` are keyed `"<features>/<metric>/<reduction>/<dim>"` (see `score_key`):
features `sgd` (plain gradients) or `adam` (pool gradients Adam-preconditioned, LESS; targets stay plain),
metric cosine or inner product, reduction `exact` for the unreduced gradients. Fitted reductions are fitted on
a separate fit sample, so they are scored out of sample.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from trustray.config import BaseConfig
from trustray.core.influence.checkpoint import CheckpointGradients
from trustray.core.influence.gradients import GradientBatch
from trustray.core.influence.reductions import Reduction, build_reduction
from trustray.core.influence.scoring import METRICS, influence_scores

FEATURE_KINDS = ("sgd", "adam")
EXACT = "exact"
DENSE = ("gaussian", "rademacher")


class ReductionSpec(BaseConfig):
    """One reduction of the comparison."""

    key: str = Field(description="Label in results and plots, e.g. kron-pca.")
    name: str = Field(description="A name from trustray.core.influence.reductions.REDUCTIONS.")
    options: dict[str, Any] = Field(default_factory=dict, description="Options of the reduction, e.g. {init: pca}.")


def _default_reductions() -> list[ReductionSpec]:
    return [
        ReductionSpec(key="gaussian", name="gaussian"),
        ReductionSpec(key="rademacher", name="rademacher"),
        ReductionSpec(key="sjlt", name="sjlt"),
        ReductionSpec(key="pca", name="pca"),
        ReductionSpec(key="kron-random", name="kron", options={"init": "random"}),
        ReductionSpec(key="kron-pca", name="kron", options={"init": "pca"}),
    ]


class FeatureGrid(BaseConfig):
    """The reductions and dims compared against exact (unreduced) gradients."""

    reductions: list[ReductionSpec] = Field(default_factory=_default_reductions, description="Reductions compared.")
    dims: list[int] = Field(default_factory=lambda: [32, 128, 512, 2048, 8192], description="Feature dims.")
    include_full_dim: bool = Field(True, description="Also evaluate at the LoRA size itself.")
    dense_max_dim: int | None = Field(
        8192, ge=1, description="Dense random projections above this dim are skipped: they cost dim x LoRA size "
        "multiply-adds per example (None: no limit).",
    )
    seed: int = Field(0, description="Seed of the random projections.")
    batch_size: int = Field(8, ge=1, description="Examples per per-example-gradient pass.")
    kron_fit: int = Field(
        256, ge=1, description="Fit-sample examples whose layer factors fit kron-PCA (held in memory: tokens x "
        "layer widths per example, far more than the flat gradient)."
    )


def score_key(features: str, metric: str, reduction: str, dim: int) -> str:
    return f"{features}/{metric}/{reduction}/{dim}"


def parse_score_key(key: str) -> tuple[str, str, str, int]:
    """`(features, metric, reduction, dim)` of a score key."""
    features, metric, reduction, dim = key.split("/")
    return features, metric, reduction, int(dim)


def skip_reason(spec: ReductionSpec, dim: int, total: int, fit_size: int, modules: int,
                dense_max: int | None) -> str | None:
    """Why a (reduction, dim) pair is not evaluated, or None."""
    if dim > total:
        return f"dim exceeds the LoRA size {total}"
    if spec.name == "none" and dim != total:
        return "none keeps the whole LoRA gradient: only evaluated at the LoRA size"
    if spec.name == "pca" and dim > fit_size:
        return f"PCA rank is bounded by the {fit_size} examples it is fitted on"
    if spec.name == "kron" and dim < modules:
        return f"kron needs at least one feature per LoRA module ({modules})"
    if spec.name in DENSE and dense_max is not None and dim > dense_max:
        return f"dense projection above features.dense_max_dim={dense_max} (cost dim x {total} per example)"
    return None


def compare_reductions(
    gradients: CheckpointGradients, groups: Mapping[str, Sequence[Mapping[str, Any]]], grid: FeatureGrid
) -> dict[str, Any]:
    """Score matrices at one checkpoint for every feature kind, metric, reduction and dim of `grid`.

    `groups` holds the encoded `fit`, `pool` and `targets` examples; `gradients` needs the optimizer state.
    Flat gradients of every example are kept (the exact scores need them); layer factors, which are far larger,
    only for the first `grid.kron_fit` fit examples: kron reductions are fitted on those, then applied to each
    pool and target batch as it is computed. Returns `{"scores": {key: [pool, target]}, "info": {lora_size,
    modules, skipped, actual_dims, seconds}}`.
    """
    info: dict[str, Any] = {"skipped": [], "actual_dims": {}, "seconds": {}}

    def cpu_batches(examples: Sequence[Mapping[str, Any]]) -> Iterator[GradientBatch]:
        for batch in gradients.batches(examples):
            yield batch.to("cpu")

    fit_parts, kron_sample = [], []
    for batch in cpu_batches(groups["fit"]):
        fit_parts.append(batch.flat())
        if sum(b.batch_size for b in kron_sample) < grid.kron_fit:
            kron_sample.append(batch)
    fit_flat = torch.cat(fit_parts)
    total, modules = fit_flat.shape[1], len(kron_sample[0].factors)
    dims = sorted({*grid.dims, *([total] if grid.include_full_dim else [])})
    chosen = []
    for spec in grid.reductions:
        for dim in dims:
            reason = skip_reason(spec, dim, total, len(fit_flat), modules, grid.dense_max_dim)
            if reason:
                info["skipped"].append({"reduction": spec.key, "dim": dim, "reason": reason})
            else:
                chosen.append((spec, dim))
    # kron projects layer factors before the outer product, so it only sees plain gradients.
    krons: dict[tuple[str, int], Reduction] = {}
    for spec, dim in chosen:
        if spec.name == "kron":
            started = time.perf_counter()
            krons[(spec.key, dim)] = build_reduction(spec.name, dim, grid.seed, **spec.options).fit(kron_sample)
            info["seconds"][f"{spec.key}/{dim}"] = time.perf_counter() - started
    del kron_sample
    flat: dict[str, Tensor] = {}
    kron_features: dict[tuple[str, int, str], list[Tensor]] = {}
    for role in ("pool", "targets"):
        rows = []
        for batch in cpu_batches(groups[role]):
            rows.append(batch.flat())
            for key, reduction in krons.items():
                started = time.perf_counter()
                kron_features.setdefault((*key, role), []).append(reduction.transform(batch))
                info["seconds"][f"{key[0]}/{key[1]}"] += time.perf_counter() - started
        flat[role] = torch.cat(rows)
    info.update(lora_size=total, modules=modules)

    # Targets stay plain gradients in both kinds (LESS preconditions only the training side).
    train_of = {
        "sgd": (flat["pool"], fit_flat),
        "adam": (gradients.precondition(flat["pool"]), gradients.precondition(fit_flat)),
    }
    n_pool = len(flat["pool"])
    scores: dict[str, np.ndarray] = {}

    def add(kind: str, key: str, dim: int, train: Tensor, targets: Tensor) -> None:
        for metric in METRICS:
            scores[score_key(kind, metric, key, dim)] = influence_scores(train.numpy(), targets.numpy(), metric)

    for kind in FEATURE_KINDS:
        add(kind, EXACT, total, train_of[kind][0], flat["targets"])
    for spec, dim in chosen:
        started = time.perf_counter()
        if spec.name == "kron":
            add("sgd", spec.key, dim, torch.cat(kron_features[(spec.key, dim, "pool")]),
                torch.cat(kron_features[(spec.key, dim, "targets")]))
            info["actual_dims"][f"{spec.key}/{dim}"] = int(krons[(spec.key, dim)].dim)
            started -= info["seconds"].pop(f"{spec.key}/{dim}")  # fit and per-batch transforms count too
        else:
            reduction = build_reduction(spec.name, dim, grid.seed, **spec.options)
            if not reduction.fitted:
                # One transform for both kinds: each random block is generated once per dim.
                reduction.fit(fit_flat[:2])
                both = reduction.transform(torch.cat([train_of["sgd"][0], train_of["adam"][0], flat["targets"]]))
                add("sgd", spec.key, dim, both[:n_pool], both[2 * n_pool :])
                add("adam", spec.key, dim, both[n_pool : 2 * n_pool], both[2 * n_pool :])
            else:
                for kind in FEATURE_KINDS:
                    fitted = build_reduction(spec.name, dim, grid.seed, **spec.options).fit(train_of[kind][1])
                    add(kind, spec.key, dim, fitted.transform(train_of[kind][0]), fitted.transform(flat["targets"]))
        info["seconds"][f"{spec.key}/{dim}"] = round(time.perf_counter() - started, 2)
    return {"scores": scores, "info": info}
