"""Evaluation metrics: top-k selection, ranking accuracy, beyond-accuracy and MMR re-ranking.

Pure NumPy (TensorFlow is imported only inside :func:`mmr_rerank_tf`). Shapes use ``U`` users
(or queries), ``N`` catalog items, ``K`` list length, ``E`` events, ``M`` candidates per user and
``D`` embedding width. Item lists hold catalog indices ``0..N-1``; ``-1`` is padding, and every
function here ignores it.

Conventions, the same everywhere in this module:

* **Ties** in a score are broken by the lower item index (:func:`top_k_from_scores`) or by the
  earlier candidate position (:func:`mmr_rerank`, :func:`mmr_rerank_tf`), so results never depend
  on a sort's whims.
* A score of ``-inf`` means "not recommendable": such items are never returned by
  :func:`top_k_from_scores` (the list is padded with ``-1`` instead). ``NaN`` scores are an error.
* A mean over nothing (no evaluated user, no event) is ``nan``, never a made-up ``0``.

Ranking metrics follow RecBole 1.2.1 (``recbole/evaluator/metrics.py``), factorized top-k
accuracy follows ``tfrs.metrics.FactorizedTopK`` (score-based evaluation, seen items kept).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "RANKING_METRICS",
    "catalog_coverage",
    "factorized_top_k_accuracy",
    "factorized_top_k_accuracy_chunked",
    "format_table",
    "gini_index",
    "intra_list_diversity",
    "iter_blocks",
    "mmr_rerank",
    "mmr_rerank_tf",
    "popularity_percentile",
    "ranking_metrics",
    "rmse",
    "top_k_chunked",
    "top_k_from_scores",
]

#: Metric names of :func:`ranking_metrics`, in RecBole's default order.
RANKING_METRICS = ("recall", "mrr", "ndcg", "hit", "precision")

_NORM_EPS = 1e-12  # as tf.math.l2_normalize: a zero vector stays zero (cosine 0 with anything)


# --------------------------------------------------------------------------- helpers


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return ks


def _as_2d_indices(top_k: Any, name: str = "top_k") -> np.ndarray:
    arr = np.asarray(top_k)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [U, K], got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer item indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis (float64); zero vectors stay zero, as ``tf.math.l2_normalize``."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), _NORM_EPS))
    return x / norm


def _exclusion_coords(exclude: Any, num_rows: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of excluded entries from a list of index arrays or a sparse matrix."""
    if hasattr(exclude, "tocoo"):  # scipy.sparse matrix or array, without importing scipy
        coo = exclude.tocoo()
        if tuple(coo.shape) != (num_rows, num_items):
            raise ValueError(f"exclude mask has shape {coo.shape}, scores {(num_rows, num_items)}")
        keep = np.asarray(coo.data) != 0
        return np.asarray(coo.row, np.int64)[keep], np.asarray(coo.col, np.int64)[keep]
    if len(exclude) != num_rows:
        raise ValueError(f"exclude has {len(exclude)} entries for {num_rows} score rows")
    arrays = [np.asarray(e, dtype=np.int64).reshape(-1) for e in exclude]
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    cols = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(num_rows, dtype=np.int64), lengths)
    keep = cols >= 0  # -1 is padding
    rows, cols = rows[keep], cols[keep]
    if cols.size and cols.max() >= num_items:
        raise ValueError(f"exclude holds item index {cols.max()} >= number of items {num_items}")
    return rows, cols


def iter_blocks(total: int, block: int) -> Iterator[slice]:
    """Slices ``[start, start + block)`` covering ``range(total)``."""
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    for start in range(0, total, block):
        yield slice(start, min(start + block, total))


# --------------------------------------------------------------------------- top-k selection


