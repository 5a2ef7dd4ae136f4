"""Influence scoring and selection: hand-computed similarities, LESS aggregation, FAISS top-k, selection files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trustray.core.influence.scoring import (
    TopKIndex,
    aggregate_targets,
    combine_checkpoints,
    export_subset,
    fraction_count,
    influence_scores,
    normalize_rows,
    select_top_fraction,
    select_top_k,
    task_queries,
    write_selection,
)
from trustray.data.io import read_jsonl


def test_normalize_rows_unit_norm_and_zero_rows_stay_zero():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    out = normalize_rows(x)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    assert out.dtype == np.float32


def test_scores_match_hand_computation():
    train = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    targets = np.array([[2.0, 0.0], [0.0, 1.0]])
    ip = influence_scores(train, targets, "inner_product")
    np.testing.assert_allclose(ip, [[2, 0], [2, 1], [0, 2]])
    cos = influence_scores(train, targets, "cosine")
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(cos, [[1, 0], [s, s], [0, 1]], rtol=1e-6)
    assert cos.dtype == np.float32 and cos.shape == (3, 2)


def test_scores_chunked_and_blocked_equal_whole():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(37, 8)).astype(np.float16)
    targets = rng.normal(size=(5, 8))
    whole = influence_scores(train, targets, "cosine")
    chunked = influence_scores(train, targets, "cosine", chunk_rows=4)
    blocked = influence_scores([train[:10], train[10:]], targets, "cosine", chunk_rows=3)
    # BLAS may sum in another order for another chunk shape: equal up to float32 rounding.
    np.testing.assert_allclose(whole, chunked, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(whole, blocked, rtol=1e-6, atol=1e-6)


def test_scores_reject_bad_inputs():
    with pytest.raises(ValueError, match="metric"):
        influence_scores(np.ones((2, 2)), np.ones((1, 2)), "euclid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dimension"):
        influence_scores(np.ones((2, 3)), np.ones((1, 2)))


def test_combine_checkpoints_is_lr_weighted_sum():
    a = np.array([[1.0, 2.0]])
    b = np.array([[10.0, 20.0]])
    np.testing.assert_allclose(combine_checkpoints([a, b], [0.5, 0.1]), [[1.5, 3.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="one learning rate per checkpoint"):
        combine_checkpoints([a, b], [0.5])
    with pytest.raises(ValueError, match="non-negative"):
        combine_checkpoints([a, b], [0.5, -0.1])
    with pytest.raises(ValueError, match="shape"):
        combine_checkpoints([a, np.ones((2, 2))], [1.0, 1.0])


def test_aggregate_targets_max_over_subtasks_of_mean():
    scores = np.array(
        [
            [1.0, 3.0, 0.0, 5.0, 1.0],  # task a mean 2, task b mean 2 -> 2
            [0.0, 0.0, 9.0, 0.0, 0.0],  # a 0, b 3 -> 3
            [4.0, 4.0, -3.0, -3.0, -3.0],  # a 4, b -3 -> 4
        ]
    )
    tasks = ["a", "a", "b", "b", "b"]
    np.testing.assert_allclose(aggregate_targets(scores, tasks), [2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="columns"):
        aggregate_targets(scores, ["a", "b"])


def _brute_force_top_k(train: np.ndarray, queries: np.ndarray, k: int, metric: str):
    scores = influence_scores(train, queries, metric).T  # [M, N]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("metric", ["cosine", "inner_product"])
def test_flat_index_equals_brute_force(metric):
    rng = np.random.default_rng(1)
    train = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    index = TopKIndex([train[:120], train[120:]], metric=metric, chunk_rows=50)
    assert len(index) == 300 and index.dim == 16
    scores, rows = index.search(queries, 10)
    want_scores, want_rows = _brute_force_top_k(train, queries, 10, metric)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "inner_product"])
def test_ivf_with_all_lists_probed_equals_flat(metric):
    rng = np.random.default_rng(2)
    train = rng.normal(size=(400, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    flat_scores, flat_rows = TopKIndex(train, metric=metric).search(queries, 12)
    ivf = TopKIndex(train, metric=metric, kind="ivf", nlist=8, nprobe=8, train_rows=320)
    ivf_scores, ivf_rows = ivf.search(queries, 12)
    np.testing.assert_array_equal(ivf_rows, flat_rows)
    np.testing.assert_allclose(ivf_scores, flat_scores, rtol=1e-5, atol=1e-5)


def test_index_rejects_bad_options():
    train = np.ones((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="nlist"):
        TopKIndex(train, kind="ivf", nlist=10)
    with pytest.raises(ValueError, match="nprobe"):
        TopKIndex(train, kind="ivf", nlist=2, nprobe=3)
    with pytest.raises(ValueError, match="kind"):
        TopKIndex(train, kind="hnsw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dimension"):
        TopKIndex(train).search(np.ones((1, 3)), 1)


def test_select_top_k_ranks_and_ties_broken_by_id():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.5])
    ids = ["e", "a", "c", "d", "b"]
    rows = select_top_k(scores, ids, 3)
    assert rows == [
        {"id": "a", "score": 0.9, "rank": 1},
        {"id": "b", "score": 0.5, "rank": 2},
        {"id": "c", "score": 0.5, "rank": 3},
    ]
    assert [r["id"] for r in select_top_k(scores, ids, 10)] == ["a", "b", "c", "e", "d"]
    assert select_top_k(scores, ids, 0) == []
    with pytest.raises(ValueError, match="NaN"):
        select_top_k(np.array([np.nan, 1.0]), ["x", "y"], 1)
    with pytest.raises(ValueError, match="unique"):
        select_top_k(np.array([1.0, 2.0]), ["x", "x"], 1)


def test_select_top_k_equals_full_sort_on_large_input():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 20, size=2000).astype(np.float64)  # many ties
    ids = [f"id{i:05d}" for i in rng.permutation(2000)]
    got = [r["id"] for r in select_top_k(scores, ids, 150)]
    want = [ids[i] for i in sorted(range(2000), key=lambda i: (-scores[i], ids[i]))[:150]]
    assert got == want


def test_fraction_rounding():
    assert fraction_count(100, 0.05) == 5
    assert fraction_count(100, 0.29) == 29  # 0.29 * 100 == 28.999...
    assert fraction_count(1010, 0.05) == 50  # floor, as LESS
    assert fraction_count(10, 0.01) == 1  # never empty
    assert fraction_count(10, 1.0) == 10
    with pytest.raises(ValueError):
        fraction_count(10, 0.0)
    rows = select_top_fraction(np.arange(40, dtype=float), [f"x{i:02d}" for i in range(40)], 0.1)
    assert [r["id"] for r in rows] == ["x39", "x38", "x37", "x36"]


def test_selection_file_and_subset_export_round_trip(tmp_path):
    pool = [
        {
            "id": f"ex{i}",
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
        }
        for i in range(6)
    ]
    rows = select_top_k(np.array([0.1, 0.7, 0.3, 0.9, 0.2, 0.0]), [p["id"] for p in pool], 3)
    path = write_selection(rows, tmp_path / "sel" / "selection.jsonl")
    assert read_jsonl(path) == rows
    numpy_rows = [{"id": r["id"], "score": np.float32(r["score"]), "rank": np.int64(r["rank"])} for r in rows]
    assert read_jsonl(write_selection(numpy_rows, tmp_path / "np.jsonl"))[0]["rank"] == 1
    assert not list(path.parent.glob(".*tmp*"))
    subset = export_subset(list(reversed(rows)), pool, tmp_path / "subset.jsonl")
    assert read_jsonl(subset) == [pool[3], pool[1], pool[2]]
    with pytest.raises(KeyError, match="not in the pool"):
        export_subset([{"id": "nope", "score": 1.0, "rank": 1}], pool, tmp_path / "bad.jsonl")
    assert json.loads(path.read_text().splitlines()[0])["rank"] == 1


def test_task_queries_search_gives_per_task_mean_scores():
    rng = np.random.default_rng(4)
    train = rng.normal(size=(50, 6)).astype(np.float32)
    targets = rng.normal(size=(5, 6)).astype(np.float32)
    tasks = ["b", "a", "b", "a", "a"]
    names, queries = task_queries(targets, tasks, "cosine")
    assert names == ["b", "a"]
    scores, rows = TopKIndex(train, "cosine").search(queries, 50, normalize_queries=False)
    full = influence_scores(train, targets, "cosine")
    for t, columns in enumerate([[0, 2], [1, 3, 4]]):
        want = full[:, columns].mean(axis=1)
        np.testing.assert_allclose(scores[t], want[rows[t]], rtol=1e-5, atol=1e-6)
    best = np.max(np.stack([full[:, [0, 2]].mean(1), full[:, [1, 3, 4]].mean(1)]), axis=0)
    np.testing.assert_allclose(aggregate_targets(full, tasks), best, rtol=1e-6)
