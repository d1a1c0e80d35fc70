"""The serving module: what TF Serving loads, its four signatures traced from the contract.

Every signature's inputs (names, order, dtypes, shapes) and outputs are those of
:data:`common.contract.SIGNATURES`; :class:`RecommenderModule` builds its traced functions from
that one definition. Every input has a leading batch dimension ``B`` (the same in one request),
so TF Serving's ``--enable_batching`` can merge requests (it refuses rank-0 inputs); every
input check runs before any op reads the checked values.

``serving_default`` (retrieve)
    the query features ``[B]`` and ``history`` ``[B, H]`` (item ids, most recent first, ``""``
    = padding, any ``H``); ``k`` int32 ``[B]`` (per query, 1..max_k); ``exclude_item_ids``
    string ``[B, E]`` (``E`` may be 0; unknown ids are ignored); ``diversity`` float32 ``[B]``
    (per query MMR λ in [0, 1], 0 = plain top-k) -> ``item_ids`` string ``[B, K]``, ``scores``
    float32 ``[B, K]``, ``titles`` string ``[B, K]`` with ``K = max(k)`` over the batch: row
    ``i`` holds its ``k[i]`` items, then padding (id ``""``, score ``-inf``). With server-side
    batching ``K`` is the largest ``k`` of the merged batch, so clients read the first ``k``
    columns of their rows. When exclusions leave fewer than ``k`` items in the index's
    candidate pool, the tail is padded the same way.
    With an item-item term (:mod:`trainer.item_item`) the index's pool is re-scored with it
    before exclusions and MMR: ``score + α σ(score) e / σ(e)``, ``e`` EASE's scores of the whole
    ``history`` (unknown ids ignored), so a request's history moves its scores twice, through
    the query tower and through the item-item weights.
``rank``
    the query inputs and ``candidate_item_ids`` string ``[B, M]`` -> ``ratings`` float32
    ``[B, M]`` from the ranking head. An unknown candidate id is an INVALID_ARGUMENT error.
``query_embedding``
    the query inputs -> ``embeddings`` float32 ``[B, D]`` (L2-normalised).
``candidate_embedding``
    the candidate features string ``[B]`` -> ``embeddings`` float32 ``[B, D]``. New,
    never-rated items are embedded from their text.

Every signature loads and runs through TF Serving's session-based loader as well as through
``tf.saved_model.load`` (:meth:`RecommenderModule.track_variables`; checked by
tests/test_export.py with :mod:`serving.session_runner`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TFRS)
from common import cli, contract
from trainer import item_item as item_item_lib
from trainer import ranking

#: Op namespaces of the module's graph beyond TensorFlow's own (``tf.saved_model.SaveOptions``).
SAVE_NAMESPACES = ["Scann", "TFText"]

#: The attribute of :class:`RecommenderModule` that serves each signature of the contract.
SIGNATURE_METHODS = {
    contract.RETRIEVE: "retrieve",
    contract.RANK: "rank",
    contract.QUERY_EMBEDDING: "query_embedding",
    contract.CANDIDATE_EMBEDDING: "candidate_embedding",
}

#: The input whose batch size every other input of a query signature must match.
_QUERY_BATCH = "query_text"
_QUERY_KEYS = (*contract.QUERY_FEATURES, contract.HISTORY)

Features = dict[str, tf.Tensor]


class ExportError(cli.UsageError):
    """The export cannot be written as asked."""


@dataclasses.dataclass
class IndexConfig:
    """Nearest-neighbour index; ScaNN parameters default to values derived from the catalog."""

    kind: str = "scann"  # "scann" or "brute_force"
    max_k: int = 100
    pool: int = 0  # candidates fetched before exclusions and MMR; 0 = 2 * max_k
    num_leaves: int = 0  # 0 = about sqrt(N)
    num_leaves_to_search: int = 0  # 0 = about num_leaves / 16 (at least 8)
    num_reordering_candidates: int = 0  # 0 = max(4 * pool, 256)
    min_recall: float = 0.95
    recall_queries: int = 500
    # When num_leaves_to_search was derived (not given): double it until the recall check
    # passes, or halve it while it still would (trainer.export.tuned_index), instead of failing
    # or searching more than it needs. How spread the trained embeddings are decides the count.
    auto_tune: bool = True

    def resolved(self, num_items: int) -> IndexConfig:
        if self.kind not in ("scann", "brute_force"):
            raise ExportError(f"--index must be scann or brute_force, got {self.kind!r}")
        if self.max_k < 1:
            raise ExportError(f"--max-k must be at least 1, got {self.max_k}")
        if not 0.0 <= self.min_recall <= 1.0:
            raise ExportError(f"--min-recall must be in [0, 1], got {self.min_recall}")
        max_k = min(self.max_k, num_items)
        pool = min(self.pool or 2 * max_k, num_items)
        leaves = self.num_leaves or max(1, min(num_items // 2, round(math.sqrt(num_items))))
        search = self.num_leaves_to_search or max(min(leaves, 8), math.ceil(leaves / 16))
        reorder = self.num_reordering_candidates or min(num_items, max(4 * pool, 256))
        if pool < max_k:
            raise ExportError(f"--pool ({pool}) must be at least max_k ({max_k})")
        return dataclasses.replace(
            self,
            max_k=max_k,
            pool=pool,
            num_leaves=leaves,
            num_leaves_to_search=min(search, leaves),
            num_reordering_candidates=max(reorder, pool),
            auto_tune=self.auto_tune and not self.num_leaves_to_search,
        )


def input_specs(signature: contract.Signature) -> list[tf.TensorSpec]:
    """One ``tf.TensorSpec`` per input of ``signature``, in the contract's order."""
    return [tf.TensorSpec(t.shape, tf.dtypes.as_dtype(t.dtype)) for t in signature.inputs.values()]


