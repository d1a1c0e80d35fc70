"""Baselines scored by the same harness as the model (:class:`trainer.evaluate.Scorer`).

* :class:`PopularityScorer`: every query gets the train popularity ranking.
* :class:`EaseScorer`: EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data",
  WWW 2019), the closed-form linear item-item model: ``B = argmin ||X - XB||² + λ||B||²``
  with ``diag(B) = 0``, scores ``x_u B`` for a user's binary row ``x_u``. New users (p4) fold
  in the same way: their fold-in row times the same ``B``.

Nothing here imports the evaluation harness, so ``trainer.evaluate`` can re-export these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

#: Query key naming a held-out (new) user in p4 queries, whose ``user_id`` is blanked to ``""``
#: for the model: baselines that keep their own record of the fold-in part look the user up
#: by it. The model never reads it.
HELDOUT_USER_KEY = "heldout_user_id"
#: The catalog items a query's typed titles name (``trainer.evaluate --queries typed_titles``):
#: a baseline that reads ids folds these in, as the two-tower reads the titles.
TYPED_ITEMS_KEY = "typed_item_ids"


def popularity_scores(popularity: np.ndarray, batch: int) -> np.ndarray:
    """``log1p`` train popularity ``[N]`` broadcast to ``[batch, N]`` (read-only view)."""
    return np.broadcast_to(np.log1p(popularity.astype(np.float32)), (batch, len(popularity)))


@dataclasses.dataclass
class PopularityScorer:
    """Most-popular baseline: every query gets the train popularity ranking."""

    popularity: np.ndarray  # [N]
    name: str = "popularity"

    def score(self, queries: dict[str, np.ndarray]) -> np.ndarray:
        return popularity_scores(self.popularity, len(next(iter(queries.values()))))

    def item_embeddings(self) -> np.ndarray | None:
        return None

    def predict_ratings(self, events: dict[str, np.ndarray]) -> np.ndarray | None:
        return None


# --------------------------------------------------------------------------- EASE


def _check_l2(l2: float) -> float:
    l2 = float(l2)
    if not np.isfinite(l2) or l2 <= 0:
        raise ValueError(f"EASE's L2 weight must be a positive number, got {l2}")
    return l2


def gram(x: np.ndarray) -> np.ndarray:
    """``XᵀX`` in float64 ``[N, N]`` of an interaction matrix ``x`` ``[U, N]`` (finite values)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"the interaction matrix must be 2-D [users, items], got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the interaction matrix has non-finite entries")
    return x.T @ x


def ease_from_gram(g: np.ndarray, l2: float) -> np.ndarray:
    """EASE weights ``B`` ``[N, N]`` (float64) from the Gram matrix ``g = XᵀX`` ``[N, N]``.

    ``P = (g + λI)⁻¹``; ``B_ij = -P_ij / P_jj`` (each column divided by its diagonal entry of
    ``P``) and ``B_jj = 0``. Kept apart from :func:`fit_ease` so a λ grid reuses one ``g``.
    """
    l2 = _check_l2(l2)
    g = np.array(g, dtype=np.float64, copy=True)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"the Gram matrix must be square [N, N], got {g.shape}")
    g[np.diag_indices_from(g)] += l2
    p = np.linalg.inv(g)  # g + λI is symmetric positive definite for λ > 0
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b


def fit_ease(x: np.ndarray, l2: float) -> np.ndarray:
    """EASE's closed form on an interaction matrix ``x`` ``[U, N]`` -> ``B`` ``[N, N]``."""
    return ease_from_gram(gram(x), l2)


def item_rows(events: Mapping[str, np.ndarray], index: Mapping[str, int]) -> dict[str, np.ndarray]:
    """User id -> sorted unique catalog rows of the user's items in ``events`` (every rating
    counts, whatever its value, as RecBole feeds EASE). Items not in ``index`` are ignored."""
    groups: dict[str, set[int]] = {}
    for user, item in zip(events["user_id"], events["item_id"], strict=True):
        if item in index:
            groups.setdefault(user, set()).add(index[item])
    return {u: np.array(sorted(rows), dtype=np.int64) for u, rows in groups.items()}


