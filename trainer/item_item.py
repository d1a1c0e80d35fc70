"""The item-item term of the served score: EASE over the query's history, blended in.

The served score of item ``i`` for a query is

    s_i = a_i + α · σ(a) · e_i / σ(e)

* ``a`` ``[N]``: the two-tower score (cosine + the popularity prior's column);
* ``e = x B`` ``[N]``: EASE's scores (:mod:`trainer.baselines`) of the query's ``history``, ``x``
  its binary row over the catalog and ``B`` ``[N, N]`` fit on the train part;
* ``σ``: each query's standard deviation over the whole catalog (population), so ``α`` weighs the
  two per-user standardised scores (``z(a) + α z(e)`` ranks the same: a per-query constant
  never reorders a query's items). ``σ(a)`` needs no full scoring pass: with ``C`` the
  covariance of the catalog's retrieval vectors, ``σ(a)² = qᵀ C q``, which is how the export
  computes it after the index returned only its pool (:func:`score_std_from_covariance`).

``B`` and ``α`` are fit after training, on the valid part only
(:func:`trainer.validation.choose_item_item`): ``λ`` as the EASE baseline chooses its own, then
``α`` from :data:`ITEM_ITEM_WEIGHTS` for the best valid recall@10 (``α = 0``, the two-tower
alone, is on the grid). p2, three seeds: valid recall@10 0.2516 → 0.2540 and NDCG@10 0.2583 →
0.2693 (``README.md``, Quality).

Why a blend: the two-tower's rank-``D`` inner product cannot hold what EASE's full ``N x N``
item-item weights hold (EASE cut to rank 64 loses 3% of its valid recall@10), and EASE cannot
place a new item, a typed title or a profile; each ranks better with the other's score.

EASE gives an item nobody rated in the fit no score (its column of ``B`` is zero). Such a new
item can borrow its column from the :data:`NEW_ITEM_NEIGHBOURS` rated items nearest it by the
candidate tower's vectors, which read its text (:func:`fill_new_items`): its ``e`` is then their
cosine-weighted mean. Whether it does is chosen on valid with ``α``: on p3, whose cold items
are a random tenth of the catalog, it lifts valid recall@10; on p2, whose only unrated items
are the long tail's, it does not (``README.md``, Quality).

``B`` is dense, so the term is built only for catalogs up to :data:`MAX_ITEMS` items (memory
``4 N²`` bytes in the weights and the export); larger catalogs serve the two-tower alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import tensorflow as tf

#: The largest catalog with an item-item term (a dense [N, N] float32: 100 MB at 5,000 items).
MAX_ITEMS = 5_000
#: Blend weights α tried on the valid part after training (p2: 0.1–0.15 chosen).
ITEM_ITEM_WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
#: How many rated items a new item's column of ``B`` is mixed from (p3 valid, three seeds: 10 gave
#: more cold recall@10 than 50 on all three, and more recall@10 on two).
NEW_ITEM_NEIGHBOURS = 10
#: Below this standard deviation a query's EASE scores count as none (an empty or unknown
#: history): its term is 0 instead of a division by ~0.
_MIN_STD = 1e-6


def history_rows(history: np.ndarray, index: Mapping[str, int]) -> list[np.ndarray]:
    """``history`` ``[Q, H]`` item ids -> each query's catalog rows (unknown ids and ``""``
    padding left out; a repeated id counts once, as EASE's binary row)."""
    return [
        np.unique(np.array([index[h] for h in row if h in index], dtype=np.int64))
        for row in np.asarray(history).astype(str)
    ]


def ease_scores(history: np.ndarray, index: Mapping[str, int], weights: np.ndarray) -> np.ndarray:
    """``e = x B``: ``[Q, N]`` float32 EASE scores of each query's ``history`` ``[Q, H]``
    against ``weights`` ``B`` ``[N, N]`` (catalog rows by ``index``)."""
    out = np.zeros((len(history), weights.shape[1]), np.float32)
    for q, rows in enumerate(history_rows(history, index)):
        if len(rows):
            out[q] = weights[rows].sum(axis=0)
    return out


def blend_terms(
    scores, scores_std, item_item, item_item_std, weight: float, *, where: Callable = np.where
):
    """The served score ``a + α σ(a) e / σ(e)`` (module docstring), NumPy or TensorFlow.

    ``scores`` ``a`` and ``item_item`` ``e`` ``[Q, P]`` (the whole catalog, or the index's pool
    of it); ``scores_std`` ``σ(a)`` and ``item_item_std`` ``σ(e)`` ``[Q, 1]``, each over the
    whole catalog. A query whose ``σ(e)`` is below ``_MIN_STD`` keeps ``a``. ``where``:
    ``np.where`` or ``tf.where``.
    """
    has_terms = item_item_std > _MIN_STD
    safe = where(has_terms, item_item_std, 1.0)
    return scores + where(has_terms, weight * scores_std / safe, 0.0) * item_item


def blend_full(scores: np.ndarray, item_item: np.ndarray, weight: float) -> np.ndarray:
    """:func:`blend_terms` over whole-catalog scores ``[Q, N]`` (both deviations computed here)."""
    if not weight:
        return scores
    return blend_terms(
        scores,
        scores.std(axis=1, keepdims=True),
        item_item,
        item_item.std(axis=1, keepdims=True),
        float(weight),
    )


