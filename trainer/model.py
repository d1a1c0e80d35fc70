"""The two-tower retrieval + ranking model, its losses (TFRS tasks) and its model directory.

The model is Keras 3 (KerasHub BERT inside); TFRS's tasks are Keras 2 objects with no weights,
called as plain functions on tensors from :meth:`TwoTowerModel.compute_losses`, which the loop
runs inside a ``tf.function`` (AutoGraph on: ``tfrs.tasks.Retrieval`` needs it).

Public API used by the loop, the export and the evaluation:

* :func:`build_model` / :func:`save_trained` / :func:`load_trained`
* :meth:`TwoTowerModel.query_embeddings`, :meth:`TwoTowerModel.candidate_embeddings` (raw
  string features in, L2-normalised float32 ``[B, D]`` out), :meth:`TwoTowerModel.predict_rating`
* :meth:`TwoTowerModel.set_text_mode` (``"live"``: raw text through BERT, what an export wants;
  ``"cached"``: precomputed vectors, what frozen-BERT training uses)
* :class:`ModelScorer`, the :class:`trainer.evaluate.Scorer` of a trained model.

Model directory (written to a temporary sibling and renamed into place)::

    config.json          the full TrainConfig
    assets.json          catalog ids/texts/popularity and the vocabularies of the preprocessor
    encoders.json        BERT architecture + vocabulary per tower (no preset needed to load)
    model.weights.h5     every weight, text caches included
    metrics.json         written by the loop: per-epoch history and final figures
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TFRS)
from trainer.config import ConfigError, ModelConfig, TrainConfig
from trainer.data import schema
from trainer.towers import (
    CandidateTower,
    EncoderSpec,
    QueryTower,
    RankingHead,
    TextCache,
    TextEncoder,
    backbone_from_spec,
    id_embedding,
    load_backbone_and_tokenizer,
)

CONFIG_FILE = "config.json"
ASSETS_FILE = "assets.json"
ENCODERS_FILE = "encoders.json"
WEIGHTS_FILE = "model.weights.h5"
METRICS_FILE = "metrics.json"

#: OOV buckets of the categorical user fields (age band, gender, occupation).
FIELD_OOV = 8
#: Hash space of the candidate ids used to spot accidental hits (collisions are negligible).
_HIT_ID_BUCKETS = 2**62


# ----------------------------------------------------------------------------- assets


def profile_texts(age: tf.Tensor, gender: tf.Tensor, occupation: tf.Tensor) -> tf.Tensor:
    """The profile sentence of :func:`trainer.data.features.profile_text`, built in the graph.

    ``"Age 25-34, male, engineer."``; string ``[B]`` each -> string ``[B]``.
    """
    gender_text = tf.where(
        gender == "M",
        "male",
        tf.where(gender == "F", "female", tf.where(gender == "", "unknown gender", gender)),
    )
    occupation_text = tf.where(occupation == "", "unknown occupation", occupation)
    return tf.strings.join(["Age ", age, ", ", gender_text, ", ", occupation_text, "."])


#: What the prepared query text says when the user liked nothing yet.
_NOTHING_LIKED = "nothing yet"


def liked_titles(query_text: tf.Tensor, max_titles: int) -> tf.Tensor:
    """The titles a query text names, string ``[B]`` -> ``[B, max_titles]`` (``""`` padding).

    ``"Age 25-34, male, engineer. Liked: Fargo (1996); Heat (1995)."`` -> ``["Fargo (1996)",
    "Heat (1995)", "", ...]``. A text without ``"Liked:"`` is free text: one piece, whole.
    More titles than ``max_titles`` are cut (the first ones are the most recent).
    """
    text = tf.strings.regex_replace(query_text, r"^.*?Liked:\s*", "")
    text = tf.strings.regex_replace(text, r"\.\s*$", "")
    pieces = tf.strings.strip(tf.strings.split(text, ";"))
    pieces = tf.ragged.boolean_mask(
        pieces, tf.logical_and(pieces != "", tf.strings.lower(pieces) != _NOTHING_LIKED)
    )
    return pieces.to_tensor(default_value="", shape=[None, max_titles])


def cached_or_encoded(cache: TextCache, encoder: TextEncoder, strings: tf.Tensor) -> tf.Tensor:
    """string ``[N]`` -> ``[N, T]``: the cached vector of each text the cache holds, BERT's for
    the others (only those go through the encoder), zeros for ``""``. With a frozen BERT this
    equals encoding every text, at the cost of the misses alone."""
    strings = tf.reshape(tf.convert_to_tensor(strings), [-1])
    rows = cache.lookup(strings)
    vectors = tf.cast(cache(rows), tf.float32)
    misses = tf.where(tf.logical_and(rows == 0, strings != ""))  # [M, 1]

    def encode() -> tf.Tensor:
        texts = tf.gather(strings, misses[:, 0])
        return tf.cast(encoder.encode_strings(texts), tf.float32)

    encoded = tf.cond(tf.size(misses) > 0, encode, lambda: tf.zeros([0, cache.dim], tf.float32))
    return tf.tensor_scatter_nd_update(vectors, misses, encoded)


@dataclasses.dataclass
class ModelAssets:
    """What the preprocessor and the caches are built from: the catalog and the vocabularies.

    Saved as ``assets.json``; a model dir rebuilds the same model without the data dir.
    """

    item_ids: list[str]
    item_texts: list[str]
    popularity: list[int]
    genres: list[str]
    years: list[str]
    ages: list[str]
    genders: list[str]
    occupations: list[str]
    profiles: list[str]  # every distinct profile text of the users (the query text cache)
    history_length: int = schema.HISTORY_LENGTH
    # Per catalog item (empty in model dirs of older versions): the titles a query text may
    # name, and the fields the candidate tower reads for catalog-wide negatives.
    item_titles: list[str] = dataclasses.field(default_factory=list)
    item_genres: list[str] = dataclasses.field(default_factory=list)
    item_years: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def from_tables(
        cls,
        catalog: Mapping[str, np.ndarray],
        users: Mapping[str, np.ndarray],
        history_length: int,
    ) -> ModelAssets:
        """From :func:`trainer.data.load_catalog` and :func:`trainer.data.load_users` tables."""
        if len(catalog["item_id"]) == 0:
            raise ConfigError("the catalog is empty")
        genres = sorted({g for gs in catalog["item_genres"] for g in str(gs).split("|") if g})
        profiles = profile_texts(
            tf.constant(users["user_age"].astype(str)),
            tf.constant(users["user_gender"].astype(str)),
            tf.constant(users["user_occupation"].astype(str)),
        ).numpy()
        return cls(
            item_ids=[str(i) for i in catalog["item_id"]],
            item_texts=[str(t) for t in catalog["item_text"]],
            popularity=[int(p) for p in catalog["popularity"]],
            genres=genres,
            years=sorted({str(y) for y in catalog["item_year"] if y}),
            ages=sorted({str(a) for a in users["user_age"]}),
            genders=sorted({str(g) for g in users["user_gender"]}),
            occupations=sorted({str(o) for o in users["user_occupation"]}),
            profiles=sorted({p.decode("utf-8") for p in profiles}),
            history_length=history_length,
            item_titles=[str(t) for t in catalog["item_title"]],
            item_genres=[str(g) for g in catalog["item_genres"]],
            item_years=[str(y) for y in catalog["item_year"]],
        )

    def catalog_features(self) -> dict[str, tf.Tensor] | None:
        """The whole catalog as raw candidate features ``[N]`` (None for older model dirs)."""
        if len(self.item_genres) != len(self.item_ids):
            return None
        return {
            "item_id": tf.constant(self.item_ids),
            "item_title": tf.constant(self.item_titles),
            "item_year": tf.constant(self.item_years),
            "item_genres": tf.constant(self.item_genres),
            "item_text": tf.constant(self.item_texts),
        }

    def sampling_probability(self) -> np.ndarray:
        """``[N + 2]`` probability of each catalog row being a positive (rows 0, 1: padding, OOV).

        From the split's train popularity; unseen items count as 1 so logQ stays finite.
        """
        counts = np.maximum(np.asarray(self.popularity, np.float64), 1.0)
        probs = counts / counts.sum()
        return np.concatenate([[1.0, 1.0], probs]).astype(np.float32)


def dummy_features(assets: ModelAssets, batch: int = 2) -> dict[str, tf.Tensor]:
    """A small raw batch (event features) from the assets, to build the model's weights."""
    items = [assets.item_ids[i % len(assets.item_ids)] for i in range(batch)]
    texts = [assets.item_texts[i % len(assets.item_texts)] for i in range(batch)]
    history = [[items[0]] + [""] * (assets.history_length - 1) for _ in range(batch)]
    strings = {
        "user_id": ["1"] * batch,
        "user_age": [assets.ages[0] if assets.ages else "unknown"] * batch,
        "user_gender": [assets.genders[0] if assets.genders else "unknown"] * batch,
        "user_occupation": [assets.occupations[0] if assets.occupations else "other"] * batch,
        "query_text": ["Age unknown, unknown gender, other. Liked: nothing yet."] * batch,
        "item_id": items,
        "item_title": items,
        "item_year": [assets.years[0] if assets.years else ""] * batch,
        "item_genres": [assets.genres[0] if assets.genres else ""] * batch,
        "item_text": texts,
    }
    features = {k: tf.constant(v) for k, v in strings.items()}
    features["history"] = tf.constant(history)
    features["rating"] = tf.constant([4.0] * batch)
    features["timestamp"] = tf.constant([0] * batch, tf.int64)
    return features


