"""Evaluation metrics: ranking accuracy, factorized top-k accuracy, beyond-accuracy, RMSE.

Pure NumPy. Shapes use ``U`` users (or queries), ``N`` catalog items, ``K`` list length, ``E``
events and ``D`` embedding width. Item lists hold catalog indices ``0..N-1``; ``-1`` is
padding, and every function here ignores it. The lists themselves (top-k selection,
exclusions, MMR) come from :mod:`trainer.ranking`.

A mean over nothing (no evaluated user, no event) is ``nan``, never a made-up ``0``.

Ranking metrics follow RecBole 1.2.1 (``recbole/evaluator/metrics.py``), factorized top-k
accuracy follows ``tfrs.metrics.FactorizedTopK`` (score-based evaluation, seen items kept).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trainer.ranking import as_item_lists, iter_blocks, normalize_rows

__all__ = [
    "CURVE_MAX_K",
    "RANKING_METRICS",
    "catalog_coverage",
    "factorized_top_k_accuracy",
    "factorized_top_k_accuracy_chunked",
    "format_table",
    "gini_index",
    "intra_list_diversity",
    "popularity_percentile",
    "ranking_curves",
    "ranking_metrics",
    "rmse",
]

#: Metric names of :func:`ranking_metrics`, in RecBole's default order.
RANKING_METRICS = ("recall", "mrr", "ndcg", "hit", "precision")
#: Last cut-off of :func:`ranking_curves` (the plots' x axis: k = 1..100).
CURVE_MAX_K = 100


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return ks


# --------------------------------------------------------------------------- RecBole ranking


def _user_hits(
    top_k: np.ndarray, ground_truth: Sequence[np.ndarray], depth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``hit_i`` of the first ``depth`` ranks and ``|R(u)|``, for the users with relevant items.

    Args:
        top_k: ``[U, K]`` ranked item indices, ``-1`` = padding (ranks past ``K`` are misses).
        ground_truth: ``U`` integer arrays of relevant item indices (``-1`` entries ignored,
            duplicates counted once).
        depth: ranks kept, ``>= 1``.

    Returns:
        ``hits`` bool ``[U', depth]``, ``|R(u)|`` float64 ``[U']`` and the indices ``[U']`` of
        the ``U'`` users whose ``R(u)`` is not empty, in user order.
    """
    top = as_item_lists(top_k)
    num_users, width = top.shape
    if len(ground_truth) != num_users:
        raise ValueError(f"ground_truth has {len(ground_truth)} users, top_k {num_users}")
    gt_arrays = [np.asarray(g, dtype=np.int64).reshape(-1) for g in ground_truth]
    lengths = np.fromiter((len(g) for g in gt_arrays), dtype=np.int64, count=num_users)
    gt_items = np.concatenate(gt_arrays) if gt_arrays else np.zeros(0, np.int64)
    gt_users = np.repeat(np.arange(num_users, dtype=np.int64), lengths)
    keep = gt_items >= 0
    gt_items, gt_users = gt_items[keep], gt_users[keep]
    # One int64 key per (user, item) pair: membership of all lists in one np.isin.
    span = int(max(gt_items.max(initial=-1), top.max(initial=-1))) + 1
    gt_keys = np.unique(gt_users * span + gt_items)
    pos_len = np.bincount(gt_keys // max(span, 1), minlength=num_users).astype(np.float64)

    hits = np.zeros((num_users, max(depth, width)), dtype=bool)
    if width:
        top_keys = np.arange(num_users, dtype=np.int64)[:, None] * span + top
        hits[:, :width] = (top >= 0) & np.isin(top_keys, gt_keys)
    users = pos_len > 0
    return hits[:, :depth][users], pos_len[users], np.flatnonzero(users)


def _cumulative_dcg(hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DCG at every rank of each list ``[U, depth]`` and the ideal DCG of ``1..depth`` hits."""
    ranks = np.arange(1, hits.shape[1] + 1, dtype=np.float64)
    discount = 1.0 / np.log2(ranks + 1.0)
    return np.cumsum(np.where(hits, discount, 0.0), axis=1), np.cumsum(discount)


def per_user_ranking_metrics(
    top_k: np.ndarray, ground_truth: Sequence[np.ndarray], ks: Sequence[int] = (10, 20)
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each user's :func:`ranking_metrics` figures, before the mean over users.

    Returns:
        ``({"recall@10": [U'], ..., "precision@20": [U']}, users [U'])``: float64 arrays over
        the ``U'`` users with relevant items, and those users' indices into ``ground_truth``
        (ascending). The paired comparisons of two systems line users up by these.
    """
    ks = _check_ks(ks)
    k_max = max(ks)
    hits, pos_len, users = _user_hits(top_k, ground_truth, k_max)
    cum_hits = np.cumsum(hits, axis=1)
    cum_dcg, cum_ideal = _cumulative_dcg(hits)
    first = np.argmax(hits, axis=1)  # first hit position (0 when none; guarded below)
    any_hit_at = np.where(hits.any(axis=1), first, k_max)  # k_max = "no hit"
    out: dict[str, np.ndarray] = {}
    for k in ks:
        count = cum_hits[:, k - 1]
        ideal = cum_ideal[np.minimum(pos_len, k).astype(np.int64) - 1]
        out[f"recall@{k}"] = count / pos_len
        out[f"mrr@{k}"] = np.where(any_hit_at < k, 1.0 / (any_hit_at + 1), 0.0)
        out[f"ndcg@{k}"] = cum_dcg[:, k - 1] / ideal
        out[f"hit@{k}"] = (count > 0).astype(np.float64)
        out[f"precision@{k}"] = count / k
    return out, users


def ranking_metrics(
    top_k: np.ndarray, ground_truth: Sequence[np.ndarray], ks: Sequence[int] = (10, 20)
) -> dict[str, float]:
    """RecBole 1.2.1 full-ranking metrics, per user, averaged over users with test items.

    For user ``u`` with relevant set ``R(u)`` (duplicates counted once) and ranked list ``L(u)``
    (``-1`` padding never matches; a list shorter than ``k`` is a list with misses at the end),
    with ``hit_i = 1`` when the item at 1-based rank ``i`` is in ``R(u)``:

    * ``recall@k    = sum_{i<=k} hit_i / |R(u)|``
    * ``precision@k = sum_{i<=k} hit_i / k``              (always ``k``, as RecBole)
    * ``hit@k       = 1 if any hit_i (i <= k) else 0``
    * ``mrr@k       = 1 / (rank of the first hit)``, 0 without a hit in the top ``k``
    * ``ndcg@k      = sum_{i<=k} hit_i / log2(i + 1)``
      ``/ sum_{i <= min(|R(u)|, k)} 1 / log2(i + 1)``   (ideal DCG over ``min(|R(u)|, k)``)

    Users with an empty ``R(u)`` are skipped (RecBole's full-sort evaluation only has users
    with test interactions). Values are not rounded (RecBole rounds to ``metric_decimal_place``).

    Args:
        top_k: ``[U, K]`` ranked item indices, ``-1`` = padding.
        ground_truth: ``U`` integer arrays of relevant item indices (``-1`` entries ignored).
        ks: cut-offs; a ``k`` larger than ``K`` counts the missing ranks as misses.

    Returns:
        ``{"recall@10": ..., "mrr@10": ..., "ndcg@10": ..., "hit@10": ..., "precision@10": ...,
        ..., "num_users": n}`` with floats in ``[0, 1]`` (``nan`` when ``n == 0``).
    """
    ks = _check_ks(ks)
    per_user, users = per_user_ranking_metrics(top_k, ground_truth, ks)
    result: dict[str, float] = {}
    for name in RANKING_METRICS:
        for k in ks:
            values = per_user[f"{name}@{k}"]
            result[f"{name}@{k}"] = float(np.mean(values)) if len(users) else float("nan")
    result["num_users"] = len(users)
    return result


def paired_difference(a: np.ndarray, b: np.ndarray, z: float = 1.96) -> dict[str, float]:
    """Mean of ``a - b`` over paired units (users) ``[n]``, its standard error and the normal
    ``z`` interval (1.96: 95%): whether two systems scored on the same users differ by more
    than the users' spread explains. ``{"mean", "se", "low", "high", "n"}``; ``se`` is 0 (and
    the interval a point) for one unit, everything ``nan`` for none."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired figures need the same 1-D shape, got {a.shape} and {b.shape}")
    n = len(a)
    if not n:
        nan = float("nan")
        return {"mean": nan, "se": nan, "low": nan, "high": nan, "n": 0}
    diff = a - b
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return {"mean": mean, "se": se, "low": mean - z * se, "high": mean + z * se, "n": n}


def ranking_curves(
    top_k: np.ndarray, ground_truth: Sequence[np.ndarray], max_k: int = CURVE_MAX_K
) -> dict[str, list[float]]:
    """:func:`ranking_metrics`' recall@k and NDCG@k at every ``k = 1..max_k`` (for plots).

    Args:
        top_k: ``[U, K]`` ranked item indices, ``-1`` = padding; beyond ``K`` the curves stay
            flat.
        ground_truth: ``U`` arrays of relevant item indices; users without any are left out
            of the mean, as in :func:`ranking_metrics`.
        max_k: the last cut-off, ``>= 1``.

    Returns:
        ``{"k": [1..max_k], "recall": [...], "ndcg": [...]}`` (lists of ``max_k`` floats,
        ``nan`` when no user has relevant items).
    """
    (max_k,) = _check_ks([max_k])
    hits, pos_len, _ = _user_hits(top_k, ground_truth, max_k)
    ks = np.arange(1, max_k + 1)
    if not len(pos_len):
        nan = [float("nan")] * max_k
        return {"k": ks.tolist(), "recall": nan, "ndcg": list(nan)}
    cum_dcg, cum_ideal = _cumulative_dcg(hits)
    recall = np.cumsum(hits, axis=1) / pos_len[:, None]
    # The ideal list holds min(k, |R(u)|) relevant items on top.
    ideal = cum_ideal[np.minimum(ks[None, :], pos_len[:, None]).astype(np.int64) - 1]
    return {
        "k": ks.tolist(),
        "recall": recall.mean(axis=0).tolist(),
        "ndcg": (cum_dcg / ideal).mean(axis=0).tolist(),
    }


# --------------------------------------------------------------------------- TFRS accuracy


def factorized_top_k_accuracy(
    scores: np.ndarray, true_index: np.ndarray, ks: Sequence[int] = (10, 50, 100)
) -> dict[str, float]:
    """TFRS ``FactorizedTopK`` accuracy: share of events whose true item is in the top ``k``.

    Every item of the catalog competes, seen items included (the TFRS tutorials' protocol).
    Tie rule, that of ``tf.math.in_top_k`` which TFRS uses on ``[true score, top-k scores]``:
    an event is a hit at ``k`` when **fewer than k items score strictly higher** than the true
    item; so items tied with the true item never push it out, and a true item tied with the
    k-th score counts as in. An event whose true score is not finite is a miss (as
    ``in_top_k``). Unlike TFRS, the true score is read from ``scores`` itself, so float rounding
    between two ways of computing it cannot move the true item.

    Args:
        scores: ``[E, N]`` score of every catalog item for each event's query.
        true_index: ``[E]`` catalog index of each event's true item.
        ks: cut-offs (a ``k >= N`` is always a hit for a finite true score).

    Returns:
        ``{"top_10_accuracy": ..., "top_50_accuracy": ..., ...}`` in ``[0, 1]``
        (``nan`` for ``E == 0``).
    """
    ks = _check_ks(ks)
    scores = np.asarray(scores)
    true_index = np.asarray(true_index, dtype=np.int64).reshape(-1)
    if scores.ndim != 2 or len(scores) != len(true_index):
        raise ValueError(f"need scores [E, N] and true_index [E], got {scores.shape}, "
                         f"{true_index.shape}")  # fmt: skip
    if len(true_index) and (true_index.min() < 0 or true_index.max() >= scores.shape[1]):
        raise ValueError("true_index out of range of the catalog")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    true_scores = scores[np.arange(len(scores)), true_index]
    greater = np.sum(scores > true_scores[:, None], axis=1)
    return _accuracy_from_counts(greater, np.isfinite(true_scores), ks)


def _accuracy_from_counts(greater: np.ndarray, finite: np.ndarray, ks: tuple[int, ...]) -> dict:
    if len(greater) == 0:
        return {f"top_{k}_accuracy": float("nan") for k in ks}
    return {f"top_{k}_accuracy": float(np.mean((greater < k) & finite)) for k in ks}


def factorized_top_k_accuracy_chunked(
    query_embeddings: np.ndarray,
    candidate_embeddings: np.ndarray,
    true_index: np.ndarray,
    ks: Sequence[int] = (10, 50, 100),
    *,
    query_block: int = 1024,
    candidate_block: int = 65536,
) -> dict[str, float]:
    """:func:`factorized_top_k_accuracy` of dot-product scores, a tile at a time.

    Memory is ``O(query_block * candidate_block)`` whatever ``E`` and ``N`` (e.g. ``N = 1M``).
    The true score is the row-wise dot product ``<q_e, c_true>`` (as TFRS's
    ``positive_scores``); the true item's own column is left out of the "strictly higher"
    count so that rounding differences between that product and the tiled matrix product
    can never make an item outrank itself. Other ties are judged on the tiled scores.

    Args:
        query_embeddings: ``[E, D]``, one query per event.
        candidate_embeddings: ``[N, D]``, the whole catalog.
        true_index: ``[E]`` catalog index of each event's true item.
        ks: cut-offs.
        query_block, candidate_block: tile size.

    Returns:
        The same dict as :func:`factorized_top_k_accuracy`.
    """
    ks = _check_ks(ks)
    queries = np.asarray(query_embeddings)
    candidates = np.asarray(candidate_embeddings)
    true_index = np.asarray(true_index, dtype=np.int64).reshape(-1)
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"need [E, D] and [N, D] embeddings, got {queries.shape}, "
                         f"{candidates.shape}")  # fmt: skip
    if len(queries) != len(true_index):
        raise ValueError(f"{len(queries)} queries but {len(true_index)} true items")
    if len(true_index) and (true_index.min() < 0 or true_index.max() >= len(candidates)):
        raise ValueError("true_index out of range of the catalog")
    greater = np.zeros(len(queries), dtype=np.int64)
    true_scores = np.zeros(len(queries), dtype=np.result_type(queries.dtype, candidates.dtype))
    for qs in iter_blocks(len(queries), query_block):
        q = queries[qs]
        truth = true_index[qs]
        true_s = np.einsum("ed,ed->e", q, candidates[truth])
        true_scores[qs] = true_s
        for cs in iter_blocks(len(candidates), candidate_block):
            block = q @ candidates[cs].T
            if np.isnan(block).any():
                raise ValueError("scores contain NaN")
            above = block > true_s[:, None]
            own = (truth >= cs.start) & (truth < cs.stop)
            above[np.flatnonzero(own), truth[own] - cs.start] = False
            greater[qs] += above.sum(axis=1)
    return _accuracy_from_counts(greater, np.isfinite(true_scores), ks)


# --------------------------------------------------------------------------- beyond accuracy


def _exposure(top_k: np.ndarray, num_items: int) -> np.ndarray:
    top = as_item_lists(top_k)
    items = top[top >= 0]
    if items.size and items.max() >= num_items:
        raise ValueError(f"top_k holds item index {items.max()} >= num_items {num_items}")
    return np.bincount(items, minlength=num_items)


def catalog_coverage(top_k: np.ndarray, num_items: int) -> float:
    """Share of the catalog that appears in at least one list.

    Args:
        top_k: ``[U, K]`` item indices, ``-1`` = padding.
        num_items: catalog size ``N`` (``>= 1``).

    Returns:
        ``|union of lists| / N`` in ``[0, 1]``.
    """
    if num_items < 1:
        raise ValueError(f"num_items must be at least 1, got {num_items}")
    return float(np.count_nonzero(_exposure(top_k, num_items)) / num_items)


def gini_index(top_k: np.ndarray, num_items: int) -> float:
    """Gini index of item exposure over the whole catalog (unrecommended items count as 0).

    With exposure counts sorted ascending ``c_1 <= ... <= c_N``:
    ``G = sum_i (2i - N - 1) c_i / (N * sum_i c_i)`` (as RecBole's ``GiniIndex``).
    ``0`` when every item is shown equally often; ``(N - 1) / N`` (-> 1) when a single item
    takes all exposure.

    Args:
        top_k: ``[U, K]`` item indices, ``-1`` = padding.
        num_items: catalog size ``N``.

    Returns:
        ``G`` in ``[0, 1)``; ``nan`` when the lists are empty.
    """
    if num_items < 1:
        raise ValueError(f"num_items must be at least 1, got {num_items}")
    counts = np.sort(_exposure(top_k, num_items)).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return float("nan")
    i = np.arange(1, num_items + 1, dtype=np.float64)
    return float(np.sum((2 * i - num_items - 1) * counts) / (num_items * total))


def intra_list_diversity(
    top_k: np.ndarray, item_embeddings: np.ndarray, *, user_block: int = 4096
) -> float:
    """Mean over users of ``1 - mean pairwise cosine similarity`` within each list.

    Pairs are unordered pairs of distinct positions among the user's valid (non ``-1``) items;
    users with fewer than two valid items are skipped. Identical items give ``0``, orthogonal
    ones ``1`` (opposite ones up to ``2``). Zero embeddings have cosine 0 with everything.

    Args:
        top_k: ``[U, K]`` item indices, ``-1`` = padding.
        item_embeddings: ``[N, D]``.
        user_block: users per vectorised block (memory ``user_block * K * D``).

    Returns:
        The mean ILD, ``nan`` when no user has two items.
    """
    top = as_item_lists(top_k)
    emb = np.asarray(item_embeddings)
    if emb.ndim != 2:
        raise ValueError(f"item_embeddings must be [N, D], got shape {emb.shape}")
    if top.size and top.max() >= len(emb):
        raise ValueError(f"top_k holds item index {top.max()} >= number of embeddings {len(emb)}")
    unit = normalize_rows(emb)
    total, users = 0.0, 0
    for block in iter_blocks(len(top), user_block):
        idx = top[block]
        valid = idx >= 0
        vecs = unit[np.maximum(idx, 0)] * valid[..., None]  # [B, K, D], padding zeroed
        summed = vecs.sum(axis=1)
        # sum over ordered pairs i != j of cos = |sum v|^2 - sum |v|^2
        pair_sum = np.sum(summed * summed, axis=1) - np.sum(vecs * vecs, axis=(1, 2))
        n = valid.sum(axis=1).astype(np.float64)
        ok = n >= 2
        mean_cos = pair_sum[ok] / (n[ok] * (n[ok] - 1))
        total += float(np.sum(1.0 - mean_cos))
        users += int(ok.sum())
    return total / users if users else float("nan")


def popularity_percentile(top_k: np.ndarray, popularity: np.ndarray) -> float:
    """Mean popularity percentile (0-100) of the recommended items; higher = more popular.

    An item's percentile is ``100 * r / (N - 1)`` where ``r`` is its 0-based ascending rank by
    popularity, tied items sharing their average rank: the most popular item (alone) is 100,
    the least popular 0, and a catalog where every item is equally popular gives 50. The mean
    is over every valid (non ``-1``) slot of every list.

    Args:
        top_k: ``[U, K]`` item indices, ``-1`` = padding.
        popularity: ``[N]`` popularity of each item (e.g. train interaction counts).

    Returns:
        Mean percentile in ``[0, 100]``; ``nan`` when the lists are empty.
    """
    top = as_item_lists(top_k)
    pop = np.asarray(popularity).reshape(-1)
    num_items = len(pop)
    items = top[top >= 0]
    if items.size == 0:
        return float("nan")
    if items.max() >= num_items:
        raise ValueError(f"top_k holds item index {items.max()} >= number of items {num_items}")
    if num_items == 1:
        return 50.0
    _, inverse, counts = np.unique(pop, return_inverse=True, return_counts=True)
    below = np.cumsum(counts) - counts
    percentile = 100.0 * (below + (counts - 1) / 2.0) / (num_items - 1)
    return float(np.mean(percentile[inverse.reshape(-1)][items]))


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared error of ``pred`` against ``target`` (same shape); ``nan`` if empty."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    if pred.size == 0:
        return float("nan")
    return float(np.sqrt(np.mean((pred - target) ** 2)))


# --------------------------------------------------------------------------- reporting


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, float_format: str = "{:.4f}"
) -> str:
    """A GitHub-flavoured markdown table of ``rows`` restricted to ``columns``.

    Floats are formatted with ``float_format``, other values with ``str``; a missing key is an
    empty cell; ``|`` and newlines in cells are escaped. Columns are padded to equal width so
    the table also reads well as plain text.
    """
    columns = list(columns)
    if not columns:
        raise ValueError("format_table needs at least one column")

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, (float, np.floating)):
            text = float_format.format(float(value))
        else:
            text = str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    header = [cell(c) for c in columns]
    widths = [max([3, len(header[j])] + [len(r[j]) for r in body]) for j in range(len(columns))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    lines = [line(header), "| " + " | ".join("-" * w for w in widths) + " |"]
    lines.extend(line(r) for r in body)
    return "\n".join(lines)
