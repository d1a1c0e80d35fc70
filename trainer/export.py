"""Export: a TF Serving SavedModel with in-graph tokenization, the query tower and an index.

``python -m trainer.export --model-dir DIR --export-base DIR --model-name NAME
[--index scann|brute_force] [--version N]``

The export is written to ``<export-base>/<model-name>/.tmp-<version>-<random>`` and renamed to
``<export-base>/<model-name>/<version>`` when complete (TF Serving ignores folders whose name is
not a number, so it never sees a partial version). An existing version is never overwritten.

Signatures. Every input has a leading batch dimension ``B`` (the same in one request), so TF
Serving's ``--enable_batching`` can merge requests (it refuses rank-0 inputs); every input check
runs before any op reads the checked values.

``serving_default`` (retrieve)
    inputs: ``user_id, user_age, user_gender, user_occupation, query_text`` string ``[B]``;
    ``history`` string ``[B, H]`` (item ids, most recent first, ``""`` = padding, any ``H``);
    ``k`` int32 ``[B]`` (per query, 1..max_k); ``exclude_item_ids`` string ``[B, E]`` (``E`` may
    be 0; unknown ids are ignored); ``diversity`` float32 ``[B]`` (per query MMR λ in [0, 1],
    0 = plain top-k).
    outputs: ``item_ids`` string ``[B, K]``, ``scores`` float32 ``[B, K]``, ``titles`` string
    ``[B, K]`` with ``K = max(k)`` over the batch: row ``i`` holds its ``k[i]`` items, then
    padding (id ``""``, score ``-inf``). With server-side batching ``K`` is the largest ``k`` of
    the merged batch, so clients read the first ``k`` columns of their rows. When exclusions
    leave fewer than ``k`` items in the index's candidate pool, the tail is padded the same way.
``rank``
    the query inputs and ``candidate_item_ids`` string ``[B, M]``; output ``ratings`` float32
    ``[B, M]`` from the ranking head. An unknown candidate id is an INVALID_ARGUMENT error.
``query_embedding``
    the query inputs; output ``embeddings`` float32 ``[B, D]`` (L2-normalised).
``candidate_embedding``
    ``item_id, item_title, item_year, item_genres, item_text`` string ``[B]``; output
    ``embeddings`` float32 ``[B, D]``. New, never-rated items are embedded from their text.

Known texts skip BERT. Every text the model has encoded (catalog item texts, profile
sentences, the titles a query text may name) is looked up in an in-graph table; a batch sends
only its misses through the tokenizer and BERT (packed to its longest text) and merges them
back in order, so a frozen BERT's export answers exactly as running BERT on every text would,
and a fine-tuned one's tables are recomputed with its final weights at export. The set
encoder's per-catalog-row tables are stored filled, and a batch without diversity skips MMR.

Every signature loads and runs through TF Serving's session-based loader as well as through
``tf.saved_model.load`` (:meth:`RecommenderModule.track_variables`; checked by
tests/test_export.py with :mod:`serving.session_runner`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TFRS)
from trainer import metrics
from trainer.data import schema
from trainer.data.movielens import DataError

SAVE_NAMESPACES = ["Scann", "TFText"]
RECALL_FILE = "recall_check.json"
WARMUP_FILE = "tf_serving_warmup_requests"
QUERY_INPUTS = ("user_id", "user_age", "user_gender", "user_occupation", "query_text")


class ExportError(ValueError):
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
    # passes, instead of failing. How spread the trained embeddings are decides what is enough.
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


def _string_spec(*shape: int | None) -> tf.TensorSpec:
    return tf.TensorSpec(list(shape), tf.string)


class RecommenderModule(tf.Module):
    """What TF Serving loads: query tower, candidate tower, ranking head, index and catalog.

    Args:
      query_model: raw query features (``QUERY_INPUTS`` ``[B]`` + ``history`` ``[B, H]``) ->
        L2-normalised embeddings ``[B, D]``, tokenization in its graph.
      candidate_model: raw candidate features ``[B]`` -> embeddings ``[B, D]``.
      rating_fn: ``(query [B, D], candidates [B, M, D], user_ids [B], item_ids [B, M]) ->
        ratings [B, M]`` (ids as raw strings).
      catalog: the catalog table (``item_id``, ``item_title`` and the other candidate fields).
      item_embeddings: ``[N, D]`` embeddings of the catalog, in catalog order.
    """

    def __init__(
        self,
        query_model: Callable[[dict[str, tf.Tensor]], tf.Tensor],
        candidate_model: Callable[[dict[str, tf.Tensor]], tf.Tensor],
        rating_fn: Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor],
        catalog: dict[str, np.ndarray],
        item_embeddings: np.ndarray,
        index: IndexConfig,
        history_length: int,
    ):
        super().__init__()
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
        self.scann = None
        if index.kind == "scann":
            self.build_index(index)

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
    def _guarded(checks: list[tf.Operation], tensors: dict[str, tf.Tensor]) -> dict:
        """Copies of ``tensors`` that exist only after every check passed.

        Everything downstream reads the copies, so no op can consume an input before the
        checks on it ran (without this, graph execution order is free and e.g. a gather on an
        unchecked index could fail first with a raw message, or on a GPU return zeros).
        """
        with tf.control_dependencies(checks):
            return {name: tf.identity(value) for name, value in tensors.items()}

    def _query_checks(self, features: dict[str, tf.Tensor]) -> list[tf.Operation]:
        batch = tf.shape(features["query_text"])[0]
        checks = [
            tf.debugging.assert_greater(batch, 0, message="empty batch: send at least one query")
        ]
        for name in (*QUERY_INPUTS[:-1], "history"):
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(features[name])[0],
                    batch,
                    message=f"input {name} must have the same batch size as query_text",
                )
            )
        return checks

    def _query(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        """Query embeddings of already checked (guarded) features."""
        # Any history length is accepted: pad or cut to what the tower was trained with.
        history = features["history"][:, : self.history_length]
        pad = self.history_length - tf.shape(history)[1]
        history = tf.pad(history, [[0, 0], [0, pad]], constant_values="")
        history = tf.reshape(history, [-1, self.history_length])
        return tf.cast(self.query_model({**features, "history": history}), tf.float32)

    def _pool(self, queries: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Top-``pool`` candidates of the index: scores ``[B, P]``, catalog indices ``[B, P]``."""
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

    def _retrieve(self, features, k, exclude_item_ids, diversity):
        max_k = self.index_config.max_k
        batch = tf.shape(features["query_text"])[0]
        checks = self._query_checks(features)
        for name, value in (("k", k), ("exclude_item_ids", exclude_item_ids),
                            ("diversity", diversity)):  # fmt: skip
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(value)[0],
                    batch,
                    message=f"input {name} must have the same batch size as query_text",
                )
            )
        checks += [
            tf.debugging.assert_greater_equal(k, 1, message="k must be at least 1"),
            tf.debugging.assert_less_equal(k, max_k, message=f"k must be at most {max_k}"),
            tf.debugging.assert_greater_equal(diversity, 0.0, message="diversity must be >= 0"),
            tf.debugging.assert_less_equal(diversity, 1.0, message="diversity must be <= 1"),
        ]
        checked = self._guarded(
            checks,
            {**features, "k": k, "exclude_item_ids": exclude_item_ids, "diversity": diversity},
        )
        k, exclude_item_ids, diversity = (
            checked.pop("k"), checked.pop("exclude_item_ids"), checked.pop("diversity")
        )  # fmt: skip
        scores, indices = self._pool(self._query(checked))
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
            return metrics.mmr_rerank_tf(
                candidates, scores, self.embeddings, max_k, diversity[:, None]
            )

        # MMR at λ = 0 picks the stably sorted pool in order (-inf last, ties to the earlier
        # position); a batch that asks no diversity skips its max_k-step loop (several ms).
        picked = tf.cond(
            tf.reduce_any(diversity > 0.0), diverse, lambda: candidates[:, :max_k]
        )[:, :width]
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

    @staticmethod
    def _features(user_id, user_age, user_gender, user_occupation, query_text, history):
        return dict(
            zip(
                QUERY_INPUTS,
                (user_id, user_age, user_gender, user_occupation, query_text),
                strict=True,
            ),
            history=history,
        )

    # ------------------------------------------------------------------ signatures

    @tf.function(
        input_signature=[
            *[_string_spec(None) for _ in QUERY_INPUTS],
            _string_spec(None, None),
            tf.TensorSpec([None], tf.int32),
            _string_spec(None, None),
            tf.TensorSpec([None], tf.float32),
        ]
    )
    def retrieve(
        self,
        user_id,
        user_age,
        user_gender,
        user_occupation,
        query_text,
        history,
        k,
        exclude_item_ids,
        diversity,
    ):
        features = self._features(
            user_id, user_age, user_gender, user_occupation, query_text, history
        )
        return self._retrieve(features, k, exclude_item_ids, diversity)

    @tf.function(
        input_signature=[
            *[_string_spec(None) for _ in QUERY_INPUTS],
            _string_spec(None, None),
            _string_spec(None, None),
        ]
    )
    def rank(
        self,
        user_id,
        user_age,
        user_gender,
        user_occupation,
        query_text,
        history,
        candidate_item_ids,
    ):
        features = self._features(
            user_id, user_age, user_gender, user_occupation, query_text, history
        )
        indices = self.id_to_index.lookup(candidate_item_ids)
        checks = self._query_checks(features) + [
            tf.debugging.assert_equal(
                tf.shape(candidate_item_ids)[0],
                tf.shape(query_text)[0],
                message="input candidate_item_ids must have the same batch size as query_text",
            ),
            tf.debugging.assert_non_negative(
                indices,
                message="rank: candidate_item_ids contains an id that is not in the catalog",
            ),
        ]
        checked = self._guarded(
            checks, {**features, "candidate_item_ids": candidate_item_ids, "indices": indices}
        )
        candidate_item_ids, indices = checked.pop("candidate_item_ids"), checked.pop("indices")
        queries = self._query(checked)
        candidates = tf.gather(self.embeddings, indices)
        ratings = self.rating_fn(queries, candidates, checked["user_id"], candidate_item_ids)
        return {"ratings": tf.cast(ratings, tf.float32)}

    @tf.function(
        input_signature=[
            *[_string_spec(None) for _ in QUERY_INPUTS],
            _string_spec(None, None),
        ]
    )
    def query_embedding(self, user_id, user_age, user_gender, user_occupation, query_text, history):
        features = self._features(
            user_id, user_age, user_gender, user_occupation, query_text, history
        )
        return {"embeddings": self._query(self._guarded(self._query_checks(features), features))}

    @tf.function(input_signature=[_string_spec(None) for _ in schema.CANDIDATE_STRING_FEATURES])
    def candidate_embedding(self, item_id, item_title, item_year, item_genres, item_text):
        features = dict(
            zip(
                schema.CANDIDATE_STRING_FEATURES,
                (item_id, item_title, item_year, item_genres, item_text),
                strict=True,
            )
        )
        batch = tf.shape(item_id)[0]
        checks = [tf.debugging.assert_greater(batch, 0, message="empty batch")]
        for name in schema.CANDIDATE_STRING_FEATURES[1:]:
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(features[name])[0],
                    batch,
                    message=f"input {name} must have the same batch size as item_id",
                )
            )
        checked = self._guarded(checks, features)
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
        return {
            "serving_default": self.retrieve.get_concrete_function(),
            "rank": self.rank.get_concrete_function(),
            "query_embedding": self.query_embedding.get_concrete_function(),
            "candidate_embedding": self.candidate_embedding.get_concrete_function(),
        }


