"""The two towers (Keras 3): query features and candidate features -> L2-normalised ``[B, D]``.

Every tower works on *numeric* inputs: the string work (tokenising, hashing, vocabulary lookups)
is done beforehand by :class:`trainer.features.FeaturePreprocessor`, so the towers' math can be
compiled with XLA and the string ops stay on the host.

* :class:`QueryTower` / :class:`CandidateTower`: fuse text, history, ids and categorical fields
  (concat + MLP), project to ``D`` and L2-normalise (:class:`trainer.layers.Projection`).
* :func:`id_embedding`: the zero-initialised hashed-id embedding both towers use.

The text encoders are in :mod:`trainer.text_encoder`, the history encoders in
:mod:`trainer.history`, the rating head in :mod:`trainer.ranking_head`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import keras
import tensorflow as tf

from trainer.config import ModelConfig
from trainer.history import HistoryEncoder, SetEncoder
from trainer.layers import IdDropout, Projection

#: The categorical user fields, each its own embedding (hashed vocabulary rows).
USER_FIELDS = ("user_age", "user_gender", "user_occupation")


def id_embedding(buckets: int, dim: int, name: str) -> keras.layers.Embedding:
    """A hashed-id embedding ``[buckets, dim]``, zero-initialised: an id never trained on (a new
    user, a cold item) then reads exactly as a dropped id (:class:`IdDropout`), which the tower
    learned to handle, instead of as random noise."""
    return keras.layers.Embedding(buckets, dim, embeddings_initializer="zeros", name=name)


def _id_residual(
    use_id_embeddings: bool, id_residual: bool, buckets: int, dim: int, name: str
) -> keras.layers.Embedding | None:
    """The tower's D-dim id term, or None. Zeros at first, so an id never seen in training
    (a cold item, a new user) adds exactly nothing and the features alone place it."""
    if not (use_id_embeddings and id_residual):
        return None
    return id_embedding(buckets, dim, name)


def _dropped_ids(dropout, embedding, residual, ids, training: bool):
    """``(id embedding [B, E], residual [B, D] or None)`` with one id-dropout mask for both, so
    the examples that lose their id lose it entirely and the features learn to stand alone."""
    x = embedding(ids)
    if residual is None:
        return dropout(x, training=training), None
    size = keras.ops.shape(x)[-1]
    both = dropout(keras.ops.concatenate([x, residual(ids)], axis=-1), training=training)
    return both[:, :size], both[:, size:]


def _fuse(parts: Sequence[tf.Tensor], dtype: str) -> tf.Tensor:
    """The tower's feature pieces, each ``[B, .]``, concatenated in ``dtype``."""
    return keras.ops.concatenate([keras.ops.cast(p, dtype) for p in parts], -1)


def _config_arguments(config: ModelConfig, names: Sequence[str]) -> dict:
    return {name: getattr(config, name) for name in names}


