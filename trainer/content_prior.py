"""The popularity prior's guess for items nobody rated in train, from their genres and year.

The prior adds ``w * log(1 + train count)`` to every item's served score. An item with no train
rating (p3's cold movies, a new release) has no count, and the neutral guess, the mean over the
rated items, treats a 1998 drama like a 1932 short. Here its log count is predicted from what
the catalog says of it: a ridge regression of ``log(1 + count)`` on its genres (multi-hot),
release decade and release year (one-hot, shrunk towards the mean like every other column),
fit on the rated items with the L2 weight chosen by 5-fold cross-validation. On p3 the guess
explains a fifth of the rated items' log-count variance out of fold, and valid chose it on all
three seeds (``benchmarks/results/quality_content.md``, and the trade-off against the new-item
bias in ``benchmarks/results/new_item_bias_p3_content.md``).

The fit is a closed form over a few dozen one-hot columns (as EASE's is over the catalog), so
it is written here in NumPy rather than adding scikit-learn for one ridge.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: L2 weights tried by cross-validation (in units of rated items: columns are 0/1).
L2_GRID = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
_FOLDS = 5
#: Fewer rated items than this and no guess is made (the neutral mean stays).
MIN_RATED = 20


def content_features(item_genres: Sequence[str], item_years: Sequence[str]) -> np.ndarray:
    """``[N, G + E + Y]`` float64: genres multi-hot (``"A|B"``), the release decade and the
    release year one-hot (a column per decade and per year seen; an item without a year has
    none set). The decade lets a year with few items borrow from its neighbours."""
    split = [[g for g in str(gs).split("|") if g] for gs in item_genres]
    years = [str(y) if str(y).isdigit() else "" for y in item_years]
    columns: dict[str, int] = {}
    for key in sorted({f"g:{g}" for gs in split for g in gs}) + sorted(
        {f"d:{int(y) // 10}" for y in years if y} | {f"y:{y}" for y in years if y}
    ):
        columns[key] = len(columns)
    x = np.zeros((len(split), len(columns)))
    for row, (gs, year) in enumerate(zip(split, years, strict=True)):
        keys = [f"g:{g}" for g in gs] + ([f"d:{int(year) // 10}", f"y:{year}"] if year else [])
        x[row, [columns[k] for k in keys]] = 1.0
    return x


def fit_ridge(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Ridge regression with an unpenalised intercept: ``x`` ``[M, F]``, ``y`` ``[M]`` ->
    ``(coefficients [F], intercept)`` minimising ``|y - x c - a|^2 + l2 |c|^2``."""
    x_mean, y_mean = x.mean(0), float(y.mean())
    xc = x - x_mean
    coef = np.linalg.solve(xc.T @ xc + l2 * np.eye(x.shape[1]), xc.T @ (y - y_mean))
    return coef, y_mean - float(x_mean @ coef)


def choose_l2(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """``(l2, out-of-fold R^2)``: the :data:`L2_GRID` value with the least 5-fold squared error
    (folds drawn with ``seed``; ties to the larger l2)."""
    folds = np.array_split(np.random.default_rng(seed).permutation(len(y)), _FOLDS)
    total = float(((y - y.mean()) ** 2).sum())
    best = (np.inf, L2_GRID[-1])
    for l2 in L2_GRID:
        error = 0.0
        for fold in folds:
            keep = np.setdiff1d(np.arange(len(y)), fold)
            coef, intercept = fit_ridge(x[keep], y[keep], l2)
            error += float(((x[fold] @ coef + intercept - y[fold]) ** 2).sum())
        if error <= best[0]:
            best = (error, l2)
    return best[1], 1.0 - best[0] / total if total > 0 else 0.0


def predicted_log_counts(
    popularity: Sequence[float], item_genres: Sequence[str], item_years: Sequence[str]
) -> tuple[np.ndarray, dict] | None:
    """Every catalog item's ``log(1 + train count)`` as its genres and year predict it
    (``[N]`` float64, fit on the items with a train rating), and the fit's facts ``{"l2",
    "r2"}``; None when the catalog lacks the fields (model dirs of older versions) or fewer
    than :data:`MIN_RATED` items were rated."""
    counts = np.asarray(popularity, np.float64)
    if len(item_genres) != len(counts) or len(item_years) != len(counts):
        return None
    rated = counts > 0
    if rated.sum() < MIN_RATED:
        return None
    x = content_features(item_genres, item_years)
    y = np.log1p(counts[rated])
    l2, r2 = choose_l2(x[rated], y)
    coef, intercept = fit_ridge(x[rated], y, l2)
    return x @ coef + intercept, {"l2": l2, "r2": round(r2, 4)}