# ---------------------------------------------------------------------- writing an export


def next_version(model_base: str) -> int:
    """One more than the highest numeric version under ``model_base`` (1 when there is none)."""
    if not tf.io.gfile.isdir(model_base):
        return 1
    versions = [
        int(n.rstrip("/")) for n in tf.io.gfile.listdir(model_base) if re.fullmatch(r"\d+/?", n)
    ]
    return max(versions, default=0) + 1


def _stage(message: str) -> None:
    """One progress line of an export (minutes on a CPU), flushed at once."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def check_target(export_base: str, model_name: str, version: int | None) -> tuple[str, int]:
    """``(model base, version)`` of a new export, or :class:`ExportError` naming the flag.

    Also removes the ``.tmp-*`` folders that killed exports left under the model base.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model_name) or set(model_name) <= {"."}:
        raise ExportError(
            f"--model-name {model_name!r}: use letters, digits, _ . - (a folder name under "
            "--export-base; '.' and '..' are not names)"
        )
    model_base = os.path.join(export_base, model_name)
    if version is not None and version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    if tf.io.gfile.isdir(model_base):
        from common import staging

        for path in staging.remove_stale(model_base, ".tmp-"):
            print(f"removed {path}, left by an export that was killed")
    version = next_version(model_base) if version is None else version
    final = os.path.join(model_base, str(version))
    if tf.io.gfile.exists(final):
        raise ExportError(f"{final} already exists; versions are never overwritten")
    return model_base, version