def top_k_from_scores(scores: np.ndarray, k: int, exclude: Any = None) -> np.ndarray:
    """Indices of the ``k`` best-scored items of each row, best first.

    Args:
        scores: ``[U, N]`` real scores (higher is better). ``-inf`` marks an item that must not
            be recommended; ``NaN`` raises ``ValueError``.
        k: list length, ``>= 1``; may exceed ``N``.
        exclude: items never to return (e.g. each user's training items), as one of

            * ``None``;
            * a sequence of ``U`` integer arrays of item indices (``-1`` entries are ignored);
            * a boolean ``[U, N]`` array (``True`` = excluded);
            * a SciPy sparse ``[U, N]`` matrix (non-zero = excluded).

    Returns:
        ``[U, min(k, N)]`` int64 item indices sorted by descending score, ties broken by the
        lower item index. Where fewer than ``k`` items have a finite (or ``+inf``) score after
        exclusion, the row ends with ``-1`` padding.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [U, N], got shape {scores.shape}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    num_rows, num_items = scores.shape
    kk = min(k, num_items)
    out = np.full((num_rows, kk), -1, dtype=np.int64)
    if num_rows == 0 or kk == 0:
        return out
    s = np.array(scores, dtype=np.result_type(scores.dtype, np.float32), copy=True)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if exclude is not None:
        if isinstance(exclude, np.ndarray) and exclude.dtype == bool:
            if exclude.shape != s.shape:
                raise ValueError(f"exclude mask has shape {exclude.shape}, scores {s.shape}")
            s[exclude] = -np.inf
        else:
            rows, cols = _exclusion_coords(exclude, num_rows, num_items)
            s[rows, cols] = -np.inf
    # The kk-th largest value of each row; everything >= it is a candidate (ties can add more).
    kth = np.partition(s, num_items - kk, axis=1)[:, num_items - kk]
    rows, cols = np.nonzero(s >= kth[:, None])
    vals = s[rows, cols]
    order = np.lexsort((cols, -vals, rows))  # by row, then score desc, then item index asc
    rows, cols, vals = rows[order], cols[order], vals[order]
    first = np.searchsorted(rows, np.arange(num_rows))
    rank = np.arange(len(rows)) - first[rows]
    keep = (rank < kk) & (vals > -np.inf)
    out[rows[keep], rank[keep]] = cols[keep]
    return out


def _merge_top_k(
    scores_a: np.ndarray, idx_a: np.ndarray, scores_b: np.ndarray, idx_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of two ``(score, index)`` row sets, same order as :func:`top_k_from_scores`."""
    scores = np.concatenate([scores_a, scores_b], axis=1)
    idx = np.concatenate([idx_a, idx_b], axis=1)
    tie_idx = np.where(idx < 0, np.iinfo(np.int64).max, idx)  # padding sorts last
    order = np.lexsort((tie_idx, -scores), axis=-1)[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    idx = np.where(scores > -np.inf, idx, -1)
    return scores, idx


def top_k_chunked(
    query_embeddings: np.ndarray,
    candidate_embeddings: np.ndarray,
    k: int,
    exclude: Sequence[np.ndarray] | None = None,
    *,
    query_block: int = 1024,
    candidate_block: int = 65536,
) -> np.ndarray:
    """:func:`top_k_from_scores` of ``queries @ candidates.T`` without the ``[U, N]`` matrix.

    Scores are dot products computed a ``[query_block, candidate_block]`` tile at a time, so
    memory stays bounded for catalogs of millions of items.

    Args:
        query_embeddings: ``[U, D]``.
        candidate_embeddings: ``[N, D]``.
        k: list length (may exceed ``N``).
        exclude: ``None`` or ``U`` arrays of item indices never to return (``-1`` ignored).
        query_block, candidate_block: tile size.

    Returns:
        ``[U, min(k, N)]`` int64 indices, the same as ``top_k_from_scores(q @ c.T, k, exclude)``
        up to float rounding of the scores (ties by lower item index, ``-1`` padding).
    """
    queries = np.asarray(query_embeddings)
    candidates = np.asarray(candidate_embeddings)
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"need [U, D] and [N, D] embeddings, got {queries.shape}, "
                         f"{candidates.shape}")  # fmt: skip
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    num_queries, num_items = len(queries), len(candidates)
    kk = min(k, num_items)
    out = np.full((num_queries, kk), -1, dtype=np.int64)
    if exclude is not None:
        ex_rows, ex_cols = _exclusion_coords(exclude, num_queries, num_items)
    for qs in iter_blocks(num_queries, query_block):
        best_s = np.full((qs.stop - qs.start, 0), -np.inf, dtype=np.float64)
        best_i = np.full((qs.stop - qs.start, 0), -1, dtype=np.int64)
        if exclude is not None:
            in_q = (ex_rows >= qs.start) & (ex_rows < qs.stop)
            q_rows, q_cols = ex_rows[in_q] - qs.start, ex_cols[in_q]
        for cs in iter_blocks(num_items, candidate_block):
            block = np.asarray(queries[qs] @ candidates[cs].T, dtype=np.float64)
            if exclude is not None:
                in_c = (q_cols >= cs.start) & (q_cols < cs.stop)
                block[q_rows[in_c], q_cols[in_c] - cs.start] = -np.inf
            top = top_k_from_scores(block, kk)
            top_s = np.take_along_axis(block, np.maximum(top, 0), axis=1)
            top_s = np.where(top >= 0, top_s, -np.inf)
            top_i = np.where(top >= 0, top + cs.start, -1)
            best_s, best_i = _merge_top_k(best_s, best_i, top_s, top_i, kk)
        out[qs, : best_i.shape[1]] = best_i
    return out