def signature_function(name: str, body: Callable[[Features], Features]):
    """A ``tf.function`` taking the inputs of ``contract.SIGNATURES[name]``, by name or position.

    Args:
      name: a signature of the contract.
      body: ``{input name: tensor} -> {output name: tensor}``; its outputs must be the
        contract's (checked when traced).

    Returns:
      The ``tf.function`` (input signature fixed), whose arguments are the contract's input
      names in order: the saved SignatureDef's input keys.
    """
    signature = contract.SIGNATURES[name]
    names = tuple(signature.inputs)

    def serve(*tensors: tf.Tensor) -> Features:
        outputs = body(dict(zip(names, tensors, strict=True)))
        if set(outputs) != set(signature.outputs):
            raise ValueError(f"{name} returns {sorted(outputs)}, not {sorted(signature.outputs)}")
        return outputs

    # tf.function reads the argument names of the signature from here (as from a def).
    serve.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    serve.__name__ = SIGNATURE_METHODS[name]
    return tf.function(serve, input_signature=input_specs(signature))


class RecommenderModule(tf.Module):
    """What TF Serving loads: query tower, candidate tower, ranking head, index and catalog.

    Args:
      query_model: raw query features (``contract.QUERY_FEATURES`` ``[B]`` + ``history``
        ``[B, H]``) -> L2-normalised embeddings ``[B, D]``, tokenization in its graph.
      candidate_model: raw candidate features ``[B]`` -> embeddings ``[B, D]``.
      rating_fn: ``(query [B, D], candidates [B, M, D], user_ids [B], item_ids [B, M]) ->
        ratings [B, M]`` (ids as raw strings).
      catalog: the catalog table (``item_id``, ``item_title`` and the other candidate fields).
      item_embeddings: ``[N, D]`` embeddings of the catalog, in catalog order.
      index: the resolved index settings (:meth:`IndexConfig.resolved`).
      history_length: ``H`` the query tower was trained with; requests may send any ``H``.
      similarity_dim: how many leading columns of the embeddings MMR's item-item similarity
        compares (the unit vector without a popularity-prior column); None: all of them.
      item_item: the item-item term of the served score (:mod:`trainer.item_item`): EASE's
        ``B`` ``[N, N]`` in catalog order and its weight ``α`` (> 0); None: scores are the
        index's inner products alone.
    """

    def __init__(
        self,
        query_model: Callable[[Features], tf.Tensor],
        candidate_model: Callable[[Features], tf.Tensor],
        rating_fn: Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor],
        catalog: dict[str, np.ndarray],
        item_embeddings: np.ndarray,
        index: IndexConfig,
        history_length: int,
        similarity_dim: int | None = None,
        item_item: tuple[np.ndarray, float] | None = None,
    ):
        super().__init__()
        self.similarity_dim = similarity_dim
        self.query_model = query_model
        self.candidate_model = candidate_model
        self.rating_fn = rating_fn
        self.history_length = history_length
        self.index_config = index
        ids = [str(i) for i in catalog["item_id"]]
        self.item_ids = tf.Variable(ids, trainable=False, name="item_ids")
        self.titles = tf.Variable(
            [str(t) for t in catalog["item_title"]], trainable=False, name="item_titles"
        )
        self.embeddings = tf.Variable(
            item_embeddings.astype(np.float32), trainable=False, name="item_embeddings"
        )
        self.id_to_index = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(ids), tf.range(len(ids), dtype=tf.int64)
            ),
            default_value=-1,
        )
        self.item_item = None
        if item_item is not None:
            weights, alpha = item_item
            self.item_item = tf.Variable(
                weights.astype(np.float32), trainable=False, name="item_item"
            )
            self.item_item_weight = tf.Variable(
                float(alpha), trainable=False, name="item_item_weight"
            )
            # σ of a query's scores over the catalog without scoring it: sqrt(qᵀ C q).
            self.score_covariance = tf.Variable(
                item_item_lib.covariance(item_embeddings), trainable=False, name="score_covariance"
            )
        self.scann = None
        if index.kind == "scann":
            self.build_index(index)
        self.retrieve = signature_function(contract.RETRIEVE, self._serve_retrieve)
        self.rank = signature_function(contract.RANK, self._serve_rank)
        self.query_embedding = signature_function(
            contract.QUERY_EMBEDDING, self._serve_query_embedding
        )
        self.candidate_embedding = signature_function(
            contract.CANDIDATE_EMBEDDING, self._serve_candidate_embedding
        )

    def build_index(self, index: IndexConfig) -> None:
        """(Re)builds the ScaNN index over the catalog embeddings with ``index``'s parameters.

        Call it before the signatures are traced: a traced signature keeps the index it saw.
        """
        import tensorflow_recommenders as tfrs

        self.index_config = index
        self.scann = tfrs.layers.factorized_top_k.ScaNN(
            k=index.pool,
            num_leaves=index.num_leaves,
            num_leaves_to_search=index.num_leaves_to_search,
            num_reordering_candidates=index.num_reordering_candidates,
            parallelize_batch_searches=True,
        )
        count = int(self.embeddings.shape[0])
        self.scann.index(self.embeddings.read_value(), tf.range(count, dtype=tf.int32))

    # ------------------------------------------------------------------ graph pieces

    @staticmethod
    def _guarded(checks: list[tf.Operation], tensors: Features) -> Features:
        """Copies of ``tensors`` that exist only after every check passed.

        Everything downstream reads the copies, so no op can consume an input before the
        checks on it ran (without this, graph execution order is free and e.g. a gather on an
        unchecked index could fail first with a raw message, or on a GPU return zeros).
        """
        with tf.control_dependencies(checks):
            return {name: tf.identity(value) for name, value in tensors.items()}

    @staticmethod
    def _batch_checks(inputs: Features, reference: str, empty: str) -> list[tf.Operation]:
        """A non-empty batch, and every input as long (axis 0) as ``inputs[reference]``."""
        batch = tf.shape(inputs[reference])[0]
        checks = [tf.debugging.assert_greater(batch, 0, message=empty)]
        for name, value in inputs.items():
            if name != reference:
                checks.append(
                    tf.debugging.assert_equal(
                        tf.shape(value)[0],
                        batch,
                        message=f"input {name} must have the same batch size as {reference}",
                    )
                )
        return checks

    def _query_checks(self, inputs: Features) -> list[tf.Operation]:
        return self._batch_checks(inputs, _QUERY_BATCH, "empty batch: send at least one query")

    def _query(self, checked: Features) -> tf.Tensor:
        """Query embeddings ``[B, D]`` of already checked (guarded) inputs."""
        features = {name: checked[name] for name in _QUERY_KEYS}
        # Any history length is accepted: pad or cut to what the tower was trained with.
        history = features[contract.HISTORY][:, : self.history_length]
        pad = self.history_length - tf.shape(history)[1]
        history = tf.pad(history, [[0, 0], [0, pad]], constant_values="")
        history = tf.reshape(history, [-1, self.history_length])
        return tf.cast(self.query_model({**features, contract.HISTORY: history}), tf.float32)

    def candidate_pool(self, queries: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Top-``pool`` of the index for queries ``[B, D]``: scores and catalog rows ``[B, P]``."""
        if self.scann is not None:
            scores, indices = self.scann(queries, k=self.index_config.pool)
            # ScaNN's op loses static shapes; give them back for the loops downstream.
            pool = self.index_config.pool
            return tf.reshape(scores, [-1, pool]), tf.reshape(
                tf.cast(indices, tf.int64), [-1, pool]
            )
        scores = tf.matmul(queries, self.embeddings, transpose_b=True)
        top = tf.math.top_k(scores, k=self.index_config.pool)
        return top.values, tf.cast(top.indices, tf.int64)

    def _with_item_item(
        self, queries: tf.Tensor, history: tf.Tensor, scores: tf.Tensor, indices: tf.Tensor
    ) -> tf.Tensor:
        """The pool's served scores ``[B, P]``: the index's inner products ``scores`` of the
        catalog rows ``indices`` plus the item-item term of the whole ``history`` ``[B, H]``
        (:func:`trainer.item_item.blend_terms`; unknown ids and padding ignored)."""
        item_item = item_item_lib.ease_scores_tf(self.id_to_index.lookup(history), self.item_item)
        return item_item_lib.blend_terms(
            scores,
            item_item_lib.score_std_from_covariance(queries, self.score_covariance),
            tf.gather(item_item, indices, batch_dims=1),
            tf.math.reduce_std(item_item, axis=1, keepdims=True),
            self.item_item_weight,
            where=tf.where,
        )

    # ------------------------------------------------------------------ signatures

    def _serve_retrieve(self, inputs: Features) -> Features:
        max_k = self.index_config.max_k
        k, diversity = inputs[contract.K], inputs[contract.DIVERSITY]
        checks = self._query_checks(inputs) + [
            tf.debugging.assert_greater_equal(k, 1, message="k must be at least 1"),
            tf.debugging.assert_less_equal(k, max_k, message=f"k must be at most {max_k}"),
            tf.debugging.assert_greater_equal(diversity, 0.0, message="diversity must be >= 0"),
            tf.debugging.assert_less_equal(diversity, 1.0, message="diversity must be <= 1"),
        ]
        checked = self._guarded(checks, inputs)
        k, exclude_item_ids, diversity = (
            checked[contract.K], checked[contract.EXCLUDE_ITEM_IDS], checked[contract.DIVERSITY]
        )  # fmt: skip
        queries = self._query(checked)
        scores, indices = self.candidate_pool(queries)
        if self.item_item is not None:
            scores = self._with_item_item(queries, checked[contract.HISTORY], scores, indices)
        excluded = self.id_to_index.lookup(exclude_item_ids)  # [B, E], -1 for unknown ids
        hit = tf.reduce_any(indices[:, :, None] == excluded[:, None, :], axis=-1)
        scores = tf.where(hit, tf.constant(-np.inf, tf.float32), scores)
        order = tf.argsort(scores, axis=1, direction="DESCENDING", stable=True)
        scores = tf.gather(scores, order, batch_dims=1)
        indices = tf.gather(indices, order, batch_dims=1)
        valid = tf.math.is_finite(scores)
        # MMR over the pool, each query with its own λ; excluded or missing entries carry -inf
        # and are picked last. The output is as wide as the batch's largest k.
        width = tf.reduce_max(k)
        candidates = tf.maximum(indices, 0)

        def diverse() -> tf.Tensor:
            unit = self.embeddings[:, : self.similarity_dim]
            return ranking.mmr_rerank_tf(candidates, scores, unit, max_k, diversity[:, None])

        # MMR at λ = 0 picks the stably sorted pool in order (-inf last, ties to the earlier
        # position); a batch that asks no diversity skips its max_k-step loop (several ms).
        picked = tf.cond(tf.reduce_any(diversity > 0.0), diverse, lambda: candidates[:, :max_k])[
            :, :width
        ]
        position = tf.argmax(
            tf.cast(picked[:, :, None] == indices[:, None, :], tf.int32),
            axis=-1,
            output_type=tf.int32,
        )
        top_scores = tf.gather(scores, position, batch_dims=1)
        within_k = tf.range(width)[None, :] < k[:, None]
        ok = tf.gather(valid, position, batch_dims=1) & within_k
        safe = tf.maximum(picked, 0)
        return {
            "item_ids": tf.where(ok, tf.gather(self.item_ids, safe), ""),
            "scores": tf.where(ok, top_scores, tf.constant(-np.inf, tf.float32)),
            "titles": tf.where(ok, tf.gather(self.titles, safe), ""),
        }

    def _serve_rank(self, inputs: Features) -> Features:
        indices = self.id_to_index.lookup(inputs[contract.CANDIDATE_ITEM_IDS])
        checks = self._query_checks(inputs) + [
            tf.debugging.assert_non_negative(
                indices,
                message="rank: candidate_item_ids contains an id that is not in the catalog",
            ),
        ]
        checked = self._guarded(checks, {**inputs, "indices": indices})
        queries = self._query(checked)
        candidates = tf.gather(self.embeddings, checked["indices"])
        ratings = self.rating_fn(
            queries, candidates, checked["user_id"], checked[contract.CANDIDATE_ITEM_IDS]
        )
        return {"ratings": tf.cast(ratings, tf.float32)}

    def _serve_query_embedding(self, inputs: Features) -> Features:
        return {"embeddings": self._query(self._guarded(self._query_checks(inputs), inputs))}

    def _serve_candidate_embedding(self, inputs: Features) -> Features:
        checks = self._batch_checks(inputs, contract.CANDIDATE_FEATURES[0], "empty batch")
        checked = self._guarded(checks, inputs)
        return {"embeddings": tf.cast(self.candidate_model(checked), tf.float32)}

    def track_variables(self) -> None:
        """Tracks every variable the signatures read as a plain attribute of the module.

        The one place that makes the export loadable by TF Serving: Keras 3 variables held
        (through the towers) by a bare ``tf.Module`` are restored by ``tf.saved_model.load``
        but not by the session-based loader TF Serving uses (``Could not find variable``);
        listing the underlying ``tf.Variable`` of each one on the module puts it in the
        MetaGraph's saver. The traced signatures know exactly which variables they read, so
        nothing has to be enumerated by hand.
        """
        seen: dict[int, tf.Variable] = {}
        for fn in self.signatures().values():
            for variable in fn.variables:
                seen.setdefault(id(variable), variable)
        self.serving_variables = list(seen.values())

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        """The concrete function of every signature of the contract, by signature name."""
        return {
            name: getattr(self, method).get_concrete_function()
            for name, method in SIGNATURE_METHODS.items()
        }