def recall_against_brute_force(
    module: RecommenderModule, queries: dict[str, np.ndarray], k: int = 10
) -> float:
    """Mean recall@k of the module's index against exact search over the same embeddings."""
    embeddings = module.query_embedding(**queries)["embeddings"]
    _, approx = module._pool(embeddings)
    exact = tf.math.top_k(tf.matmul(embeddings, module.embeddings, transpose_b=True), k=k).indices
    approx, exact = approx[:, :k].numpy(), exact.numpy()
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)]))


def _tensor_proto(value: np.ndarray) -> tf.compat.v1.TensorProto:
    return tf.make_tensor_proto(value)


def write_warmup(path: str, requests: dict[str, dict[str, np.ndarray]], model_name: str) -> int:
    """Writes TF Serving's warm-up file: one PredictionLog per signature."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(path) as writer:
        for signature, inputs in requests.items():
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
            )
            for name, value in inputs.items():
                request.inputs[name].CopyFrom(_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return len(requests)


def sample_requests(
    queries: dict[str, np.ndarray], catalog: dict[str, np.ndarray], module_max_k: int = 10
) -> dict:
    """One small request per signature, from real queries and catalog items (batch 2)."""
    query = {
        name: np.asarray(queries[name][:2]).astype(object) for name in (*QUERY_INPUTS, "history")
    }
    items = {
        name: np.asarray(catalog[name][:2]).astype(object)
        for name in schema.CANDIDATE_STRING_FEATURES
    }
    batch = len(query["query_text"])
    retrieve = {
        **query,
        "k": np.full([batch], min(10, module_max_k), np.int32),
        "exclude_item_ids": np.array([[""]] * batch, dtype=object),
        "diversity": np.zeros([batch], np.float32),
    }
    rank = {
        **query,
        "candidate_item_ids": np.array([list(catalog["item_id"][:3])] * batch, dtype=object),
    }
    return {
        "serving_default": retrieve,
        "rank": rank,
        "query_embedding": query,
        "candidate_embedding": items,
    }


def save_export(
    module: RecommenderModule,
    export_base: str,
    model_name: str,
    version: int | None,
    queries: dict[str, np.ndarray],
    catalog: dict[str, np.ndarray],
    extra_info: dict | None = None,
) -> str:
    """Checks recall, saves, writes warm-up and metadata, then renames into place.

    Returns the version directory. Raises :class:`ExportError` if the version exists or the
    index's recall@10 against brute force is below ``module.index_config.min_recall``.
    """
    model_base, version = check_target(export_base, model_name, version)
    final = os.path.join(model_base, str(version))
    config = module.index_config
    sample = {
        name: np.asarray(queries[name][: config.recall_queries]).astype(object)
        for name in (*QUERY_INPUTS, "history")
    }
    recall = 1.0
    while config.kind == "scann":
        recall = recall_against_brute_force(module, sample)
        print(
            f"index scann ({config.num_leaves_to_search}/{config.num_leaves} leaves searched): "
            f"recall@10 against brute force = {recall:.4f} on {len(sample['query_text'])} queries"
        )
        if recall >= config.min_recall or not config.auto_tune:
            break
        if config.num_leaves_to_search >= config.num_leaves:
            break
        config = dataclasses.replace(
            config, num_leaves_to_search=min(2 * config.num_leaves_to_search, config.num_leaves)
        )
        module.build_index(config)
    if recall < config.min_recall:
        raise ExportError(
            f"{config.kind} recall@10 {recall:.4f} is below --min-recall "
            f"{config.min_recall}; raise --num-leaves-to-search or reordering"
        )
    requests = sample_requests(queries, catalog, config.max_k)
    _stage(f"tracing the {len(requests)} signatures")
    for signature, inputs in requests.items():  # the concrete functions run once before saving
        module.signatures()[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    module.track_variables()
    tf.io.gfile.makedirs(model_base)
    from common import staging

    tmp = os.path.join(model_base, f".tmp-{version}-{staging.temp_token()}")
    try:
        _stage(f"saving the SavedModel to {tmp}")
        tf.saved_model.save(
            module,
            tmp,
            signatures=module.signatures(),
            options=tf.saved_model.SaveOptions(namespace_whitelist=SAVE_NAMESPACES),
        )
        extra = os.path.join(tmp, "assets.extra")
        tf.io.gfile.makedirs(extra)
        write_warmup(os.path.join(extra, WARMUP_FILE), requests, model_name)
        info = {
            "index": dataclasses.asdict(config),
            "recall_at_10_vs_brute_force": recall,
            "num_items": int(module.embeddings.shape[0]),
            "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra_info or {}),
        }
        with tf.io.gfile.GFile(os.path.join(extra, RECALL_FILE), "w") as f:
            json.dump(info, f, indent=2)
        from trainer import model_card  # what the export is, its figures and limits

        card = model_card.write_export_card(extra, info)
        _stage(f"wrote warm-up requests, {RECALL_FILE} and {os.path.basename(card)}")
        if tf.io.gfile.exists(final):
            raise ExportError(f"{final} appeared while exporting; not overwriting it")
        tf.io.gfile.rename(tmp, final)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
    return final


# ---------------------------------------------------------------------- from a trained model


CatalogFn = Callable[
    [dict[str, np.ndarray], np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]
]


def build_module(
    model_dir: str,
    data_dir: str | None,
    index: IndexConfig,
    grow_catalog: CatalogFn | None = None,
) -> tuple[RecommenderModule, dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Loads a trained model dir and builds the serving module over its catalog.

    The catalog and the real queries of the recall check come from the data dir the model was
    trained on (recorded in its config) unless ``data_dir`` names another prepared copy.
    ``grow_catalog``: ``(catalog, item embeddings [N, D]) -> (catalog, [N', D])``, what the
    index serves instead (benchmarks: a synthetic million-item catalog behind the real towers).

    Returns the module, the catalog table, the users table and a dict describing the export.
    """
    from trainer.data import records
    from trainer.model import ModelScorer, load_trained

    if not tf.io.gfile.exists(os.path.join(model_dir, "config.json")):
        raise ExportError(f"{model_dir} is not a trained model dir (no config.json)")
    model, config = load_trained(model_dir)
    data_dir = data_dir or config.data.data
    split = config.data.split
    try:
        catalog = records.load_catalog(data_dir, split)
        users = records.load_users(data_dir, split)
    except DataError as e:
        raise ExportError(f"{e} (pass --data: the prepared data the model was trained on)") from e
    # Every text the model has encoded (catalog item texts, profile sentences, titles) is
    # answered from its in-graph table; only the misses of a batch go through the tokenizer
    # and BERT (trainer.model.cached_or_encoded). A fine-tuned BERT's tables are recomputed
    # with its final weights first, so both paths give the same vectors.
    model.serve_from_caches()
    item_embeddings = ModelScorer(model, catalog).item_embeddings()
    if grow_catalog is not None:
        catalog, item_embeddings = grow_catalog(catalog, item_embeddings)
    model.set_text_mode("live")
    module = RecommenderModule(
        query_model=lambda f: model.query_embeddings(f),
        candidate_model=lambda f: model.candidate_embeddings(f),
        rating_fn=lambda q, c, u, i: _pairwise_ratings(model, q, c, u, i),
        catalog=catalog,
        item_embeddings=item_embeddings,
        index=index.resolved(len(catalog["item_id"])),
        history_length=model.assets.history_length,
    )
    module.keras_model = model  # tracked, so the SavedModel holds the towers' variables
    module.catalog_tables = _freeze_catalog_tables(model)
    info = {
        "model_dir": model_dir,
        "data_dir": data_dir,
        "split": split,
        "preset": config.model.preset,
        "sequence_length": config.model.sequence_length,
    }
    return module, catalog, users, info


