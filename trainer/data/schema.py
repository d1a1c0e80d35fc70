"""The on-disk schema shared by data preparation, training, evaluation and export.

A prepared data directory looks like::

    DIR/
      manifest.json                  # seed, counts, content hashes, history_length, splits
      p1/ p2/ p3/ p4/                # one folder per evaluation protocol
        train-00000-of-0000N.tfrecord
        valid-00000-of-0000N.tfrecord   # p2, p3 and p4
        test-00000-of-0000N.tfrecord
        foldin-00000-of-00001.tfrecord  # p4 only: the held-out (new) users' fold-in ratings
        catalog.tfrecord             # every item: text and popularity in this split's train part
        users.tfrecord               # every user: profile and history from this split's train part

Every record is a ``tf.train.Example``. An *event* (one rating) carries the query features, the
candidate features and the label. Query features are always built from the same split's
*training* ratings made strictly before the event, so no record ever sees its own movie or the
future, and no evaluation query sees a held-out rating.

In ``p4`` (new users) the valid and test users have no train ratings at all: each has a
``foldin`` part (the ratings a new user would send in the query) and ``valid`` or ``test``
targets; the manifest's split entry lists them under ``heldout_users``.
"""

from __future__ import annotations

import tensorflow as tf

# Query-side features (what a serving request carries) and candidate-side ones (what the
# catalog carries): the serving contract's, one definition.
from common.contract import CANDIDATE_FEATURES as CANDIDATE_STRING_FEATURES
from common.contract import QUERY_FEATURES as QUERY_STRING_FEATURES

#: History item ids stored per *event* query (p1: every earlier train rating of the user, most
#: recent first, padded with ""). Events of the per-user protocols (p2, p3, p4) store none: their
#: training query is the user's whole history with the target left out, built by the loop.
HISTORY_LENGTH = 50
#: History item ids stored per *user* (every train rating, or p4's fold-in ratings, most recent
#: first): the whole-history query of the per-user protocols. Longer histories are cut.
USER_HISTORY_LENGTH = 256
#: Ratings at or above this count as "liked": their titles go into the query text.
LIKED_THRESHOLD = 4.0
#: Titles of liked movies written into the query text (most recent first).
QUERY_TITLES = 10

PROTOCOLS = ("p1", "p2", "p3", "p4")
PARTS = {
    "p1": ("train", "test"),
    "p2": ("train", "valid", "test"),
    "p3": ("train", "valid", "test"),
    "p4": ("train", "valid", "test", "foldin"),
}


def query_feature_spec(history_length: int = HISTORY_LENGTH) -> dict[str, tf.io.FixedLenFeature]:
    """Parsing spec of the query features.

    Shapes once parsed (unbatched): every string feature ``[]``; ``history`` ``[history_length]``
    item ids, most recent first, padded with ``""``.
    """
    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in QUERY_STRING_FEATURES}
    # A record without a history (p2-p4 events) parses to all padding.
    spec["history"] = tf.io.FixedLenFeature(
        [history_length], tf.string, default_value=[""] * history_length
    )
    return spec


def candidate_feature_spec() -> dict[str, tf.io.FixedLenFeature]:
    """Parsing spec of the candidate features; every feature parses to a scalar string ``[]``.

    ``item_genres`` is the genres joined with ``"|"``; ``item_text`` is title, year and genres.
    """
    return {name: tf.io.FixedLenFeature([], tf.string) for name in CANDIDATE_STRING_FEATURES}


def event_feature_spec(history_length: int = HISTORY_LENGTH) -> dict[str, tf.io.FixedLenFeature]:
    """Parsing spec of one rating event: query + candidate features + label.

    Extra fields: ``rating`` float32 ``[]`` (1..5), ``timestamp`` int64 ``[]`` (Unix seconds).
    """
    spec = {**query_feature_spec(history_length), **candidate_feature_spec()}
    spec["rating"] = tf.io.FixedLenFeature([], tf.float32)
    spec["timestamp"] = tf.io.FixedLenFeature([], tf.int64)
    return spec


def catalog_feature_spec() -> dict[str, tf.io.FixedLenFeature]:
    """Parsing spec of one catalog item.

    Extra fields: ``popularity`` int64 ``[]`` (ratings of the item in the split's train part) and
    ``is_cold`` int64 ``[]`` (1 when the item was held out of training, protocol p3).
    """
    spec = candidate_feature_spec()
    spec["popularity"] = tf.io.FixedLenFeature([], tf.int64)
    spec["is_cold"] = tf.io.FixedLenFeature([], tf.int64)
    return spec


def user_feature_spec(
    history_length: int = USER_HISTORY_LENGTH,
) -> dict[str, tf.io.FixedLenFeature]:
    """Parsing spec of one user: the query features built from the user's whole train history.

    Extra fields: ``num_train`` int64 ``[]``, the user's ratings in the train part;
    ``history_ratings`` float32 ``[history_length]``, the rating of each ``history`` item (0 =
    padding, or a data dir prepared before ratings were kept: the loop then refuses user batches).
    """
    spec = query_feature_spec(history_length)
    spec["num_train"] = tf.io.FixedLenFeature([], tf.int64)
    spec["history_ratings"] = tf.io.FixedLenFeature(
        [history_length], tf.float32, default_value=[0.0] * history_length
    )
    return spec
