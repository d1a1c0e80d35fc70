"""A trained model applied to tables of raw features: embeddings, ratings, catalog scores.

* :func:`embed`: a table of raw query or candidate features -> L2-normalised ``[N, D]``, in
  batches, text the caches do not hold through the live encoder.
* :func:`predict_ratings`: the ranking head over embedded (user, item) pairs.
* :class:`ModelScorer`: the :class:`trainer.evaluate.Scorer` of a trained model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from common import contract
from trainer import item_item
from trainer.model import TwoTowerModel
from trainer.model_dir import load_trained

#: The raw id features of a (user, item) pair, in the ranking head's order.
KEYS_OF_PAIR = ("user_id", "item_id")
_QUERY_KEYS = (*contract.QUERY_FEATURES, contract.HISTORY)


class ModelScorer:
    """The :class:`trainer.evaluate.Scorer` of a trained model: scores the whole catalog.

    Texts not in the model's caches (new items or profiles) go through the live encoder.
    """

    def __init__(
        self, model: TwoTowerModel, catalog: Mapping[str, np.ndarray], name: str = "model"
    ):
        self.model = model
        self.name = name
        self.catalog = catalog
        self._items = embed(model, "candidate", dict(catalog))
        # B in this catalog's order, built on the first score that weighs the term in (an
        # export or an α = 0 model never needs the [N, N] copy).
        self._item_item: tuple[dict[str, int], np.ndarray] | None = None

    @classmethod
    def from_model_dir(cls, model_dir: str, catalog: Mapping[str, np.ndarray]) -> ModelScorer:
        model, _ = load_trained(model_dir)
        return cls(model, catalog, name=os.path.basename(model_dir.rstrip("/")) or "model")

    def score(self, queries: dict[str, np.ndarray]) -> np.ndarray:
        """Raw query features (``[Q]``, ``history`` ``[Q, H]``) -> catalog scores ``[Q, N]``:
        the served score, the item-item term included (:mod:`trainer.item_item`)."""
        scores = embed(self.model, "query", queries) @ self._items.T
        weight = self.model.item_item_weight
        if weight is None or not float(weight) or contract.HISTORY not in queries:
            return scores  # no term, or no history to read it from (as an empty one)
        if self._item_item is None:
            self._item_item = item_item.served_weights(
                self.model, self.catalog["item_id"], self.item_embeddings()
            )
        e = item_item.ease_scores(queries[contract.HISTORY], *self._item_item)
        return item_item.blend_full(scores, e, float(weight))

    def item_embeddings(self) -> np.ndarray:
        """The catalog's unit candidate vectors ``[N, D]``, in catalog order: what item-item
        similarity (diversity, MMR) compares, without the popularity-prior column."""
        return self._items[:, : self.model.model_config.embedding_dim]

    def retrieval_vectors(self) -> np.ndarray:
        """The catalog's candidate embeddings as the index holds them, ``[N, model.retrieval_dim]``
        (a query's scores are its embedding's inner products with these)."""
        return self._items

    def predict_ratings(self, events: dict[str, np.ndarray]) -> np.ndarray:
        """Rated events (query and candidate features ``[E]``) -> predicted ratings ``[E]``."""
        out = []
        for start in range(0, len(events["item_id"]), 1024):
            chunk = {k: v[start : start + 1024] for k, v in events.items()}
            q = embed(self.model, "query", chunk)
            c = embed(self.model, "candidate", chunk)
            out.append(predict_ratings(self.model, q, c, chunk))
        return np.concatenate(out) if out else np.zeros([0], np.float32)


def predict_ratings(
    model: TwoTowerModel, query: np.ndarray, candidate: np.ndarray, events: Mapping
) -> np.ndarray:
    """Ranking head over embedded events (``[N, D]`` each, ``events`` with their raw
    ``user_id`` and ``item_id``) -> ``[N]``."""
    user_ids, item_ids = (tf.constant(np.asarray(events[k]).astype(str)) for k in KEYS_OF_PAIR)
    rating = model.predict_rating(tf.constant(query), tf.constant(candidate), user_ids, item_ids)
    return np.asarray(rating)


def embed(
    model: TwoTowerModel, side: str, table: Mapping[str, np.ndarray], batch: int = 1024
) -> np.ndarray:
    """Embeds a table of raw features in batches (live text: cache hits, BERT for misses).

    ``side``: ``"query"`` (the query features ``[N]`` and ``history`` ``[N, H]``) or
    ``"candidate"`` (the candidate features ``[N]``); other columns are ignored.
    Returns float32 ``[N, model.retrieval_dim]``: the L2-normalised ``[N, D]``, and with
    ``popularity_prior`` one more column (:meth:`TwoTowerModel.with_prior_columns`).
    """
    keys = _QUERY_KEYS if side == "query" else contract.CANDIDATE_FEATURES
    size = len(table[keys[0]])
    out = []
    for start in range(0, size, batch):
        features = {
            k: tf.constant(np.asarray(table[k][start : start + batch]).astype(str)) for k in keys
        }
        mode = model.text_mode
        if mode == "cached":  # live reads the caches too, and sends only their misses to BERT
            model.set_text_mode("live")
        try:
            fn = model.query_embeddings if side == "query" else model.candidate_embeddings
            out.append(np.asarray(fn(features)))
        finally:
            model.text_mode = mode
    return np.concatenate(out) if out else np.zeros([0, model.retrieval_dim], np.float32)