def _freeze_catalog_tables(model) -> list[tf.Variable]:
    """Serves the set encoder's per-catalog-row tables from variables filled once.

    The whole-history query tower reads every catalog row's text vector and id embedding on
    each call and projects both (a gather of ``[R, T]`` floats, an id lookup of ``R`` rows and
    two ``[R, .] x [., d]`` matmuls: most of a known-text query); at serving time all of it is
    constant, so the projected ``[R, d]`` tables are stored. Returns the variables (the module
    tracks them, so they are saved).
    """
    from trainer.towers import SetEncoder

    tower = model.query_tower
    tables = getattr(tower, "catalog_tables", None)
    if tables is None or not isinstance(getattr(tower, "history", None), SetEncoder):
        return []  # only the set encoder reads them
    text, ids = tower.history.project(*tables())
    frozen = [
        None if t is None else tf.Variable(tf.convert_to_tensor(t), trainable=False, name=name)
        for t, name in ((text, "catalog_text_table"), (ids, "catalog_id_table"))
    ]
    tower.catalog_tables = lambda: (
        None if frozen[0] is None else frozen[0].read_value(),
        None if frozen[1] is None else frozen[1].read_value(),
    )
    tower.catalog_tables_projected = True
    return [v for v in frozen if v is not None]


def _pairwise_ratings(
    model, queries: tf.Tensor, candidates: tf.Tensor, user_ids: tf.Tensor, item_ids: tf.Tensor
) -> tf.Tensor:
    """Ranking head over every (query, candidate) pair: ``[B, D]``, ``[B, M, D]`` (with user ids
    ``[B]`` and candidate item ids ``[B, M]``) -> ``[B, M]``."""
    shape = tf.shape(candidates)
    dim = candidates.shape[-1]
    tiled = tf.repeat(queries, shape[1], axis=0)  # [B * M, D]
    flat = tf.reshape(candidates, [-1, dim])
    users = tf.repeat(user_ids, shape[1], axis=0)
    items = tf.reshape(item_ids, [-1])
    return tf.reshape(model.predict_rating(tiled, flat, users, items), shape[:2])