# --------------------------------------------------------------------------- RecBole ranking


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
    top = _as_2d_indices(top_k)
    num_users, width = top.shape
    if len(ground_truth) != num_users:
        raise ValueError(f"ground_truth has {len(ground_truth)} users, top_k {num_users}")
    gt_arrays = [np.asarray(g, dtype=np.int64).reshape(-1) for g in ground_truth]
    lengths = np.fromiter((len(g) for g in gt_arrays), dtype=np.int64, count=num_users)
    gt_items = np.concatenate(gt_arrays) if gt_arrays else np.zeros(0, np.int64)
    gt_users = np.repeat(np.arange(num_users, dtype=np.int64), lengths)
    keep = gt_items >= 0
    gt_items, gt_users = gt_items[keep], gt_users[keep]
    span = int(max(gt_items.max(initial=-1), top.max(initial=-1))) + 1
    gt_keys = np.unique(gt_users * span + gt_items)
    pos_len = np.bincount(gt_keys // max(span, 1), minlength=num_users).astype(np.float64)

    k_max = max(ks)
    hits = np.zeros((num_users, max(k_max, width)), dtype=bool)
    if width:
        top_keys = np.arange(num_users, dtype=np.int64)[:, None] * span + top
        hits[:, :width] = (top >= 0) & np.isin(top_keys, gt_keys)
    hits = hits[:, :k_max]

    users = pos_len > 0
    n = int(users.sum())
    result: dict[str, float] = {}
    if n == 0:
        for name in RANKING_METRICS:
            for k in ks:
                result[f"{name}@{k}"] = float("nan")
        result["num_users"] = 0
        return result
    hits, pos_len = hits[users], pos_len[users]
    ranks = np.arange(1, k_max + 1, dtype=np.float64)
    cum_hits = np.cumsum(hits, axis=1)
    discount = 1.0 / np.log2(ranks + 1.0)
    cum_dcg = np.cumsum(np.where(hits, discount, 0.0), axis=1)
    cum_ideal = np.cumsum(discount)
    first = np.argmax(hits, axis=1)  # first hit position (0 when none; guarded below)
    any_hit_at = np.where(hits.any(axis=1), first, k_max)  # k_max = "no hit"
    per_metric: dict[str, dict[int, float]] = {name: {} for name in RANKING_METRICS}
    for k in ks:
        count = cum_hits[:, k - 1]
        ideal = cum_ideal[np.minimum(pos_len, k).astype(np.int64) - 1]
        per_metric["recall"][k] = float(np.mean(count / pos_len))
        per_metric["mrr"][k] = float(np.mean(np.where(any_hit_at < k, 1.0 / (any_hit_at + 1), 0.0)))
        per_metric["ndcg"][k] = float(np.mean(cum_dcg[:, k - 1] / ideal))
        per_metric["hit"][k] = float(np.mean(count > 0))
        per_metric["precision"][k] = float(np.mean(count / k))
    for name in RANKING_METRICS:
        for k in ks:
            result[f"{name}@{k}"] = per_metric[name][k]
    result["num_users"] = n
    return result


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
    top = _as_2d_indices(top_k)
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
    top = _as_2d_indices(top_k)
    emb = np.asarray(item_embeddings)
    if emb.ndim != 2:
        raise ValueError(f"item_embeddings must be [N, D], got shape {emb.shape}")
    if top.size and top.max() >= len(emb):
        raise ValueError(f"top_k holds item index {top.max()} >= number of embeddings {len(emb)}")
    unit = _normalize_rows(emb)
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
    top = _as_2d_indices(top_k)
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


# --------------------------------------------------------------------------- MMR re-ranking


def mmr_rerank(
    candidate_indices: np.ndarray,
    relevance: np.ndarray,
    item_embeddings: np.ndarray,
    k: int,
    lambda_: float,
    *,
    user_block: int = 1024,
) -> np.ndarray:
    """Greedy Maximal Marginal Relevance re-ranking of each user's candidate list.

    Convention (``lambda_`` weights *diversity*): at each step the next item is the remaining
    candidate maximising ``(1 - lambda_) * relevance - lambda_ * max_sim``, where ``max_sim``
    is its largest cosine similarity to the items already picked, taken as 0 before the
    first pick. ``lambda_ = 0`` is the plain top-``k`` by relevance; ``lambda_ = 1`` ignores
    relevance after the first pick (which is then the first candidate).

    Rules shared with :func:`mmr_rerank_tf`:

    * ties go to the earlier candidate position;
    * candidates with index ``-1`` are padding and never picked;
    * candidates with non-finite relevance (``-inf``: excluded) are picked only after every
      finite one, in candidate order;
    * when the candidates run out the row is padded with ``-1`` (``k`` may exceed ``M``).

    Args:
        candidate_indices: ``[U, M]`` item indices (``-1`` = padding), e.g. a top-``M`` list.
        relevance: ``[U, M]`` relevance score of each candidate.
        item_embeddings: ``[N, D]``; cosine similarities are taken between these.
        k: number of items to pick, ``>= 1``.
        lambda_: diversity weight in ``[0, 1]``.
        user_block: users per vectorised block (memory ``user_block * M * max(M, D)``).

    Returns:
        ``[U, k]`` int64 item indices in pick order.
    """
    idx = _as_2d_indices(candidate_indices, "candidate_indices")
    rel = np.asarray(relevance, dtype=np.float64)
    if rel.shape != idx.shape:
        raise ValueError(f"relevance {rel.shape} and candidate_indices {idx.shape} differ in shape")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    lam = float(lambda_)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda_ must be in [0, 1], got {lambda_}")
    emb = np.asarray(item_embeddings)
    if emb.ndim != 2:
        raise ValueError(f"item_embeddings must be [N, D], got shape {emb.shape}")
    if idx.size and idx.max() >= len(emb):
        raise ValueError(f"candidate index {idx.max()} >= number of embeddings {len(emb)}")
    num_users, m = idx.shape
    out = np.full((num_users, k), -1, dtype=np.int64)
    if m == 0:
        return out
    unit = _normalize_rows(emb)
    positions = np.arange(m)
    for block in iter_blocks(num_users, user_block):
        ib, rb = idx[block], rel[block]
        b = len(ib)
        vecs = unit[np.maximum(ib, 0)]  # [B, M, D]
        sims = np.matmul(vecs, np.swapaxes(vecs, 1, 2))  # [B, M, M]
        del vecs
        valid = ib >= 0
        finite = np.isfinite(rb)
        safe_rel = np.where(finite, rb, 0.0)
        selected = np.zeros((b, m), dtype=bool)
        max_sim = np.full((b, m), -np.inf)
        rows = np.arange(b)
        for t in range(k):
            penalty = np.where(np.isfinite(max_sim), max_sim, 0.0)
            score = (1.0 - lam) * safe_rel - lam * penalty
            available = valid & ~selected
            priority = available.astype(np.int8) + (available & finite)
            top_priority = priority.max(axis=1)
            cand = priority == top_priority[:, None]
            key = np.where(cand & finite, score, -np.inf)
            best = key.max(axis=1)
            pos = np.where(cand & (key >= best[:, None]), positions, m).min(axis=1)
            found = top_priority > 0
            pos = np.minimum(pos, m - 1)
            out[block.start + rows[found], t] = ib[rows[found], pos[found]]
            selected[rows[found], pos[found]] = True
            new_sim = sims[rows, pos]  # [B, M]
            max_sim = np.where(found[:, None], np.maximum(max_sim, new_sim), max_sim)
    return out


def mmr_rerank_tf(candidate_indices, relevance, item_embeddings, k: int, lambda_):
    """TensorFlow twin of :func:`mmr_rerank`, usable inside a ``tf.function`` / SavedModel.

    Same convention and rules (``lambda_`` weights diversity; ties to the earlier position;
    ``-1`` candidates never picked; non-finite relevance picked last; ``-1`` when exhausted).
    ``k`` is a static Python int (the loop is a ``tf.while_loop`` over ``k`` steps);
    ``lambda_`` may be a Python float or a scalar tensor. The batch size and ``M`` may be
    dynamic; ``M`` must be at least 1. Computes in ``relevance``'s float dtype (float32 if
    it is not floating).

    Args:
        candidate_indices: ``[B, M]`` integer tensor of item indices.
        relevance: ``[B, M]`` float tensor.
        item_embeddings: ``[N, D]`` tensor (or variable).
        k: number of picks.
        lambda_: diversity weight in ``[0, 1]`` (not checked here).

    Returns:
        ``[B, k]`` tensor of item indices, dtype of ``candidate_indices``.
    """
    import tensorflow as tf

    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    candidates = tf.convert_to_tensor(candidate_indices)
    rel = tf.convert_to_tensor(relevance)
    if not rel.dtype.is_floating:
        rel = tf.cast(rel, tf.float32)
    dtype = rel.dtype
    emb = tf.cast(tf.convert_to_tensor(item_embeddings), dtype)
    lam = tf.cast(lambda_, dtype)
    m = tf.shape(candidates)[1]
    batch = tf.shape(candidates)[0]
    positions = tf.range(m)[None, :]
    valid = candidates >= 0
    finite = tf.math.is_finite(rel)
    safe_rel = tf.where(finite, rel, tf.zeros_like(rel))
    vecs = tf.math.l2_normalize(tf.gather(emb, tf.maximum(candidates, 0)), axis=-1)
    sims = tf.matmul(vecs, vecs, transpose_b=True)  # [B, M, M]
    neg_inf = tf.constant(-np.inf, dtype)
    missing = tf.constant(-1, candidates.dtype)

    def body(t, selected, max_sim, picks):
        penalty = tf.where(tf.math.is_finite(max_sim), max_sim, tf.zeros_like(max_sim))
        score = (1.0 - lam) * safe_rel - lam * penalty
        available = valid & ~selected
        priority = tf.cast(available, tf.int32) + tf.cast(available & finite, tf.int32)
        top_priority = tf.reduce_max(priority, axis=1, keepdims=True)
        cand = tf.equal(priority, top_priority)
        key = tf.where(cand & finite, score, neg_inf)
        best = tf.reduce_max(key, axis=1, keepdims=True)
        pos = tf.reduce_min(tf.where(cand & (key >= best), positions, m), axis=1)
        pos = tf.minimum(pos, m - 1)
        found = top_priority[:, 0] > 0
        item = tf.where(found, tf.gather(candidates, pos, batch_dims=1), missing)
        picks = picks.write(t, item)
        newly = tf.equal(positions, pos[:, None]) & found[:, None]
        new_sim = tf.gather(sims, pos, batch_dims=1)  # [B, M]
        max_sim = tf.where(found[:, None], tf.maximum(max_sim, new_sim), max_sim)
        return t + 1, selected | newly, max_sim, picks

    init = (
        tf.constant(0),
        tf.zeros([batch, m], tf.bool),
        tf.fill([batch, m], neg_inf),
        tf.TensorArray(candidates.dtype, size=k, element_shape=tf.TensorShape([None])),
    )
    _, _, _, picks = tf.while_loop(lambda t, *_: t < k, body, init, maximum_iterations=k)
    return tf.transpose(picks.stack())  # [B, k]


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
