"""Linear datamodeling score against hand computations and planted attributions."""

from __future__ import annotations

import numpy as np
import pytest

from trustray.core.influence.fidelity import spearman
from trustray.core.influence.lds import linear_datamodeling_score, random_subsets


def test_random_subsets_have_the_asked_size_and_are_seeded():
    masks = random_subsets(40, 10, 0.5, seed=3)
    assert masks.shape == (10, 40) and (masks.sum(axis=1) == 20).all()
    assert (masks == random_subsets(40, 10, 0.5, seed=3)).all()
    assert not (masks == random_subsets(40, 10, 0.5, seed=4)).all()
    with pytest.raises(ValueError):
        random_subsets(3, 10, 0.1, seed=0)
    with pytest.raises(ValueError):
        random_subsets(40, 1, 0.5, seed=0)


def test_lds_matches_a_hand_computation():
    masks = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=bool)
    scores = np.array([[0.5, 1.0], [-1.0, 0.0], [2.0, 0.2]])
    losses = np.array([[1.0, 3.0], [2.0, 1.0], [4.0, 2.0], [3.0, 2.5]])
    result = linear_datamodeling_score(masks, scores, losses)
    predicted = masks.astype(float) @ scores  # target 0: [2.5, 1.0, -0.5, 0.5]
    expected = [spearman(predicted[:, t], -losses[:, t]) for t in range(2)]
    assert result["per_target"] == pytest.approx(expected)
    assert result["lds"] == pytest.approx(np.mean(expected))
    assert expected[0] == pytest.approx(1.0)  # losses rank exactly opposite to the predicted help


def test_planted_attributions_score_high_and_random_ones_near_zero():
    generator = np.random.default_rng(0)
    masks = random_subsets(100, 60, 0.5, seed=0)
    true_scores = generator.normal(size=(100, 8))
    losses = -(masks @ true_scores) + 0.5 * generator.normal(size=(60, 8))
    assert linear_datamodeling_score(masks, true_scores, losses)["lds"] > 0.9
    noise = linear_datamodeling_score(masks, generator.normal(size=(100, 8)), losses)
    assert abs(noise["lds"]) < 0.2 and noise["targets_used"] == 8


def test_constant_targets_are_left_out_and_shapes_checked():
    masks = random_subsets(10, 5, 0.5, seed=0)
    losses = np.stack([np.arange(5.0), np.ones(5)], axis=1)  # target 1 never changes
    result = linear_datamodeling_score(masks, np.ones((10, 2)) * np.arange(10)[:, None], losses)
    assert result["targets_used"] == 1 and np.isnan(result["per_target"][1])
    with pytest.raises(ValueError, match="line up"):
        linear_datamodeling_score(masks, np.ones((9, 2)), losses)
