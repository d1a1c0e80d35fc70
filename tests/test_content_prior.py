"""The popularity prior's content guess for unrated items (trainer.content_prior): NumPy only."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.content_prior import (
    L2_GRID,
    MIN_RATED,
    choose_l2,
    content_features,
    fit_ridge,
    predicted_log_counts,
)


def test_features_are_genres_decades_and_years_one_hot():
    x = content_features(["Comedy|Drama", "Drama", "Horror"], ["1995", "1998", ""])
    # columns: g:Comedy g:Drama g:Horror d:199 y:1995 y:1998
    np.testing.assert_array_equal(x, [[1, 1, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1], [0, 0, 1, 0, 0, 0]])


def test_ridge_is_the_closed_form_and_leaves_the_intercept_unpenalised():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=30)
    coef, intercept = fit_ridge(x, y, 2.0)
    # By hand: the centred normal equations, the intercept from the means.
    xc, yc = x - x.mean(0), y - y.mean()
    want = np.linalg.inv(xc.T @ xc + 2.0 * np.eye(4)) @ xc.T @ yc
    np.testing.assert_allclose(coef, want, atol=1e-10)
    assert intercept == pytest.approx(y.mean() - x.mean(0) @ want)
    # A huge L2 leaves only the mean.
    coef, intercept = fit_ridge(x, y, 1e12)
    assert np.abs(coef).max() < 1e-9 and intercept == pytest.approx(y.mean())


def test_cross_validation_prefers_little_shrinkage_on_clean_data_and_much_on_noise():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, size=(200, 5)).astype(float)
    l2, r2 = choose_l2(x, x @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]))
    assert l2 == L2_GRID[0] and r2 > 0.99
    l2, r2 = choose_l2(x, rng.normal(size=200))
    assert l2 >= 100 and r2 < 0.05


def test_an_unrated_item_gets_the_log_count_its_year_and_genres_predict():
    # 1990s comedies are popular, 1930s dramas are not; two items nobody rated, one of each.
    genres = ["Comedy"] * 20 + ["Drama"] * 20 + ["Comedy", "Drama"]
    years = ["1996"] * 20 + ["1934"] * 20 + ["1996", "1934"]
    counts = [200] * 20 + [3] * 20 + [0, 0]
    guess, fit = predicted_log_counts(counts, genres, years)
    assert guess[40] == pytest.approx(np.log1p(200), rel=0.05)
    assert guess[41] == pytest.approx(np.log1p(3), rel=0.1)
    assert fit["r2"] > 0.9 and fit["l2"] in L2_GRID


def test_no_guess_without_the_fields_or_with_too_few_rated_items():
    assert predicted_log_counts([5, 0], [], []) is None  # a model dir of an older version
    few = MIN_RATED - 1
    assert (
        predicted_log_counts([5] * few + [0], ["Drama"] * (few + 1), ["1990"] * (few + 1)) is None
    )
