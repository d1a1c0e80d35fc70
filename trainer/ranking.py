"""Ranking operations: top-k selection, exclusions, MMR re-ranking and catalog indexing.

Pure NumPy (TensorFlow is imported only inside :func:`mmr_rerank_tf`). Shapes use ``U`` users
(or queries), ``N`` catalog items, ``K`` list length, ``M`` candidates per user and ``D``
embedding width. Item lists hold catalog indices ``0..N-1``; ``-1`` is padding, and every
function here ignores it. The metrics computed on these lists are in :mod:`trainer.metrics`.

Conventions, the same everywhere in this module:

* **Ties** in a score are broken by the lower item index (:func:`top_k_from_scores`) or by the
  earlier candidate position (:func:`mmr_rerank`, :func:`mmr_rerank_tf`), so results never depend
  on a sort's whims.
* A score of ``-inf`` means "not recommendable": such items are never returned by
  :func:`top_k_from_scores` (the list is padded with ``-1`` instead). ``NaN`` scores are an error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "as_item_lists",
    "index_of",
    "items_by_user",
    "iter_blocks",
    "mmr_rerank",
    "mmr_rerank_tf",
    "normalize_rows",
    "top_k_chunked",
    "top_k_from_scores",
]

_NORM_EPS = 1e-12  # as tf.math.l2_normalize: a zero vector stays zero (cosine 0 with anything)


# --------------------------------------------------------------------------- catalog rows


def index_of(catalog: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Item id -> catalog row: ``catalog["item_id"]`` ``[N]`` -> ``{id: 0..N-1}``."""
    return {item: i for i, item in enumerate(catalog["item_id"])}


def items_by_user(
    events: Mapping[str, np.ndarray], index: Mapping[str, int]
) -> defaultdict[str, list[int]]:
    """User id -> catalog rows of the user's items in ``events``, in event order.

    Args:
        events: ``user_id`` and ``item_id`` ``[E]``; every item must be in ``index``.
        index: :func:`index_of` the catalog.

    Returns:
        A ``defaultdict(list)``: a user without events reads as ``[]``.
    """
    groups: defaultdict[str, list[int]] = defaultdict(list)
    for user, item in zip(events["user_id"], events["item_id"], strict=True):
        groups[user].append(index[item])
    return groups


# --------------------------------------------------------------------------- helpers


def as_item_lists(top_k: Any, name: str = "top_k") -> np.ndarray:
    """``top_k`` as ``[U, K]`` int64 item indices; ``ValueError`` naming ``name`` otherwise."""
    arr = np.asarray(top_k)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [U, K], got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer item indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def normalize_rows(x: np.ndarray) -> np.ndarray:
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
    idx = as_item_lists(candidate_indices, "candidate_indices")
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
    unit = normalize_rows(emb)
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