def export(
    model_dir: str,
    export_base: str,
    model_name: str,
    index: IndexConfig,
    version: int | None = None,
    data_dir: str | None = None,
) -> str:
    """Builds and writes one export version; returns its directory."""
    start = time.time()
    _stage(f"loading {model_dir} and embedding its catalog")
    module, catalog, users, info = build_module(model_dir, data_dir, index)
    _stage(
        f"built the serving module: {len(catalog['item_id']):,} items, "
        f"{len(users['user_id']):,} users for the checks, index {module.index_config.kind} "
        f"({time.time() - start:.1f}s)"
    )
    path = save_export(module, export_base, model_name, version, users, catalog, info)
    print(
        f"exported {path} ({module.index_config.kind}, {len(catalog['item_id'])} items) "
        f"in {time.time() - start:.1f}s"
    )
    return path


def build_parser() -> argparse.ArgumentParser:
    from trainer.cli import export_parser  # TF-free, so that --help answers before TF loads

    return export_parser()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    index = IndexConfig(
        kind=args.index,
        max_k=args.max_k,
        pool=args.pool,
        num_leaves=args.num_leaves,
        num_leaves_to_search=args.num_leaves_to_search,
        num_reordering_candidates=args.num_reordering_candidates,
        min_recall=args.min_recall,
    )
    from trainer.config import ConfigError

    try:
        # Cheap checks first: the model takes minutes to load.
        check_target(args.export_base, args.model_name, args.version)
        if not tf.io.gfile.exists(os.path.join(args.model_dir, "config.json")):
            raise ExportError(
                f"--model-dir {args.model_dir} is not a trained model dir (no config.json)"
            )
        export(args.model_dir, args.export_base, args.model_name, index, args.version, args.data)
    except (ExportError, DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