def binary_matrix(rows: Mapping[str, np.ndarray], num_items: int) -> np.ndarray:
    """``[len(rows), num_items]`` float64 0/1 matrix, one row per user of ``rows``."""
    x = np.zeros((len(rows), num_items), dtype=np.float64)
    for r, items in enumerate(rows.values()):
        x[r, items] = 1.0
    return x


@dataclasses.dataclass
class EaseScorer:
    """EASE as a :class:`trainer.evaluate.Scorer`: ``[B, N]`` scores in catalog order.

    A query's input row, first rule that gives items:

    1. the user's train items (``user_id`` with train events);
    2. the user's fold-in items (p4's new users; looked up by ``heldout_user_id`` when the
       query has it, else by ``user_id``);
    3. the items of its typed titles (``typed_item_ids``), then the item ids in its
       ``history`` (unknown ids and ``""`` padding ignored).

    An empty row (no known user, no known history) gets the popularity ranking: never an error.
    """

    weights: np.ndarray  # [N, N] B, float32
    popularity: np.ndarray  # [N] train popularity, the empty-row fallback
    index: dict[str, int]  # item id -> catalog row
    train_rows: dict[str, np.ndarray]  # user id -> catalog rows
    foldin_rows: dict[str, np.ndarray]
    l2: float
    name: str = "ease"
    config: dict = dataclasses.field(default_factory=dict)  # how λ was chosen, for the report

    @classmethod
    def fit(
        cls,
        catalog: Mapping[str, np.ndarray],
        train: Mapping[str, np.ndarray],
        l2: float,
        foldin: Mapping[str, np.ndarray] | None = None,
        g: np.ndarray | None = None,
    ) -> EaseScorer:
        """Fits ``B`` on the binary user x item matrix of ``train`` events.

        ``catalog``: ``item_id`` and ``popularity`` ``[N]``; ``train`` / ``foldin``: events
        with ``user_id`` and ``item_id`` ``[E]``; ``g``: a precomputed ``XᵀX`` of ``train``.
        """
        index = {item: i for i, item in enumerate(catalog["item_id"])}
        train_rows = item_rows(train, index)
        if g is None:
            g = gram(binary_matrix(train_rows, len(index)))
        if g.shape != (len(index), len(index)):
            raise ValueError(f"Gram matrix {g.shape} does not match {len(index)} catalog items")
        return cls(
            weights=ease_from_gram(g, l2).astype(np.float32),
            popularity=np.asarray(catalog["popularity"]),
            index=index,
            train_rows=train_rows,
            foldin_rows=item_rows(foldin, index) if foldin is not None else {},
            l2=float(l2),
            config={"l2": float(l2)},
        )

    def _row(self, queries: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        user = str(queries["user_id"][n]) if "user_id" in queries else ""
        if len(rows := self.train_rows.get(user, ())):
            return rows
        key = str(queries[HELDOUT_USER_KEY][n]) if HELDOUT_USER_KEY in queries else user
        if len(rows := self.foldin_rows.get(key, ())):
            return rows
        for field in (TYPED_ITEMS_KEY, "history"):
            given = queries[field][n] if field in queries else ()
            if known := {self.index[h] for h in given if h in self.index}:
                return np.array(sorted(known), dtype=np.int64)
        return np.zeros(0, dtype=np.int64)

    def input_rows(self, queries: Mapping[str, np.ndarray]) -> np.ndarray:
        """Binary input rows ``[B, N]`` float32 of a batch of queries (rules in the class doc)."""
        size = len(next(iter(queries.values())))
        x = np.zeros((size, len(self.index)), dtype=np.float32)
        for n in range(size):
            x[n, self._row(queries, n)] = 1.0
        return x

    def score(self, queries: dict[str, np.ndarray]) -> np.ndarray:
        x = self.input_rows(queries)
        scores = x @ self.weights
        empty = ~x.any(axis=1)
        if empty.any():
            scores[empty] = popularity_scores(self.popularity, int(empty.sum()))
        return scores

    def item_embeddings(self) -> np.ndarray | None:
        return None

    def predict_ratings(self, events: dict[str, np.ndarray]) -> np.ndarray | None:
        return None
