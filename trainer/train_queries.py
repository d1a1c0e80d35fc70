"""Training queries of the per-user protocols, built from each user's whole train history.

Two ways to turn ``users.tfrecord`` (one row per user: profile, ``history`` ``[U, H]`` most
recent first, ``history_ratings`` ``[U, H]``) into what a training step reads:

- :func:`whole_history_queries` (``--train-queries events``): a batch of rated events, each
  given its user's history *without its own target* (and a random share dropped) as the query.
- :func:`user_batches` (``--train-queries users``): a batch of users, each history split
  afresh every step into the query's input and held-out targets, as denoising autoencoders
  (Mult-DAE) train. One query encoding then serves all of a user's targets.

Either way no query ever holds its own target, so the model cannot learn to echo its input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import tensorflow as tf

from trainer.data import schema
from trainer.data.movielens import DataError
from trainer.features import NOTHING_LIKED, profile_texts

#: Users with fewer train items than this have nothing to split into input and targets.
MIN_USER_ITEMS = 2


def _row_table(ids: np.ndarray) -> tf.lookup.StaticHashTable:
    """Id -> its row in ``ids`` (int64; -1 for an unknown id or ``""``)."""
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(ids.astype(str)), tf.range(len(ids), dtype=tf.int64)
        ),
        default_value=-1,
    )


def _teacher_scores(item_ids: np.ndarray, teacher: np.ndarray) -> Callable[[tf.Tensor], tf.Tensor]:
    """``seen`` ``[B, H]`` item ids -> ``x_u B`` ``[B, N]``: the multi-hot row of each user's
    items times ``teacher`` (``[N, N]`` in the order of ``item_ids``)."""
    rows_of = _row_table(item_ids)
    matrix = tf.constant(teacher, tf.float32)

    def scores(seen: tf.Tensor) -> tf.Tensor:
        rows = rows_of.lookup(seen)
        where = tf.where(rows >= 0)  # [M, 2]: (user, slot) of every known item
        cells = tf.stack([where[:, 0], tf.gather_nd(rows, where)], axis=1)
        shape = tf.stack([tf.shape(seen, out_type=tf.int64)[0], len(item_ids)])
        # A user's kept items are distinct (one history row per item), so the sum is 0/1.
        multi_hot = tf.scatter_nd(cells, tf.ones_like(cells[:, 0], tf.float32), shape)
        return tf.matmul(multi_hot, matrix)

    return scores


def _random_subset(keep: tf.Tensor, draw: tf.Tensor, values: tf.Tensor, size: int) -> tf.Tensor:
    """``size`` of the kept positions of ``values`` ``[B, H]`` at random (the highest draws;
    dropped positions rank last) -> ``[B, size]``."""
    picked = tf.math.top_k(tf.where(keep, draw, -1.0), k=size).indices
    return tf.gather(values, picked, batch_dims=1)


def whole_history_queries(
    users: Mapping[str, np.ndarray], dropout: float, seed: int, max_items: int = 0
) -> Callable[[tf.Tensor, dict], dict]:
    """``(batch index, batch) -> batch`` whose ``history`` is each user's whole history
    (``users["history"]`` ``[U, H]``) with the event's own item left out, a ``dropout`` share
    of the rest dropped, and at most ``max_items`` of what remains kept at random (0 = all;
    ``history`` is then ``[B, max_items]``). Seeded by ``(seed, batch index)``: the same batch
    on a resume.

    The fresh random drop each epoch makes the model rank what is missing from a history.
    """
    table = _row_table(users["user_id"])
    histories = tf.constant(users["history"].astype(str))

    def attach(index: tf.Tensor, batch: dict) -> dict:
        rows = table.lookup(batch["user_id"])
        history = tf.gather(histories, tf.maximum(rows, 0))
        keep = tf.logical_and(rows[:, None] >= 0, history != batch["item_id"][:, None])
        keep = tf.logical_and(keep, history != "")
        draw = tf.random.stateless_uniform(
            tf.shape(history), seed=tf.stack([tf.constant(seed, tf.int64), index])
        )
        if dropout > 0:
            keep = tf.logical_and(keep, draw >= dropout)
        history = tf.where(keep, history, "")
        if max_items and max_items < histories.shape[1]:
            history = _random_subset(keep, draw, history, max_items)
        return {**batch, "history": history}

    return attach


def trainable_users(users: Mapping[str, np.ndarray]) -> np.ndarray:
    """Rows of the users with at least :data:`MIN_USER_ITEMS` *train* ratings.

    ``num_train`` counts train ratings only: p4's held-out users (whose ``history`` is their
    fold-in) have none, so they never reach a training step. Raises DataError for a data dir
    prepared before ``history_ratings`` were kept.
    """
    rows = np.flatnonzero(np.asarray(users["num_train"]) >= MIN_USER_ITEMS)
    ratings = users.get("history_ratings")
    if ratings is None or (len(rows) and not np.any(ratings[rows] > 0)):
        raise DataError(
            "users.tfrecord has no history_ratings (prepared by an older version): run "
            "`python -m trainer.data prepare` again, or train with --train-queries events"
        )
    return rows


def user_batch_count(num_users: int, batch_size: int, passes: int) -> int:
    """Steps of one epoch of :func:`user_batches`."""
    return (num_users * passes) // batch_size


def user_batches(
    users: Mapping[str, np.ndarray],
    catalog: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    passes: int,
    target_fraction: float,
    seed: int,
    max_items: int = 0,
    max_titles: int = schema.QUERY_TITLES,
    liked_threshold: float = schema.LIKED_THRESHOLD,
    titles_only: float = 0.0,
    teacher: np.ndarray | None = None,
) -> tf.data.Dataset:
    """One epoch of user batches: ``passes`` shuffled passes over :func:`trainable_users`.

    Each element (``B = batch_size``, ``H`` the users table's history length, or
    ``max_items`` for ``history``):

    - the query features of :func:`trainer.data.schema.query_feature_spec` (``user_*``
      ``[B]``, ``history`` ``[B, H]``: the *input* items, ``""`` elsewhere, most recent first);
    - ``query_text`` ``[B]``: the profile sentence and the titles of up to ``max_titles`` liked
      (rating >= ``liked_threshold``) *input* items, in the prepared format, so a typed title
      is never a target's;
    - ``seen`` string ``[B, H]``: every kept item, also those a ``max_items`` cap left out of
      ``history`` (known positives: the softmax must not treat them as negatives);
    - ``targets`` string ``[B, H]`` (the held-out item ids, ``""`` elsewhere) and
      ``target_ratings`` float32 ``[B, H]``.

    With ``teacher`` (an item-item matrix ``[N, N]`` in catalog-row order, :func:`ease_teacher`),
    also ``teacher`` float32 ``[B, N]``: the multi-hot row of each user's kept items (``seen``)
    times it, EASE's scores given what the query knows.

    Every trained item lands in the targets with probability ``target_fraction``, drawn afresh
    per (``seed``, batch index): a new split every step, the same one on a resume.

    A ``titles_only`` share of the users (drawn the same way) reads as a new user who only types
    a few liked titles: ``history`` and ``user_id`` blank, the profile and the typed titles in
    ``query_text`` kept (``seen`` and the targets unchanged). Otherwise the typed titles always
    come with the same items in ``history``, and the model learns to ignore them.
    """
    rows = trainable_users(users)
    order = np.random.default_rng(seed).permutation(np.tile(rows, passes))
    steps = user_batch_count(len(rows), batch_size, passes)
    tables = {
        name: tf.constant(users[name].astype(str))
        for name in ("user_id", "user_age", "user_gender", "user_occupation", "history")
    }
    ratings = tf.constant(users["history_ratings"].astype(np.float32))
    titles = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(catalog["item_id"].astype(str)),
            tf.constant(catalog["item_title"].astype(str)),
        ),
        default_value="",
    )

    teacher_scores = None if teacher is None else _teacher_scores(catalog["item_id"], teacher)

    def split(index: tf.Tensor, picked: tf.Tensor) -> dict:
        batch = {name: tf.gather(table, picked) for name, table in tables.items()}
        history, rating = batch.pop("history"), tf.gather(ratings, picked)
        present = history != ""
        draw = tf.random.stateless_uniform(
            tf.shape(history), seed=tf.stack([tf.constant(seed, tf.int64), index])
        )
        held_out = tf.logical_and(present, draw < target_fraction)
        kept = tf.logical_and(present, tf.logical_not(held_out))
        liked = tf.logical_and(kept, rating >= liked_threshold)
        named = tf.ragged.boolean_mask(titles.lookup(history), liked)[:, :max_titles]
        joined = tf.strings.reduce_join(named, axis=1, separator="; ")
        joined = tf.where(joined == "", NOTHING_LIKED, joined)
        profile = profile_texts(batch["user_age"], batch["user_gender"], batch["user_occupation"])
        inputs = tf.where(kept, history, "")
        if max_items and max_items < history.shape[1]:
            inputs = _random_subset(kept, draw, inputs, max_items)
        if titles_only > 0:
            new_user = (
                tf.random.stateless_uniform(
                    tf.shape(picked), seed=tf.stack([tf.constant(seed + 1, tf.int64), index])
                )
                < titles_only
            )
            inputs = tf.where(new_user[:, None], "", inputs)
            batch["user_id"] = tf.where(new_user, "", batch["user_id"])
        out = {
            **batch,
            "query_text": tf.strings.join([profile, " Liked: ", joined, "."]),
            "history": inputs,
            "seen": tf.where(kept, history, ""),
            "targets": tf.where(held_out, history, ""),
            "target_ratings": tf.where(held_out, rating, 0.0),
        }
        if teacher_scores is not None:
            out["teacher"] = teacher_scores(out["seen"])
        return out

    ds = tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=True)
    return ds.take(steps).enumerate().map(split, num_parallel_calls=tf.data.AUTOTUNE)


def ease_teacher(
    users: Mapping[str, np.ndarray], catalog: Mapping[str, np.ndarray], l2: float
) -> np.ndarray:
    """EASE's item-item weights ``[N, N]`` (float32, catalog-row order) fit on the users'
    train histories: the EASE baseline's own fit (every rated item counts)."""
    from trainer.baselines import EaseScorer

    history = np.asarray(users["history"])
    events = {
        "user_id": np.repeat(np.asarray(users["user_id"]), history.shape[1]),
        "item_id": history.ravel(),  # "" padding is no catalog item: ignored
    }
    return EaseScorer.fit(catalog, events, l2).weights
