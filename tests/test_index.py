"""PassageIndex: exact top-k against numpy, save/load round trip, dimension checks."""

from __future__ import annotations

import numpy as np
import pytest

from trustray.core.rag.index import PassageIndex


def make_index(n: int = 200, dim: int = 16, seed: int = 0) -> tuple[PassageIndex, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"doc-{i}#0" for i in range(n)]
    return PassageIndex(vectors, ids, [f"title {i}" for i in range(n)], [f"text {i}" for i in range(n)]), vectors


def test_search_matches_numpy_brute_force():
    index, vectors = make_index()
    queries = np.random.default_rng(1).standard_normal((7, vectors.shape[1])).astype(np.float32)
    k = 5
    results = index.search(queries, k)
    scores = queries @ vectors.T
    for query_scores, hits in zip(scores, results, strict=True):
        expected = np.argsort(-query_scores)[:k]
        assert [hit.id for hit in hits] == [f"doc-{i}#0" for i in expected]
        np.testing.assert_allclose([hit.score for hit in hits], query_scores[expected], rtol=1e-5)


def test_k_larger_than_index_and_bad_k():
    index, vectors = make_index(n=3)
    assert len(index.search(vectors[0], 10)[0]) == 3
    with pytest.raises(ValueError, match="k must be"):
        index.search(vectors[0], 0)


def test_save_load_round_trip(tmp_path):
    index, vectors = make_index()
    index.save(tmp_path / "idx")
    loaded = PassageIndex.load(tmp_path / "idx")
    assert len(loaded) == len(index) and loaded.dim == index.dim
    assert loaded.ids == index.ids and loaded.titles == index.titles and loaded.texts == index.texts
    hits = loaded.search(vectors[42], 1)[0]
    assert hits[0].id == "doc-42#0" and hits[0].text == "text 42"


def test_dimension_mismatch_and_missing_folder(tmp_path):
    index, _ = make_index(dim=16)
    with pytest.raises(ValueError, match="query dimension 8 does not match the index dimension 16"):
        index.search(np.zeros((1, 8), dtype=np.float32), 3)
    with pytest.raises(ValueError, match="same length"):
        PassageIndex(np.zeros((2, 4), dtype=np.float32), ["a"], ["a"], ["a"])
    with pytest.raises(FileNotFoundError, match="not a passage index"):
        PassageIndex.load(tmp_path)
