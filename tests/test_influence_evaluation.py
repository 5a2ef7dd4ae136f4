"""The influence evaluation's bookkeeping on hand-made score matrices: skip rules, fidelity rows, LDS rows, the
selections compared and their report."""

from __future__ import annotations

import numpy as np
import pytest

from trustray.core.influence.comparison import ReductionSpec, parse_score_key, score_key, skip_reason
from trustray.core.influence.evaluation import (
    BASE_METHOD,
    fidelity_report,
    lds_report,
    selection_methods,
    selection_report,
)
from trustray.core.influence.lds import random_subsets

TASKS = ["a", "a", "b"]
N_POOL, LORA_SIZE = 20, 64


def _scores() -> dict[str, np.ndarray]:
    """Exact scores for both kinds and metrics, a reduction that copies them, one that reverses them, and kron."""
    generator = np.random.default_rng(0)
    exact = generator.normal(size=(N_POOL, len(TASKS)))
    scores = {}
    for kind in ("sgd", "adam"):
        for metric in ("cosine", "inner_product"):
            scores[score_key(kind, metric, "exact", LORA_SIZE)] = exact
            for dim in (8, 32):
                scores[score_key(kind, metric, "copy", dim)] = exact * 2
                scores[score_key(kind, metric, "reversed", dim)] = -exact
    for metric in ("cosine", "inner_product"):
        scores[score_key("sgd", metric, "kron", 16)] = exact + 0.01 * generator.normal(size=exact.shape)
    return scores


def test_score_keys_round_trip():
    assert parse_score_key(score_key("adam", "cosine", "kron-pca", 128)) == ("adam", "cosine", "kron-pca", 128)


@pytest.mark.parametrize(
    ("name", "dim", "reason"),
    [
        ("gaussian", 128, "exceeds the LoRA size"),
        ("none", 32, "only evaluated at the LoRA size"),
        ("pca", 16, "PCA rank is bounded"),
        ("kron", 2, "at least one feature per LoRA module"),
        ("gaussian", 64, "dense_max_dim=32"),
        ("rademacher", 64, "dense_max_dim=32"),
        ("sjlt", 64, None),
        ("none", 64, None),
        ("pca", 8, None),
        ("kron", 4, None),
    ],
)
def test_skip_reason(name, dim, reason):
    found = skip_reason(ReductionSpec(key=name, name=name), dim, total=64, fit_size=8, modules=4, dense_max=32)
    assert found is None if reason is None else reason in found


def test_fidelity_report_compares_each_reduction_with_the_exact_cosine_scores():
    report = fidelity_report(_scores(), TASKS)
    assert set(report) == {"copy", "reversed", "kron"}
    assert [(row["features"], row["dim"]) for row in report["copy"]] == [("adam", 8), ("adam", 32), ("sgd", 8),
                                                                         ("sgd", 32)]
    assert all(row["spearman"] == pytest.approx(1.0) and row["top5_overlap"] == 1.0 for row in report["copy"])
    # Negated scores are not exactly reversed after the max over tasks, but they rank mostly the other way.
    assert all(row["spearman"] < -0.3 and row["top5_overlap"] == 0.0 for row in report["reversed"])
    assert {row["features"] for row in report["kron"]} == {"sgd"}


def test_lds_report_rows_are_sorted_and_the_planted_scores_win():
    scores = _scores()
    masks = random_subsets(N_POOL, 12, 0.5, seed=0)
    exact = scores[score_key("sgd", "cosine", "exact", LORA_SIZE)]
    losses = -(masks @ exact) + 0.01 * np.random.default_rng(1).normal(size=(12, len(TASKS)))
    report = lds_report(masks, scores, losses)
    keys = [(row["features"], row["metric"], row["reduction"], row["dim"]) for row in report["rows"]]
    assert keys == sorted(keys) and len(keys) == len(scores)
    by_key = dict(zip(keys, report["rows"], strict=True))
    assert by_key[("sgd", "cosine", "exact", LORA_SIZE)]["lds"] > 0.9
    assert by_key[("sgd", "cosine", "reversed", 32)]["lds"] < -0.9
    assert report["n_subsets"] == 12 and report["subset_size"] == 10


def test_selection_methods_pick_each_reductions_largest_dim_and_seeded_random_draws():
    specs = [ReductionSpec(key="copy", name="gaussian"), ReductionSpec(key="kron", name="kron"),
             ReductionSpec(key="missing", name="sjlt")]
    scores = _scores()
    methods = selection_methods(scores, TASKS, N_POOL, LORA_SIZE, specs, top_fraction=0.25, max_dim=16,
                                random_seeds=2)
    assert list(methods) == ["exact", "copy@8", "kron@16", "random-0", "random-1", "full"]
    assert methods["copy@8"] == methods["exact"] and len(methods["exact"]) == 5
    assert methods["random-0"] != methods["random-1"] and len(methods["random-1"]) == 5
    assert methods["full"] == list(range(N_POOL))
    again = selection_methods(scores, TASKS, N_POOL, LORA_SIZE, specs, 0.25, 16, 2)
    assert again == methods


def test_selection_report_means_per_method_and_task():
    methods = {"exact": [0, 1], "random-0": [2, 3], "random-1": [4, 5]}
    losses = {"exact": [1.0, 2.0, 3.0], "random-0": [2.0, 2.0, 5.0], "random-1": [4.0, 4.0, 4.0]}
    report = selection_report(methods, losses, TASKS, base_losses=[6.0, 6.0, 9.0])
    rows = {row["method"]: row for row in report["rows"]}
    assert rows[BASE_METHOD] == {"method": BASE_METHOD, "examples": 0, "target_loss": 7.0}
    assert rows["exact"]["target_loss"] == 2.0 and rows["exact"]["per_task_loss"] == {"a": 1.5, "b": 3.0}
    assert report["random_mean_loss"] == 3.5 and report["random_std_loss"] == pytest.approx(np.std([3.0, 4.0], ddof=1))