def _plain(arguments: Mapping) -> dict:
    """``arguments`` with the lists Keras tracks on a layer as plain lists (for a config)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in arguments.items()}


#: What both towers read from a :class:`ModelConfig` (same names as its fields).
_SHARED_FIELDS = (
    "embedding_dim",
    "tower_layers",
    "dropout",
    "use_text",
    "use_side_features",
    "use_id_embeddings",
    "id_buckets",
    "id_dropout",
    "id_residual",
    "field_embedding_dim",
    "history_dim",
)


class QueryTower(keras.layers.Layer):
    """Query features -> L2-normalised ``[B, D]``.

    Inputs (numeric, from the preprocessor): ``text`` (token dict, cache rows or vectors),
    ``user_id``, ``user_age``, ``user_gender``, ``user_occupation`` int ``[B]`` (hashed),
    ``history_rows`` int ``[B, H]`` (catalog rows, 0 = padding), ``history_ids`` int ``[B, H]``
    (hashed ids), and with ``title_vectors``: ``titles`` (cache rows ``[B, P]`` or vectors
    ``[B, P, T]``) and ``title_mask`` bool ``[B, P]``.

    The model owns the text encoders, caches and the item id embedding, so this tower takes
    them as callables: ``get_config`` gives its plain arguments only, and the tower cannot be
    rebuilt from that config alone. :meth:`from_model_config` builds it from a
    :class:`ModelConfig`.

    Args:
      text_vectors: callable, text input -> ``[B, T]`` float32 (live encoder or cache).
      item_text_table: callable, catalog rows ``[B, H]`` -> ``(table [K, T], rows [B, H])``:
        the candidate side's text vectors of the catalog and where each history item is in it.
      item_id_embedding: the candidate tower's item id embedding, shared by the history.
      embedding_dim: ``D``; tower_layers, dropout: the projection's MLP.
      use_text, use_side_features, use_id_embeddings: which features the tower reads.
      id_buckets, id_embedding_dim: the user id embedding; id_dropout: its :class:`IdDropout`
        rate; id_residual: also a ``D``-dim id term added before the normalisation.
      field_buckets, field_embedding_dim: the categorical user fields' embeddings.
      history: ``"set"`` (:class:`SetEncoder`), ``"transformer"`` or ``"attention"``
        (:class:`HistoryEncoder`) or ``"none"``.
      history_dim: width of the text projection and of the history encoder; history_heads,
        history_length: the sequence encoder's; history_id_dropout: the history items'
        :class:`IdDropout` rate (only with text: without it a dropped id leaves nothing).
      title_vectors: callable, ``titles`` input -> ``[B, P, T]`` float32, or None.
      catalog_tables: callable, ``() -> (text [R, T] or None, ids [R, E] or None)``: the text
        vector and id embedding of every catalog row (the set encoder's item table).
    """

    _FIELDS = (
        *_SHARED_FIELDS,
        "id_embedding_dim",
        "history",
        "history_heads",
        "history_id_dropout",
    )

    def __init__(
        self,
        text_vectors: Callable,
        item_text_table: Callable,
        item_id_embedding: keras.layers.Embedding | None,
        *,
        embedding_dim: int,
        tower_layers: Sequence[int],
        dropout: float,
        use_text: bool = True,
        use_side_features: bool = True,
        use_id_embeddings: bool = True,
        id_buckets: int = 1,
        id_embedding_dim: int = 1,
        id_dropout: float = 0.0,
        id_residual: bool = False,
        field_buckets: int = 1,
        field_embedding_dim: int = 1,
        history: str = "none",
        history_dim: int = 1,
        history_heads: int = 1,
        history_length: int = 1,
        history_id_dropout: float = 0.0,
        title_vectors: Callable | None = None,
        catalog_tables: Callable | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._arguments = {
            "embedding_dim": embedding_dim,
            "tower_layers": [int(size) for size in tower_layers],
            "dropout": dropout,
            "use_text": use_text,
            "use_side_features": use_side_features,
            "use_id_embeddings": use_id_embeddings,
            "id_buckets": id_buckets,
            "id_embedding_dim": id_embedding_dim,
            "id_dropout": id_dropout,
            "id_residual": id_residual,
            "field_buckets": field_buckets,
            "field_embedding_dim": field_embedding_dim,
            "history": history,
            "history_dim": history_dim,
            "history_heads": history_heads,
            "history_length": history_length,
            "history_id_dropout": history_id_dropout,
        }
        self.use_text = use_text
        self.use_side_features = use_side_features
        self.use_id_embeddings = use_id_embeddings
        self.text_vectors = text_vectors
        self.title_vectors = title_vectors
        self.catalog_tables = catalog_tables
        # True once an export serves SetEncoder.project's output from constant tables.
        self.catalog_tables_projected = False
        self.item_text_table = item_text_table
        self.item_id_embedding = item_id_embedding
        # Sublayers in this order: unseeded initialisers draw their seeds as they are built.
        self.text_proj = keras.layers.Dense(history_dim, activation="gelu", name="text_proj")
        self.fields = {
            name: keras.layers.Embedding(field_buckets, field_embedding_dim, name=name)
            for name in USER_FIELDS
        }
        if use_id_embeddings:
            self.user_embedding = id_embedding(id_buckets, id_embedding_dim, "user_id_embedding")
            self.id_dropout = IdDropout(id_dropout, name="user_id_dropout")
        self.residual = _id_residual(
            use_id_embeddings, id_residual, id_buckets, embedding_dim, "user_id_residual"
        )
        self.history = _history_encoder(
            history,
            history_dim,
            history_heads,
            history_length,
            dropout,
            history_id_dropout if use_text else 0.0,
        )
        self.projection = Projection(tower_layers, embedding_dim, dropout, name="projection")

    @classmethod
    def from_model_config(
        cls,
        config: ModelConfig,
        *,
        text_vectors: Callable,
        item_text_table: Callable,
        item_id_embedding: keras.layers.Embedding | None,
        history_length: int,
        field_buckets: int,
        **kwargs,
    ) -> QueryTower:
        """The query tower ``config`` describes; ``kwargs``: the other arguments (callables,
        ``name``)."""
        return cls(
            text_vectors,
            item_text_table,
            item_id_embedding,
            history_length=history_length,
            field_buckets=field_buckets,
            **_config_arguments(config, cls._FIELDS),
            **kwargs,
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(_plain(self._arguments))
        return config

    def call(self, inputs: dict, training: bool = False) -> tf.Tensor:
        """The query features above -> ``[B, D]`` float32, L2-normalised."""
        parts = []
        if self.use_text:
            parts.append(self.text_proj(self.text_vectors(inputs["text"], training=training)))
        if self.use_side_features:
            parts += [layer(inputs[name]) for name, layer in self.fields.items()]
        residual = None
        if self.use_id_embeddings:
            ids, residual = _dropped_ids(
                self.id_dropout, self.user_embedding, self.residual, inputs["user_id"], training
            )
            parts.append(ids)
        if self.history is not None:
            parts.append(self._history(inputs, training))
        fused = _fuse(parts, self.compute_dtype)
        return self.projection(fused, training=training, residual=residual)

    def _history(self, inputs: dict, training: bool) -> tf.Tensor:
        """The history encoder's ``[B, 2 d]``."""
        titles, title_mask = None, None
        if self.title_vectors is not None:
            titles = self.title_vectors(inputs["titles"])
            title_mask = inputs["title_mask"]
        if isinstance(self.history, SetEncoder):
            text_table, id_table = self.catalog_tables()
            return self.history(
                text_table,
                id_table,
                inputs["history_rows"],
                titles,
                title_mask,
                training=training,
                projected=self.catalog_tables_projected,
            )
        rows = inputs["history_rows"]
        ids = None
        if self.use_id_embeddings:
            ids = self.item_id_embedding(inputs["history_ids"])
        table, table_rows = None, None
        if self.use_text:
            table, table_rows = self.item_text_table(rows)
        return self.history(table, table_rows, ids, rows > 0, titles, title_mask, training=training)


def _history_encoder(
    kind: str, dim: int, heads: int, length: int, dropout: float, id_dropout: float
) -> SetEncoder | HistoryEncoder | None:
    """The history encoder of ``kind`` (``"set"``, ``"transformer"``, ``"attention"``), or
    None for ``"none"``."""
    if kind == "set":
        return SetEncoder(dim, dropout, id_dropout=id_dropout, name="set_encoder")
    if kind == "none":
        return None
    return HistoryEncoder(
        dim,
        heads,
        length,
        transformer=kind == "transformer",
        dropout=dropout,
        id_dropout=id_dropout,
        name="history_encoder",
    )


class CandidateTower(keras.layers.Layer):
    """Candidate features -> L2-normalised ``[B, D]``.

    Inputs (numeric): ``text`` (token dict or cache rows), ``item_id`` int ``[B]`` (hashed),
    ``genres`` float ``[B, G]`` (multi-hot), ``year`` int ``[B]`` (vocabulary index).

    ``text_vectors`` and ``item_id_embedding`` are the model's (see :class:`QueryTower`):
    ``get_config`` gives the plain arguments only. :meth:`from_model_config` builds the tower
    from a :class:`ModelConfig`.

    Args:
      text_vectors: callable, text input -> ``[B, T]`` float32 (live encoder or cache).
      item_id_embedding: the item id embedding (shared with the query tower's history), or
        None without ids.
      num_years: rows of the year embedding.
      the others: as :class:`QueryTower`'s.
    """

    _FIELDS = _SHARED_FIELDS

    def __init__(
        self,
        text_vectors: Callable,
        item_id_embedding: keras.layers.Embedding | None,
        *,
        num_years: int,
        embedding_dim: int,
        tower_layers: Sequence[int],
        dropout: float,
        use_text: bool = True,
        use_side_features: bool = True,
        use_id_embeddings: bool = True,
        id_buckets: int = 1,
        id_dropout: float = 0.0,
        id_residual: bool = False,
        field_embedding_dim: int = 1,
        history_dim: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._arguments = {
            "num_years": num_years,
            "embedding_dim": embedding_dim,
            "tower_layers": [int(size) for size in tower_layers],
            "dropout": dropout,
            "use_text": use_text,
            "use_side_features": use_side_features,
            "use_id_embeddings": use_id_embeddings,
            "id_buckets": id_buckets,
            "id_dropout": id_dropout,
            "id_residual": id_residual,
            "field_embedding_dim": field_embedding_dim,
            "history_dim": history_dim,
        }
        self.use_text = use_text
        self.use_side_features = use_side_features
        self.use_id_embeddings = use_id_embeddings
        self.text_vectors = text_vectors
        self.item_id_embedding = item_id_embedding
        # Sublayers in this order: unseeded initialisers draw their seeds as they are built.
        self.text_proj = keras.layers.Dense(history_dim, activation="gelu", name="text_proj")
        self.genres = keras.layers.Dense(field_embedding_dim, use_bias=False, name="genres")
        self.year = keras.layers.Embedding(num_years, field_embedding_dim, name="year")
        if use_id_embeddings:
            self.id_dropout = IdDropout(id_dropout, name="item_id_dropout")
        self.residual = _id_residual(
            use_id_embeddings, id_residual, id_buckets, embedding_dim, "item_id_residual"
        )
        self.projection = Projection(tower_layers, embedding_dim, dropout, name="projection")

    @classmethod
    def from_model_config(
        cls,
        config: ModelConfig,
        *,
        text_vectors: Callable,
        item_id_embedding: keras.layers.Embedding | None,
        num_years: int,
        **kwargs,
    ) -> CandidateTower:
        """The candidate tower ``config`` describes; ``kwargs``: e.g. ``name``."""
        return cls(
            text_vectors,
            item_id_embedding,
            num_years=num_years,
            **_config_arguments(config, cls._FIELDS),
            **kwargs,
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(_plain(self._arguments))
        return config

    def call(self, inputs: dict, training: bool = False) -> tf.Tensor:
        """The candidate features above -> ``[B, D]`` float32, L2-normalised."""
        parts = []
        if self.use_text:
            parts.append(self.text_proj(self.text_vectors(inputs["text"], training=training)))
        if self.use_side_features:
            parts += [self.genres(inputs["genres"]), self.year(inputs["year"])]
        residual = None
        if self.use_id_embeddings:
            ids, residual = _dropped_ids(
                self.id_dropout, self.item_id_embedding, self.residual, inputs["item_id"], training
            )
            parts.append(ids)
        fused = _fuse(parts, self.compute_dtype)
        return self.projection(fused, training=training, residual=residual)
