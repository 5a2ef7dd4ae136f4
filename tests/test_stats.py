import numpy as np
import pytest

from trustray.core.stats import bootstrap_ci, paired_difference


def test_bootstrap_ci_matches_the_normal_interval_of_a_proportion():
    values = np.r_[np.ones(300), np.zeros(200)]
    low, high = bootstrap_ci(values)
    half_width = 1.96 * np.sqrt(0.6 * 0.4 / 500)
    assert low == pytest.approx(0.6 - half_width, abs=0.006)
    assert high == pytest.approx(0.6 + half_width, abs=0.006)
    assert bootstrap_ci(values) == (low, high)


def test_paired_difference_is_tighter_than_independent_intervals():
    rng = np.random.default_rng(1)
    base = (rng.random(400) < 0.6).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:20]] = 1.0  # 20 questions fixed, none broken: +5 points
    result = paired_difference(better, base)
    assert result["mean"] == pytest.approx(0.05)
    assert 0 < result["ci"][0] < 0.05 < result["ci"][1]
    independent_low = bootstrap_ci(better)[0] - bootstrap_ci(base)[1]
    assert independent_low < 0 < result["ci"][0]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.5)