# ----------------------------------------------------------------------------- preprocessing


class FeaturePreprocessor(keras.layers.Layer):
    """Raw string features -> the towers' numeric inputs (host-side string work, no weights).

    Query: ``user_id`` (hashed), ``user_age``/``user_gender``/``user_occupation`` (vocabulary +
    OOV buckets), ``history_rows`` (catalog rows, 0 = padding, 1 = unknown item),
    ``history_ids`` (hashed), ``text`` (token dict when live, cache rows when cached).
    Candidate: ``item_id`` (hashed), ``row`` (catalog row), ``genres`` (multi-hot), ``year``,
    ``hit_id`` (int64 id for accidental-hit removal), ``text``.
    """

    def __init__(self, config: ModelConfig, assets: ModelAssets, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.history_length = assets.history_length
        self.hash_ids = keras.layers.Hashing(config.id_buckets, name="hash_ids")
        self.fields = {
            name: keras.layers.StringLookup(
                vocabulary=vocab or ["unknown"], num_oov_indices=FIELD_OOV, name=f"lookup_{name}"
            )
            for name, vocab in (
                ("user_age", assets.ages),
                ("user_gender", assets.genders),
                ("user_occupation", assets.occupations),
            )
        }
        self.field_buckets = max(layer.vocabulary_size() for layer in self.fields.values())
        self.item_rows = keras.layers.StringLookup(
            vocabulary=list(dict.fromkeys(assets.item_ids)),
            mask_token="",
            num_oov_indices=1,
            name="lookup_item_row",
        )
        self.genres = keras.layers.StringLookup(
            vocabulary=assets.genres or ["unknown"],
            num_oov_indices=1,
            output_mode="multi_hot",
            name="lookup_genres",
        )
        self.years = keras.layers.StringLookup(
            vocabulary=assets.years or ["unknown"], num_oov_indices=1, name="lookup_year"
        )
        self.num_years = self.years.vocabulary_size()

    def query(self, features: Mapping[str, tf.Tensor], text: dict | tf.Tensor) -> dict:
        history = tf.convert_to_tensor(features["history"])
        inputs = {
            "user_id": self.hash_ids(features["user_id"]),
            **{name: layer(features[name]) for name, layer in self.fields.items()},
            "history_rows": self.item_rows(history),
            "text": text,
        }
        if self.config.history in ("attention", "transformer"):
            # The set encoder reads ids by catalog row; the sequence encoders hash each one.
            inputs["history_ids"] = self.hash_ids(history)
        return inputs

    def candidate(self, features: Mapping[str, tf.Tensor], text: dict | tf.Tensor) -> dict:
        item_id = tf.convert_to_tensor(features["item_id"])
        genres = tf.strings.split(features["item_genres"], "|")
        return {
            "item_id": self.hash_ids(item_id),
            "row": self.item_rows(item_id),
            "genres": tf.cast(self.genres(genres), tf.float32),
            "year": self.years(features["item_year"]),
            "hit_id": tf.strings.to_hash_bucket_fast(item_id, _HIT_ID_BUCKETS),
            "text": text,
        }


# ----------------------------------------------------------------------------- the model


class _Tasks:
    """The TFRS tasks (Keras 2 layers, no weights), kept out of Keras 3's tracking."""

    def __init__(self, config: ModelConfig):
        import tensorflow_recommenders as tfrs

        self.retrieval = tfrs.tasks.Retrieval(
            loss=tf.keras.losses.CategoricalCrossentropy(
                from_logits=True, reduction=tf.keras.losses.Reduction.SUM
            ),
            temperature=config.temperature,
            num_hard_negatives=config.num_hard_negatives or None,
            remove_accidental_hits=config.remove_accidental_hits,
        )
        self.ranking = tfrs.tasks.Ranking(
            loss=tf.keras.losses.MeanSquaredError(reduction=tf.keras.losses.Reduction.SUM)
        )


class TwoTowerModel(keras.Model):
    """Query tower, candidate tower (sharing item id embeddings, optionally one BERT), ranking
    head, text caches and the string preprocessor.

    Build with :func:`build_model` (from a preset) or :func:`load_trained` (from a model dir).
    """

    def __init__(
        self,
        config: ModelConfig,
        assets: ModelAssets,
        query_encoder: TextEncoder,
        candidate_encoder: TextEncoder,
        **kwargs,
    ):
        super().__init__(name="two_tower", **kwargs)
        self.model_config = config
        self.assets = assets
        self.query_encoder = query_encoder
        self.candidate_encoder = candidate_encoder
        self.text_mode = "cached" if config.cache_text else "live"
        self.preprocessor = FeaturePreprocessor(config, assets, name="preprocessor")
        # Candidate-side text vectors of every catalog text: the history's item table, and the
        # candidate text cache when BERT is frozen.
        self.item_text_cache = TextCache(
            assets.item_texts, candidate_encoder.output_dim, name="item_text_cache"
        )
        rows = self.item_text_cache.lookup(tf.constant(assets.item_texts))
        self._catalog_text_rows = tf.constant(
            np.concatenate([[0, 0], rows.numpy()]).astype(np.int64)
        )  # catalog row (0 = padding, 1 = OOV) -> item_text_cache row
        self.profile_cache = None
        if config.query_text == "profile":
            self.profile_cache = TextCache(
                assets.profiles, query_encoder.output_dim, name="profile_text_cache"
            )
        # Titles a query text may name, read like the item texts of the history (same encoder).
        self.title_cache = None
        self.uses_titles = bool(
            config.liked_titles and config.use_text and config.history != "none"
        )
        if self.uses_titles:
            self.title_cache = TextCache(
                assets.item_titles or assets.item_ids,
                candidate_encoder.output_dim,
                name="title_text_cache",
            )
        # Live text reads the caches where they hold the text: a frozen BERT gives exactly
        # the cached vectors, so only unseen texts (free text, new items) need BERT.
        self._live_uses_caches = bool(config.freeze_bert and config.cache_text)
        self._catalog = assets.catalog_features()
        # [1, N]: catalog items nobody rated in train (no negatives of the training softmax).
        self._untrained_items = (np.asarray(assets.popularity) <= 0)[None, :]
        self._sampling_probability = tf.constant(assets.sampling_probability())
        # The hashed id of each catalog row (rows 0 and 1, padding and unknown, are masked).
        self._catalog_hashed_ids = self.preprocessor.hash_ids(
            tf.constant(["", "[UNK]", *assets.item_ids])
        )
        self.item_id_embedding = None
        if config.use_id_embeddings:
            self.item_id_embedding = id_embedding(
                config, config.id_embedding_dim, "item_id_embedding"
            )
        self.query_tower = QueryTower(
            config,
            text_vectors=self._query_text_vectors,
            item_text_table=self._history_text_vectors,
            item_id_embedding=self.item_id_embedding,
            history_length=assets.history_length,
            field_buckets=self.preprocessor.field_buckets,
            title_vectors=self._title_vectors if self.uses_titles else None,
            catalog_tables=self._catalog_tables,
            name="query_tower",
        )
        self.candidate_tower = CandidateTower(
            config,
            text_vectors=self._candidate_text_vectors,
            item_id_embedding=self.item_id_embedding,
            num_years=self.preprocessor.num_years,
            name="candidate_tower",
        )
        rating_ids = config.use_id_embeddings and config.rating_factor_dim >= 0
        self.ranking_head = RankingHead(
            config.ranking_layers,
            config.cross_layers if config.ranking_head == "dcn" else 0,
            config.dropout,
            id_buckets=config.id_buckets if rating_ids else 0,
            factor_dim=max(config.rating_factor_dim, 0),
            name="ranking_head",
        )
        self._tasks = _Tasks(config)

    def build(self, input_shape=None):
        # Sublayers build on their first call (build_model makes one with a dummy batch).
        self.built = True

    # ------------------------------------------------------------------ text

    @property
    def _default_save_signature(self):
        # Keras would trace a float32 "serving_default" from the build shapes, which cannot take
        # string features; the export defines its own signatures.
        return None

    def set_text_mode(self, mode: str) -> None:
        """``"live"``: texts through BERT (exports, fine-tuning); ``"cached"``: lookups."""
        if mode not in ("live", "cached"):
            raise ValueError(f"text mode must be 'live' or 'cached', got {mode!r}")
        if mode == "cached" and not self.model_config.cache_text:
            raise ValueError("this model was configured without text caches")
        self.text_mode = mode

    def _query_strings(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        if self.model_config.query_text == "profile":
            return profile_texts(
                features["user_age"], features["user_gender"], features["user_occupation"]
            )
        return tf.convert_to_tensor(features["query_text"])

    def _text_input(self, cache: TextCache | None, encoder: TextEncoder, strings: tf.Tensor):
        """Cache rows (cached mode), vectors (live with a frozen BERT: cache hits + BERT for
        the rest) or token ids (live, BERT trains)."""
        if self.text_mode == "cached":
            return cache.lookup(strings)
        if cache is not None and self._live_uses_caches:
            return cached_or_encoded(cache, encoder, strings)
        return encoder.tokenize(strings)

    def _query_text_input(self, features):
        return self._text_input(
            self.profile_cache, self.query_encoder, self._query_strings(features)
        )

    def _candidate_text_input(self, features):
        strings = tf.convert_to_tensor(features["item_text"])
        return self._text_input(self.item_text_cache, self.candidate_encoder, strings)

    def _title_input(self, features) -> tuple[tf.Tensor, tf.Tensor]:
        """``(titles, mask [B, P])``: cache rows ``[B, P]`` or vectors ``[B, P, T]``."""
        pieces = liked_titles(
            tf.convert_to_tensor(features["query_text"]), self.model_config.liked_titles
        )
        mask = pieces != ""
        if self.text_mode == "cached":
            return self.title_cache.lookup(pieces), mask
        flat = tf.reshape(pieces, [-1])
        if self._live_uses_caches:
            vectors = cached_or_encoded(self.title_cache, self.candidate_encoder, flat)
        else:
            vectors = self.candidate_encoder.encode_strings(flat)
        shape = tf.shape(pieces)
        return tf.reshape(vectors, [shape[0], shape[1], self.title_cache.dim]), mask

    def _query_text_vectors(self, text, training: bool = False) -> tf.Tensor:
        if isinstance(text, Mapping):
            return self.query_encoder(text, training=training)
        if text.dtype.is_floating:
            return text
        return self.profile_cache(text)

    def _candidate_text_vectors(self, text, training: bool = False) -> tf.Tensor:
        if isinstance(text, Mapping):
            return self.candidate_encoder(text, training=training)
        if text.dtype.is_floating:
            return text
        return self.item_text_cache(text)

    def _title_vectors(self, titles: tf.Tensor) -> tf.Tensor:
        return titles if titles.dtype.is_floating else self.title_cache(titles)

    def _catalog_tables(self) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        """Per catalog row (0 = padding, 1 = unknown, then the items): the cached item text
        vector ``[R, T]`` and the item id embedding ``[R, E]`` (None where the model has none)."""
        text = None
        if self.model_config.use_text:
            text = tf.gather(self.item_text_cache.vectors, self._catalog_text_rows)
        ids = None
        if self.item_id_embedding is not None:
            ids = self.item_id_embedding(self._catalog_hashed_ids)
        return text, ids

    def _history_text_vectors(self, rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Catalog rows -> (every cached item text vector ``[K, T]``, their rows ``[B, H]``)."""
        return self.item_text_cache.vectors, tf.gather(self._catalog_text_rows, rows)

    def refresh_text_caches(self, batch_size: int = 256) -> None:
        """Recomputes every cached text vector with the live encoders (eager or in a tf.function).

        With a frozen BERT this runs once; when BERT trains it keeps the history's item table
        fresh (called once per epoch by the loop).
        """
        caches = [(self.item_text_cache, self.candidate_encoder)]
        if self.profile_cache is not None:
            caches.append((self.profile_cache, self.query_encoder))
        if self.title_cache is not None:
            caches.append((self.title_cache, self.candidate_encoder))
        for cache, encoder in caches:
            encode = tf.function(encoder.encode_strings, reduce_retracing=True)
            chunks = [np.zeros((1, cache.dim), np.float32)]
            for start in range(0, len(cache.keys), batch_size):
                texts = tf.constant(cache.keys[start : start + batch_size])
                chunks.append(np.asarray(encode(texts)))
            cache.vectors.assign(np.concatenate(chunks))

    def serve_from_caches(self) -> None:
        """Live text reads the caches from now on and sends only their misses to BERT (exports).

        A frozen BERT's caches already hold its vectors. A fine-tuned one's are recomputed
        first with the encoders as they are now, so known texts get the final model's vectors.
        """
        if not self._live_uses_caches:
            self.refresh_text_caches()
            self._live_uses_caches = True

    # ------------------------------------------------------------------ numeric inputs

    def preprocess_query(self, features: Mapping[str, tf.Tensor]) -> dict:
        inputs = self.preprocessor.query(features, self._query_text_input(features))
        if self.uses_titles:
            inputs["titles"], inputs["title_mask"] = self._title_input(features)
        return inputs

    def preprocess_candidate(self, features: Mapping[str, tf.Tensor]) -> dict:
        return self.preprocessor.candidate(features, self._candidate_text_input(features))

    # ------------------------------------------------------------------ public API

    def query_embeddings(
        self, features: Mapping[str, tf.Tensor], training: bool = False
    ) -> tf.Tensor:
        """Raw query features (``user_*``, ``query_text`` ``[B]``, ``history`` ``[B, H]``; extra
        keys ignored) -> L2-normalised float32 ``[B, D]``."""
        return self.query_tower(self.preprocess_query(features), training=training)

    def candidate_embeddings(
        self, features: Mapping[str, tf.Tensor], training: bool = False
    ) -> tf.Tensor:
        """Raw candidate features (``item_*`` ``[N]``) -> L2-normalised float32 ``[N, D]``."""
        return self.candidate_tower(self.preprocess_candidate(features), training=training)

    def predict_rating(
        self,
        query_emb: tf.Tensor,
        cand_emb: tf.Tensor,
        user_ids: tf.Tensor,
        item_ids: tf.Tensor,
        training: bool = False,
    ) -> tf.Tensor:
        """Ranking head: ``[B, D]`` x ``[B, D]`` -> ``[B]``, or ``[B, D]`` x ``[B, M, D]`` ->
        ``[B, M]`` (float32 ratings on the 1..5 scale, not clipped). ``user_ids`` ``[B]`` and
        ``item_ids`` ``[B]`` or ``[B, M]`` are the raw string ids of the pairs."""
        hash_ids = self.preprocessor.hash_ids
        return self.ranking_head(
            query_emb, cand_emb, hash_ids(user_ids), hash_ids(item_ids), training=training
        )

    def call(self, features: Mapping[str, tf.Tensor], training: bool = False) -> dict:
        query = self.query_embeddings(features, training=training)
        candidate = self.candidate_embeddings(features, training=training)
        rating = self.predict_rating(
            query, candidate, features["user_id"], features["item_id"], training=training
        )
        return {"query": query, "candidate": candidate, "rating": rating}

    def sampling_probability(self, rows: tf.Tensor) -> tf.Tensor:
        return tf.gather(self._sampling_probability, rows)

    # ------------------------------------------------------------------ losses

    def compute_losses(
        self,
        features: Mapping[str, tf.Tensor],
        *,
        global_batch_size: int,
        training: bool = True,
        gather_candidates: bool = False,
        forward=None,
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """Weighted retrieval + ranking loss of one replica's batch, scaled by the *global* batch.

        Call in a replica context (inside ``strategy.run``) within a ``tf.function``.
        ``forward``: optional (e.g. XLA-compiled) ``(query_inputs, candidate_inputs, training)
        -> (query [b, D], candidate [b, D], rating [b])`` over the numeric inputs.

        The retrieval softmax runs over ``config.negatives``: the batch's candidates (TFRS,
        logQ-corrected), those plus uniformly sampled catalog items ("mixed"), or the whole
        catalog ("full", the query's history items masked out: they are the user's known
        positives, and evaluation removes them too).

        Returns ``(loss, sums)``: ``sums`` are per-replica totals to SUM-reduce: ``examples``,
        ``positives``, ``retrieval_loss`` (sum of CE over positives), ``squared_error``,
        ``hits_at_10`` (positives whose item is in the top 10 of the softmax's candidates).
        """
        config = self.model_config
        query_inputs = self.preprocess_query(features)
        candidate_inputs = self.preprocess_candidate(features)
        forward = forward or self.forward_numeric
        query, candidate, rating = forward(query_inputs, candidate_inputs, training)
        labels = tf.cast(features["rating"], tf.float32)
        weights = tf.cast(labels >= config.positive_threshold, tf.float32)
        if config.negatives == "full":
            retrieval_loss, hits = self._full_softmax(
                query, query_inputs, candidate_inputs, weights, training
            )
        else:
            retrieval_loss, hits = self._sampled_softmax(
                query, candidate, candidate_inputs, weights, training, gather_candidates
            )
        # [B, 1]: Keras' MSE averages over the last axis, so [B] ratings would come back as the
        # batch *mean* (1/batch of the weight the flags give it) instead of a per-example sum.
        ranking_loss = self._tasks.ranking(labels=labels[:, None], predictions=rating[:, None])
        if config.rating_l2:
            penalty = self.ranking_head.id_penalty(
                query_inputs["user_id"], candidate_inputs["item_id"]
            )
            ranking_loss += config.rating_l2 * tf.reduce_sum(penalty)
        total = config.retrieval_weight * retrieval_loss + config.ranking_weight * ranking_loss
        sums = {
            "examples": tf.cast(tf.size(labels), tf.float32),
            "positives": tf.reduce_sum(weights),
            "retrieval_loss": retrieval_loss,
            "squared_error": tf.reduce_sum(tf.square(rating - labels)),
            "hits_at_10": hits,
        }
        return total / float(global_batch_size), sums

    def _catalog_embeddings(self, training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        """Candidate embeddings of the whole catalog ``[N, D]`` (float32), in catalog order, and
        the items' accidental-hit ids ``[N]``."""
        if self._catalog is None:
            raise ConfigError(
                "--negatives full/mixed needs the catalog's fields in the model's assets "
                "(a model dir written by an older version has none)"
            )
        inputs = self.preprocess_candidate(self._catalog)
        embeddings = tf.cast(self.candidate_tower(inputs, training=training), tf.float32)
        return embeddings, inputs["hit_id"]

    def _catalog_logits(self, query: tf.Tensor, training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        """``(catalog embeddings [N, D], logits [B, N])`` of the full softmax.

        Items with no train rating get -1e9: to training they are unknown, not disliked (p3's
        cold items would otherwise be pushed below everything, the opposite of what they need).
        """
        items, _ = self._catalog_embeddings(training)
        logits = tf.matmul(query, items, transpose_b=True) / self.model_config.temperature
        return items, tf.where(self._untrained_items, tf.constant(-1e9, logits.dtype), logits)

    def _full_softmax(self, query, query_inputs, candidate_inputs, weights, training):
        """Softmax over every catalog item: ``(sum of CE over positives, hits at 10)``."""
        _, logits = self._catalog_logits(query, training)
        # Catalog rows are preprocessor rows - 2 (0 = padding, 1 = unknown item).
        target = tf.cast(candidate_inputs["row"], tf.int32) - 2
        batch = tf.range(tf.shape(target)[0])
        known = target >= 0
        target = tf.maximum(target, 0)
        pairs = tf.stack([batch, target], axis=1)
        positive = tf.gather_nd(logits, pairs)
        if self.model_config.mask_history:
            logits = _masked_history(logits, query_inputs["history_rows"])
        logits = tf.tensor_scatter_nd_update(logits, pairs, positive)  # the target stays
        weights = weights * tf.cast(known, tf.float32)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=logits)
        rank = tf.reduce_sum(tf.cast(logits > positive[:, None], tf.int32), axis=1)
        hits = tf.reduce_sum(tf.cast(rank < 10, tf.float32) * weights)
        return tf.reduce_sum(loss * weights), hits

    def compute_user_losses(
        self, features: Mapping[str, tf.Tensor], *, global_batch_size: int
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """The losses of a batch of users (:func:`trainer.train_queries.user_batches`).

        Each user's query reads the input items (``history`` ``[B, H]``); one softmax over the
        whole catalog (the kept items, ``seen``, masked out, as evaluation removes them)
        scores every held-out target (``targets`` ``[B, H]``): the retrieval loss is the sum of
        their cross-entropies, the multinomial likelihood of Mult-DAE. The ranking head is fit
        on the same (user, target) pairs and their ``target_ratings``. Training only; sums as in
        :meth:`compute_losses`, counted per target.
        """
        config = self.model_config
        query_inputs = self.preprocess_query(features)
        query = tf.cast(self.query_tower(query_inputs, training=True), tf.float32)  # [B, D]
        items, logits = self._catalog_logits(query, training=True)  # [N, D], [B, N]
        if config.mask_history:
            logits = _masked_history(logits, self.preprocessor.item_rows(features["seen"]))
        target_ids = tf.convert_to_tensor(features["targets"])
        rows = tf.cast(self.preprocessor.item_rows(target_ids), tf.int32) - 2  # [B, H]
        labels = tf.cast(features["target_ratings"], tf.float32)
        known = rows >= 0
        rows = tf.maximum(rows, 0)
        weights = tf.cast(tf.logical_and(known, labels >= config.positive_threshold), tf.float32)
        target_logits = tf.gather(logits, rows, batch_dims=1)  # [B, H]
        normaliser = tf.reduce_logsumexp(logits, axis=1, keepdims=True)
        retrieval_loss = tf.reduce_sum((normaliser - target_logits) * weights)
        tenth = tf.math.top_k(logits, k=min(10, int(items.shape[0] or 10))).values[:, -1:]
        hits = tf.reduce_sum(tf.cast(target_logits >= tenth, tf.float32) * weights)

        user_ids = tf.convert_to_tensor(features["user_id"])
        rating = self.predict_rating(
            query, tf.gather(items, rows), user_ids, target_ids, training=True
        )  # [B, H]
        rated = tf.cast(known, tf.float32)
        errors = tf.square(rating - labels) * rated
        ranking_loss = self._tasks.ranking(
            labels=tf.boolean_mask(labels, known)[:, None],
            predictions=tf.boolean_mask(rating, known)[:, None],
        )
        if config.rating_l2:
            hash_ids = self.preprocessor.hash_ids
            user_terms = tf.broadcast_to(hash_ids(user_ids)[:, None], tf.shape(target_ids))
            penalty = self.ranking_head.id_penalty(user_terms, hash_ids(target_ids))
            ranking_loss += config.rating_l2 * tf.reduce_sum(penalty * rated)
        total = config.retrieval_weight * retrieval_loss + config.ranking_weight * ranking_loss
        sums = {
            "examples": tf.reduce_sum(rated),
            "positives": tf.reduce_sum(weights),
            "retrieval_loss": retrieval_loss,
            "squared_error": tf.reduce_sum(errors),
            "hits_at_10": hits,
        }
        return total / float(global_batch_size), sums

    def _sampled_softmax(
        self, query, candidate, candidate_inputs, weights, training, gather_candidates
    ):
        """TFRS's retrieval task over in-batch (+ sampled) candidates: ``(loss, hits at 10)``."""
        config = self.model_config
        hit_ids = candidate_inputs["hit_id"]
        probs = self.sampling_probability(candidate_inputs["row"])
        all_candidates, all_ids, all_probs = candidate, hit_ids, probs
        context = tf.distribute.get_replica_context()
        if gather_candidates and context is not None and context.num_replicas_in_sync > 1:
            all_candidates, all_ids, all_probs = _gather_local_first(
                context, (candidate, hit_ids, probs)
            )
        if config.negatives == "mixed":
            # Mixed negative sampling (Yang et al. 2020): uniform catalog items beside the
            # batch's. Every candidate's correction is its expected count under the mixture,
            # (batch size * popularity + samples / N): an item can arrive either way.
            items, item_hit_ids = self._catalog_embeddings(training)
            count = tf.shape(items)[0]
            sampled = tf.random.uniform([config.sampled_negatives], 0, count, dtype=tf.int32)
            sampled_ids = tf.gather(item_hit_ids, sampled)
            in_batch = tf.cast(tf.shape(all_candidates)[0], tf.float32)
            uniform = float(config.sampled_negatives) / tf.cast(count, tf.float32)
            all_probs = tf.concat(
                [
                    in_batch * all_probs + uniform,
                    in_batch * tf.gather(self._sampling_probability, sampled + 2) + uniform,
                ],
                axis=0,
            )
            all_candidates = tf.concat([all_candidates, tf.gather(items, sampled)], axis=0)
            all_ids = tf.concat([all_ids, sampled_ids], axis=0)
        loss = self._tasks.retrieval(
            query,
            all_candidates,
            sample_weight=weights,
            candidate_sampling_probability=all_probs if config.logq_correction else None,
            candidate_ids=all_ids if config.remove_accidental_hits else None,
            compute_metrics=False,
            compute_batch_metrics=False,
        )
        hits = in_batch_hits(query, all_candidates, hit_ids, all_ids, weights, 10)
        return loss, hits

    def forward_numeric(self, query_inputs: dict, candidate_inputs: dict, training: bool):
        """Numeric inputs -> ``(query [b, D], candidate [b, D], rating [b])``, float32."""
        query = self.query_tower(query_inputs, training=training)
        candidate = self.candidate_tower(candidate_inputs, training=training)
        rating = self.ranking_head(
            query,
            candidate,
            query_inputs["user_id"],
            candidate_inputs["item_id"],
            training=training,
        )
        return tf.cast(query, tf.float32), tf.cast(candidate, tf.float32), rating

    def rng_variables(self) -> list:
        """States of every dropout RNG; checkpointed so a resumed run draws the same masks."""
        seen, out = set(), []
        for layer in self._flatten_layers():
            for generator in getattr(layer, "_seed_generators", []):
                if id(generator.state) not in seen:
                    seen.add(id(generator.state))
                    out.append(generator.state)
        return out

    def bert_variables(self) -> list:
        """The trainable BERT weights (they get their own, lower learning rate)."""
        encoders = {
            id(self.query_encoder): self.query_encoder,
            id(self.candidate_encoder): self.candidate_encoder,
        }
        seen, out = set(), []
        for encoder in encoders.values():
            for v in encoder.trainable_variables:
                if id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
        return out


def _masked_history(logits: tf.Tensor, history_rows: tf.Tensor) -> tf.Tensor:
    """``logits`` ``[B, N]`` with each query's history items (preprocessor rows ``[B, H]``;
    catalog row = row - 2) set to -1e9: they are the user's known positives."""
    history = tf.cast(history_rows, tf.int32) - 2
    seen = tf.where(history >= 0)  # [M, 2]: (query, position)
    seen_pairs = tf.stack([tf.cast(seen[:, 0], tf.int32), tf.gather_nd(history, seen)], axis=1)
    return tf.tensor_scatter_nd_update(logits, seen_pairs, tf.fill([tf.shape(seen_pairs)[0]], -1e9))


def _gather_local_first(context, tensors):
    """All-gathers each tensor over replicas, rotated so this replica's rows come first.

    TFRS takes the positive of query ``i`` to be candidate ``i``; with this replica's block first
    that stays true and the other replicas' candidates become extra negatives.
    """
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    out = []
    for t in tensors:
        gathered = context.all_gather(t, axis=0)
        local = tf.shape(t)[0]
        out.append(tf.roll(gathered, shift=-replica * local, axis=0))
    return tuple(out)


def in_batch_hits(
    query: tf.Tensor,
    candidates: tf.Tensor,
    ids: tf.Tensor,
    candidate_ids: tf.Tensor,
    weights: tf.Tensor,
    k: int,
) -> tf.Tensor:
    """Weighted count of queries whose positive (candidate ``i``) ranks in the top ``k`` of the
    batch's candidates, other copies of the same item ignored. ``query`` ``[b, D]``,
    ``candidates`` ``[C, D]`` (C >= b), ``ids`` ``[b]``, ``candidate_ids`` ``[C]``."""
    scores = tf.matmul(query, candidates, transpose_b=True)
    positive = tf.linalg.diag_part(scores[:, : tf.shape(query)[0]])
    other = tf.not_equal(ids[:, None], candidate_ids[None, :])
    better = tf.logical_and(scores > positive[:, None], other)
    rank = tf.reduce_sum(tf.cast(better, tf.int32), axis=1)
    return tf.reduce_sum(tf.cast(rank < k, tf.float32) * weights)


# ----------------------------------------------------------------------------- build / save / load


def _make_encoders(
    config: ModelConfig, specs: Sequence[EncoderSpec] | None, seed: int
) -> tuple[TextEncoder, TextEncoder, list[EncoderSpec]]:
    def one(index: int) -> tuple[TextEncoder, EncoderSpec]:
        if specs is None:
            backbone, tokenizer, spec = load_backbone_and_tokenizer(
                config.preset, sequence_length=config.sequence_length, seed=seed + index
            )
        else:
            spec = specs[index]
            backbone, tokenizer = backbone_from_spec(spec)
        encoder = TextEncoder(
            backbone,
            tokenizer,
            config.sequence_length,
            config.pooling,
            name=f"text_encoder_{index}",
        )
        encoder.set_trainable_layers(bool(config.freeze_bert), config.train_top_layers)
        return encoder, spec

    query_encoder, query_spec = one(0)
    if config.share_encoder:
        return query_encoder, query_encoder, [query_spec]
    candidate_encoder, candidate_spec = one(1)
    return query_encoder, candidate_encoder, [query_spec, candidate_spec]


def build_model(
    config: ModelConfig,
    assets: ModelAssets,
    *,
    seed: int = 0,
    encoder_specs: Sequence[EncoderSpec] | None = None,
    fill_caches: bool = True,
) -> TwoTowerModel:
    """Builds every weight of the model (call under ``strategy.scope()`` when distributing).

    ``config`` must be resolved (no ``None``/``auto``: :meth:`TrainConfig.resolve`).
    ``encoder_specs``: rebuild the encoders from saved specs instead of loading the preset.
    ``fill_caches``: compute the text caches now (skip when weights are loaded next).
    """
    if config.freeze_bert is None or config.cache_text is None or config.query_text == "auto":
        raise ValueError("build_model needs a resolved ModelConfig (TrainConfig.resolve)")
    keras.utils.set_random_seed(seed)
    query_encoder, candidate_encoder, specs = _make_encoders(config, encoder_specs, seed)
    model = TwoTowerModel(config, assets, query_encoder, candidate_encoder)
    model.encoder_specs = [s.to_json() for s in specs]
    if fill_caches:
        model.refresh_text_caches()
    model(dummy_features(assets), training=False)  # creates every weight
    return model


def _write_json(path: str, value: object) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(value, indent=2, sort_keys=True))


def _read_json(path: str) -> object:
    if not tf.io.gfile.exists(path):
        raise ConfigError(
            f"{os.path.dirname(path)} is not a trained model dir: no {os.path.basename(path)}"
        )
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def save_trained(
    model: TwoTowerModel,
    config: TrainConfig,
    model_dir: str,
    extra_files: Mapping[str, object] | None = None,
) -> str:
    """Writes the model dir (layout in the module docstring) atomically; returns ``model_dir``.

    Everything goes to a temporary sibling first, then replaces ``model_dir`` (an older model
    there is moved aside and removed only after the rename), so readers never see half a model.
    ``extra_files``: more JSON files to write beside (name -> value), e.g. ``metrics.json``.
    """
    model_dir = model_dir.rstrip("/")
    parent = os.path.dirname(model_dir) or "."
    tf.io.gfile.makedirs(parent)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(model_dir)}-{uuid.uuid4().hex[:8]}")
    tf.io.gfile.makedirs(tmp)
    try:
        _write_json(os.path.join(tmp, CONFIG_FILE), config.to_dict())
        _write_json(os.path.join(tmp, ASSETS_FILE), dataclasses.asdict(model.assets))
        _write_json(os.path.join(tmp, ENCODERS_FILE), model.encoder_specs)
        weights = os.path.join(tmp, WEIGHTS_FILE)
        if tmp.startswith("gs://"):  # h5py writes local files only
            local = os.path.join("/tmp", f"{uuid.uuid4().hex}.weights.h5")
            model.save_weights(local)
            tf.io.gfile.copy(local, weights)
            os.remove(local)
        else:
            model.save_weights(weights)
        for name, value in (extra_files or {}).items():
            _write_json(os.path.join(tmp, name), value)
        old = None
        if tf.io.gfile.exists(model_dir):
            old = os.path.join(parent, f".old-{os.path.basename(model_dir)}-{uuid.uuid4().hex[:8]}")
            tf.io.gfile.rename(model_dir, old)
        tf.io.gfile.rename(tmp, model_dir)
        if old:
            tf.io.gfile.rmtree(old)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
    return model_dir


def load_trained(model_dir: str) -> tuple[TwoTowerModel, TrainConfig]:
    """Rebuilds the trained model from a model dir (no preset, wheel or data dir needed)."""
    config = TrainConfig.from_dict(_read_json(os.path.join(model_dir, CONFIG_FILE)))
    assets = ModelAssets(**_read_json(os.path.join(model_dir, ASSETS_FILE)))
    specs = [EncoderSpec(**s) for s in _read_json(os.path.join(model_dir, ENCODERS_FILE))]
    if config.model.freeze_bert is None or config.model.cache_text is None:
        raise ConfigError(f"{model_dir}/{CONFIG_FILE}: the saved config is not resolved")
    model = build_model(config.model, assets, encoder_specs=specs, fill_caches=False)
    weights = os.path.join(model_dir, WEIGHTS_FILE)
    if not tf.io.gfile.exists(weights):
        raise ConfigError(f"{model_dir} is not a trained model dir: no {WEIGHTS_FILE}")
    local = weights
    if weights.startswith("gs://"):
        local = os.path.join("/tmp", f"{uuid.uuid4().hex}.weights.h5")
        tf.io.gfile.copy(weights, local)
    try:
        model.load_weights(local)
    except (ValueError, KeyError, OSError) as e:
        # Keras lists every unmatched layer; the first lines say enough.
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"{weights} does not fit the model its {CONFIG_FILE} describes (written by another "
            f"version of this code, or a damaged file): {detail}"
        ) from e
    finally:
        if local != weights:
            os.remove(local)
    return model, config


# ----------------------------------------------------------------------------- evaluation


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
        self._items = _embed(model, "candidate", dict(catalog))

    @classmethod
    def from_model_dir(cls, model_dir: str, catalog: Mapping[str, np.ndarray]) -> ModelScorer:
        model, _ = load_trained(model_dir)
        return cls(model, catalog, name=os.path.basename(model_dir.rstrip("/")) or "model")

    def score(self, queries: dict[str, np.ndarray]) -> np.ndarray:
        return _embed(self.model, "query", queries) @ self._items.T

    def item_embeddings(self) -> np.ndarray:
        return self._items

    def predict_ratings(self, events: dict[str, np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(events["item_id"]), 1024):
            chunk = {k: v[start : start + 1024] for k, v in events.items()}
            q = _embed(self.model, "query", chunk)
            c = _embed(self.model, "candidate", chunk)
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


KEYS_OF_PAIR = ("user_id", "item_id")
_QUERY_KEYS = (*schema.QUERY_STRING_FEATURES, "history")


def _embed(
    model: TwoTowerModel, side: str, table: Mapping[str, np.ndarray], batch: int = 1024
) -> np.ndarray:
    """Embeds a table of raw features in batches (live text: cache hits, BERT for misses)."""
    keys = _QUERY_KEYS if side == "query" else schema.CANDIDATE_STRING_FEATURES
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
    dim = model.model_config.embedding_dim
    return np.concatenate(out) if out else np.zeros([0, dim], np.float32)


def copy_model_dir(source: str, destination: str) -> None:
    """Copies a local model dir (tests, export staging)."""
    shutil.copytree(source, destination)
