"""The two-tower retrieval + ranking model and how it is built.

The model is Keras 3 (KerasHub BERT inside); TFRS's tasks are Keras 2 objects with no weights
(:class:`trainer.losses.Tasks`), called as plain functions on tensors from
:meth:`TwoTowerModel.compute_losses`, which the loop runs inside a ``tf.function`` (AutoGraph
on: ``tfrs.tasks.Retrieval`` needs it).

Public API used by the loop, the export and the evaluation:

* :func:`build_model` (its weights saved and loaded by :mod:`trainer.model_dir`)
* :meth:`TwoTowerModel.query_embeddings`, :meth:`TwoTowerModel.candidate_embeddings` (raw
  string features in, L2-normalised float32 ``[B, D]`` out, plus the popularity-prior column
  with ``popularity_prior``: ``[B, retrieval_dim]``), :meth:`TwoTowerModel.predict_rating`
* :meth:`TwoTowerModel.set_text_mode` (``"live"``: raw text through BERT, what an export wants;
  ``"cached"``: precomputed vectors, what frozen-BERT training uses)
* :meth:`TwoTowerModel.compute_losses` / :meth:`TwoTowerModel.compute_user_losses`: one
  replica's training losses (the softmaxes themselves are in :mod:`trainer.losses`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TFRS)
from trainer import losses
from trainer.config import ConfigError, ModelConfig
from trainer.features import (
    FeaturePreprocessor,
    ModelAssets,
    cached_or_encoded,
    dummy_features,
    liked_titles,
    profile_texts,
)
from trainer.item_item import MAX_ITEMS as MAX_ITEM_ITEM_ITEMS
from trainer.ranking_head import RankingHead
from trainer.text_encoder import (
    EncoderSpec,
    TextCache,
    TextEncoder,
    backbone_from_spec,
    load_backbone_and_tokenizer,
)
from trainer.towers import CandidateTower, QueryTower, id_embedding


class TwoTowerModel(keras.Model):
    """Query tower, candidate tower (sharing item id embeddings, optionally one BERT), ranking
    head, text caches and the string preprocessor.

    Build with :func:`build_model` (from a preset) or :func:`trainer.model_dir.load_trained`
    (from a model dir).
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
        self.preprocessor = FeaturePreprocessor.from_assets(config, assets, name="preprocessor")
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
        # The popularity prior: log(1 + train count) by preprocessor row, and its weight, 0 in
        # training and chosen on the valid part after it (trainer.validation.choose_prior_weight);
        # saved with the weights, read by the export.
        # ... plus b for each item nobody rated in train (cold or new items), b chosen with w:
        # their cosines run low (never a positive in training), so the prior's neutral log
        # count alone leaves them under-ranked (p3: 15% of top-10 slots, 38% of valid truth).
        self._untrained_by_row = tf.constant(untrained_by_row(assets.popularity))
        self.prior_weight = self.new_item_bias = self.prior_log_count = None
        if config.popularity_prior:
            neutral = log_popularity_by_row(assets.popularity)
            self.prior_weight = self.add_weight(
                shape=(), initializer="zeros", trainable=False, name="popularity_prior_weight"
            )
            self.new_item_bias = self.add_weight(
                shape=(), initializer="zeros", trainable=False, name="new_item_bias"
            )
            # The log counts the prior reads, a weight because the unrated items' entries may
            # become their content guess after training (trainer.validation.choose_prior_weight,
            # trainer.content_prior); built neutral, as files written before it load.
            self.prior_log_count = self.add_weight(
                shape=neutral.shape,
                initializer=keras.initializers.Constant(neutral),
                trainable=False,
                name="prior_log_count",
                dtype="float32",
                autocast=False,  # read in float32 under mixed precision, like the untrained flags
            )
        # The item-item term of the served score (trainer.item_item): EASE's B in catalog
        # order and its blend weight α, both 0 in training and fit on the valid part after it
        # (trainer.validation.choose_item_item); dense, so only for catalogs up to MAX_ITEMS.
        # item_item_neighbours: how many text neighbours an unrated item's column of B was
        # filled from (0: none, as EASE), so a catalog's items the model never had are alike.
        self.item_item = self.item_item_weight = self.item_item_neighbours = None
        if config.item_item and len(assets.item_ids) <= MAX_ITEM_ITEM_ITEMS:
            size = len(assets.item_ids)
            self.item_item, self.item_item_weight, self.item_item_neighbours = (
                self.add_weight(
                    shape=shape,
                    initializer="zeros",
                    trainable=False,
                    name=name,
                    dtype="float32",
                    autocast=False,
                )
                for name, shape in (
                    ("item_item", (size, size)),
                    ("item_item_weight", ()),
                    ("item_item_neighbours", ()),
                )
            )
        # The hashed id of each catalog row (rows 0 and 1, padding and unknown, are masked).
        self._catalog_hashed_ids = self.preprocessor.hash_ids(
            tf.constant(["", "[UNK]", *assets.item_ids])
        )
        self.item_id_embedding = None
        if config.use_id_embeddings:
            self.item_id_embedding = id_embedding(
                config.id_buckets, config.id_embedding_dim, "item_id_embedding"
            )
        self.query_tower = QueryTower.from_model_config(
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
        self.candidate_tower = CandidateTower.from_model_config(
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
        self.tasks = losses.Tasks(config)

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

    @property
    def retrieval_dim(self) -> int:
        """Width of the public embeddings: ``D``, plus the popularity-prior column with
        ``popularity_prior`` (:meth:`with_prior_columns`)."""
        return self.model_config.embedding_dim + int(self.prior_weight is not None)

    def with_prior_columns(
        self, query: tf.Tensor | None = None, candidate: tf.Tensor | None = None, rows=None
    ) -> tf.Tensor:
        """The popularity prior as one more column: ``query`` ``[B, D]`` -> ``[B, D + 1]``
        (the column holds 1), or ``candidate`` ``[B, D]`` with its preprocessor ``rows``
        ``[B]`` -> ``[B, D + 1]`` (the column holds ``w * log(1 + count)``,
        :func:`log_popularity_by_row`, plus the new-item bias ``b`` for an item nobody rated in
        train, :func:`untrained_by_row`). Their inner product is ``cosine + w * log(1 + count)
        (+ b)``.
        Unchanged without a prior.

        The weight sits on the candidate side because ScaNN partitions the candidates: with
        ``log(1 + count)`` itself there (up to ~6.5 beside unit vectors) its k-means leaves
        split by popularity, not by direction, and searching leaves / 16 of 1,000 leaves over
        1M items found 0.80 of the exact top 10 (it took 4x the leaves to reach 0.95).
        """
        if self.prior_weight is None:
            return query if candidate is None else candidate
        if candidate is None:
            return tf.concat([query, tf.ones([tf.shape(query)[0], 1], query.dtype)], axis=-1)
        terms = self.prior_terms(rows)
        column = terms[:, :1] * self.prior_weight + terms[:, 1:] * self.new_item_bias
        return tf.concat([candidate, tf.cast(column, candidate.dtype)], axis=-1)

    def prior_terms(self, rows: tf.Tensor) -> tf.Tensor:
        """Preprocessor ``rows`` ``[B]`` -> ``[B, 2]`` float32: each item's ``log(1 + train
        count)`` (:attr:`prior_log_count`: :func:`log_popularity_by_row`, or its content guess
        for an item nobody rated) and 1 where nobody rated it in train
        (:func:`untrained_by_row`). The prior's column is ``w`` times the first plus ``b``
        times the second."""
        return tf.stack(
            [tf.gather(self.prior_log_count, rows), tf.gather(self._untrained_by_row, rows)], -1
        )

    def query_embeddings(
        self, features: Mapping[str, tf.Tensor], training: bool = False
    ) -> tf.Tensor:
        """Raw query features (``user_*``, ``query_text`` ``[B]``, ``history`` ``[B, H]``; extra
        keys ignored) -> float32 ``[B, retrieval_dim]`` (L2-normalised ``[B, D]`` + the
        popularity-prior column)."""
        query = self.query_tower(self.preprocess_query(features), training=training)
        return self.with_prior_columns(query=query)

    def candidate_embeddings(
        self, features: Mapping[str, tf.Tensor], training: bool = False
    ) -> tf.Tensor:
        """Raw candidate features (``item_*`` ``[N]``) -> float32 ``[N, retrieval_dim]``."""
        inputs = self.preprocess_candidate(features)
        candidate = self.candidate_tower(inputs, training=training)
        return self.with_prior_columns(candidate=candidate, rows=inputs["row"])

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
        ``item_ids`` ``[B]`` or ``[B, M]`` are the raw string ids of the pairs. Embeddings
        with the popularity-prior column are read without it."""
        hash_ids = self.preprocessor.hash_ids
        dim = self.model_config.embedding_dim
        return self.ranking_head(
            query_emb[..., :dim],
            cand_emb[..., :dim],
            hash_ids(user_ids),
            hash_ids(item_ids),
            training=training,
        )

    def call(self, features: Mapping[str, tf.Tensor], training: bool = False) -> dict:
        query = self.query_embeddings(features, training=training)
        candidate = self.candidate_embeddings(features, training=training)
        rating = self.predict_rating(
            query, candidate, features["user_id"], features["item_id"], training=training
        )
        return {"query": query, "candidate": candidate, "rating": rating}

    def sampling_probability(self, rows: tf.Tensor) -> tf.Tensor:
        """Preprocessor rows (catalog row + 2) ``[...]`` -> each one's share of the train
        positives ``[...]`` (the logQ correction)."""
        return tf.gather(self._sampling_probability, rows)

    # ------------------------------------------------------------------ losses

    def compute_losses(
        self,
        features: Mapping[str, tf.Tensor],
        *,
        global_batch_size: int,
        training: bool = True,
        gather_candidates: bool = False,
        forward: Callable | None = None,
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """Weighted retrieval + ranking loss of one replica's batch of rated events, scaled by
        the *global* batch: :func:`trainer.losses.event_losses`."""
        return losses.event_losses(
            self,
            features,
            global_batch_size=global_batch_size,
            training=training,
            gather_candidates=gather_candidates,
            forward=forward,
        )

    def compute_user_losses(
        self, features: Mapping[str, tf.Tensor], *, global_batch_size: int
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """The losses of a batch of users (:func:`trainer.train_queries.user_batches`):
        :func:`trainer.losses.user_losses`."""
        return losses.user_losses(self, features, global_batch_size=global_batch_size)

    def catalog_embeddings(self, training: bool) -> tuple[tf.Tensor, tf.Tensor]:
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

    def catalog_logits(self, query: tf.Tensor, training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        """``query`` ``[B, D]`` -> ``(catalog embeddings [N, D], logits [B, N])`` of the full
        softmax.

        Items with no train rating get -1e9: to training they are unknown, not disliked (p3's
        cold items would otherwise be pushed below everything, the opposite of what they need).
        """
        items, _ = self.catalog_embeddings(training)
        logits = tf.matmul(query, items, transpose_b=True) / self.model_config.temperature
        masked = tf.constant(losses.MASKED_LOGIT, logits.dtype)
        return items, tf.where(self._untrained_items, masked, logits)

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

    def post_training_variables(self) -> list:
        """The model's own variables set after training (on the valid part), in the order they
        were added to the model over its versions: the new-item bias, the prior's log-count
        table and the item-item term. Every training step reads their built values (b = 0, the
        neutral table, no term), so weights or checkpoints written before one existed load
        without it. The prior's weight, older than all of them, is not listed."""
        return [
            v
            for v in (
                self.new_item_bias,
                self.prior_log_count,
                self.item_item,
                self.item_item_weight,
                self.item_item_neighbours,
            )
            if v is not None
        ]

    def load_own_variables(self, store) -> None:
        """Keras's loader, which also reads weights files written before the new-item bias,
        the prior's log-count table, the item-item term or its new-item fill existed: they lack
        the last own variables, which keep their built values (b = 0, the neutral table, α = 0,
        no fill: what those versions served)."""
        own = self._trainable_variables + self._non_trainable_variables
        later = self.post_training_variables()
        missing = len(own) - len(store.keys())
        if 0 < missing <= len(later) and all(
            a is b for a, b in zip(own[-missing:], later[-missing:], strict=True)
        ):
            for i, variable in enumerate(own[:-missing]):
                variable.assign(store[f"{i}"])
            return
        super().load_own_variables(store)

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


def untrained_by_row(popularity: Sequence[float]) -> np.ndarray:
    """``[N + 2]`` float32: 1 for each catalog item nobody rated in train and for the unknown
    row (an item the model never saw), 0 for the rated items and the padding row."""
    untrained = (np.asarray(popularity, np.float64) <= 0).astype(np.float32)
    return np.concatenate([[0.0, 1.0], untrained]).astype(np.float32)


def log_popularity_by_row(
    popularity: Sequence[float], guess: Sequence[float] | None = None
) -> np.ndarray:
    """The prior's candidate column by preprocessor row ``[N + 2]``: ``log(1 + train count)``
    of each catalog item; an item nobody rated in train (p3's cold movies, a new item) gets
    its ``guess`` ``[N]`` (:func:`trainer.content_prior.predicted_log_counts`) or, without one,
    the mean over the rated items, as do the padding / unknown rows: to the prior they are
    unknown, not unpopular (as the training softmax leaves them out rather than pushing them
    down)."""
    counts = np.asarray(popularity, np.float64)
    logs = np.log1p(np.maximum(counts, 0.0))
    rated = counts > 0
    neutral = float(logs[rated].mean()) if rated.any() else 0.0
    unrated = neutral if guess is None else np.asarray(guess, np.float64)
    logs = np.where(rated, logs, unrated)
    return np.concatenate([[neutral, neutral], logs]).astype(np.float32)


def _make_encoders(
    config: ModelConfig, specs: Sequence[EncoderSpec] | None, seed: int
) -> tuple[TextEncoder, TextEncoder, list[EncoderSpec]]:
    """``(query encoder, candidate encoder, specs)``: from the preset (``specs`` None, tower
    ``i`` seeded ``seed + i``) or rebuilt from saved specs; one encoder for both towers when
    ``config.share_encoder``."""

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