def score_std_from_covariance(queries: tf.Tensor, covariance: tf.Tensor) -> tf.Tensor:
    """``σ(a)`` ``[Q, 1]`` of each query's scores over a catalog, from ``queries`` ``[Q, D]``
    and the catalog vectors' population covariance ``[D, D]``: ``sqrt(qᵀ C q)``."""
    variance = tf.reduce_sum(tf.matmul(queries, covariance) * queries, axis=1, keepdims=True)
    return tf.sqrt(tf.maximum(variance, 0.0))


def covariance(vectors: np.ndarray) -> np.ndarray:
    """Population covariance ``[D, D]`` (float32) of the rows of ``vectors`` ``[N, D]``."""
    v = np.asarray(vectors, np.float64)
    centred = v - v.mean(axis=0, keepdims=True)
    return (centred.T @ centred / max(len(v), 1)).astype(np.float32)


def ease_scores_tf(rows: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """``e = x B`` in the graph: ``rows`` ``[Q, H]`` int catalog rows of each query's history
    (``-1`` for padding and unknown ids, a repeat counted once) and ``weights`` ``B`` ``[N, N]``
    -> ``[Q, N]``."""
    num_items = tf.shape(weights, out_type=tf.int64)[0]
    rows = tf.cast(rows, tf.int64)
    known = rows >= 0
    query = tf.broadcast_to(tf.range(tf.shape(rows, out_type=tf.int64)[0])[:, None], tf.shape(rows))
    where = tf.stack([tf.boolean_mask(query, known), tf.boolean_mask(rows, known)], axis=1)
    x = tf.tensor_scatter_nd_max(
        tf.zeros([tf.shape(rows, out_type=tf.int64)[0], num_items], weights.dtype),
        where,
        tf.ones([tf.shape(where)[0]], weights.dtype),
    )  # binary: a repeated id counts once
    return tf.matmul(x, weights)


def fill_new_items(
    weights: np.ndarray, vectors: np.ndarray, neighbours: int = NEW_ITEM_NEIGHBOURS
) -> np.ndarray:
    """``B`` ``[N, N]`` with each new item's column filled from its text neighbours.

    A new item's column is all zero (nobody rated it where ``B`` was fit, so EASE never scores
    it). It becomes the mean of the columns of the ``neighbours`` rated items (a non-zero
    column) nearest it by cosine of ``vectors`` ``[N, D]`` (the candidate tower's: they read the
    item's text), each weighed by its cosine (a cosine <= 0 weighs nothing): the new item's
    ``e = x B`` is then its neighbours' ``e``, so the term ranks it as it ranks them. Rows are
    kept (a new item in a history adds nothing, as in EASE). Returns a float32 copy.
    """
    out = np.array(weights, np.float32, copy=True)
    new = ~out.any(axis=0)
    rated = np.flatnonzero(~new)
    if not new.any() or not len(rated) or neighbours < 1:
        return out
    v = np.asarray(vectors, np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    cosine = v[new] @ v[rated].T  # [new, rated]
    k = min(neighbours, len(rated))
    nearest = np.argpartition(-cosine, k - 1, axis=1)[:, :k]
    share = np.maximum(np.take_along_axis(cosine, nearest, axis=1), 0.0)
    share /= np.maximum(share.sum(axis=1, keepdims=True), 1e-12)
    mix = np.zeros_like(cosine)
    np.put_along_axis(mix, nearest, share, axis=1)
    out[:, new] = out[:, rated] @ mix.T
    return out


def catalog_weights(
    model_item_ids,
    weights: np.ndarray,
    catalog_item_ids,
    vectors: np.ndarray | None = None,
    neighbours: int = 0,
) -> tuple[dict[str, int], np.ndarray]:
    """``B`` ``[N, N]`` (rows and columns in ``model_item_ids`` order) re-indexed to another
    catalog's order: ``({item id: catalog row}, [C, C])``. The items the model never had get
    zero rows, and zero columns unless ``neighbours`` > 0 and the catalog's candidate
    ``vectors`` ``[C, D]`` are given: then their columns are filled from that many neighbours
    (:func:`fill_new_items`), as the model's own unrated items were when it chose to."""
    model_row = {str(i): n for n, i in enumerate(model_item_ids)}
    ids = [str(i) for i in catalog_item_ids]
    rows = np.array([model_row.get(i, -1) for i in ids], dtype=np.int64)
    known = rows >= 0
    out = np.zeros((len(ids), len(ids)), np.float32)
    out[np.ix_(known, known)] = np.asarray(weights, np.float32)[np.ix_(rows[known], rows[known])]
    if vectors is not None and neighbours > 0:
        out = fill_new_items(out, vectors, neighbours)
    return {i: n for n, i in enumerate(ids)}, out


def served_weights(
    model, catalog_item_ids, vectors: np.ndarray
) -> tuple[dict[str, int], np.ndarray]:
    """A trained model's ``B`` in the order of the catalog it serves (:func:`catalog_weights`):
    the items it never had filled from ``vectors`` ``[C, D]`` exactly when it filled its own
    (``model.item_item_neighbours``). Evaluation and the export both read ``B`` through here, so
    they serve the same term."""
    return catalog_weights(
        model.assets.item_ids,
        np.asarray(model.item_item),
        catalog_item_ids,
        vectors,
        int(model.item_item_neighbours),
    )
