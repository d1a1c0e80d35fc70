"""History encoders (Keras 3): the user's rated items (and typed titles) -> one vector.

* :class:`SetEncoder`: an unordered bag (the whole history), items projected once per catalog
  row and gathered; attention + mean pooling.
* :class:`HistoryEncoder`: a recency-ordered sequence through one optional pre-norm transformer
  block, then attention + mean pooling.

Both take plain arguments and implement ``get_config``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.layers import IdDropout


class HistoryEncoder(keras.layers.Layer):
    """The user's rated items (and typed titles) -> one user-history vector ``[B, 2 d]``.

    Each history position is ``Dense(text vector) + Dense(id embedding)`` + a recency
    embedding; each typed title is ``Dense(its text vector)`` + a learned
    "title" type vector, through the same item projection, so a title lands where its item
    would. A learned summary token is prepended (an empty history still has one unmasked
    position), then optionally one pre-norm transformer block with a padding mask, then the
    concatenation of attention pooling (a learned query) and mean pooling over the unmasked
    positions. Any history length works: the bag is unbounded, recency indices past
    ``length`` share the last embedding.

    Inputs: ``table`` float32 ``[K, T]`` (text vectors) or ``None`` (ID-only), ``rows`` int
    ``[B, H]`` (rows of the table), ``ids`` ``[B, H, E]`` or ``None``, ``mask`` bool ``[B, H]``
    (True = a real item); ``titles`` float32 ``[B, P, T]`` and ``title_mask`` bool ``[B, P]``
    or ``None``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        length: int,
        transformer: bool,
        dropout: float,
        id_dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dim = dim
        self.heads = heads
        self.length = length
        self.use_transformer = transformer
        self.rate = dropout
        self.id_rate = id_dropout
        self.id_dropout = IdDropout(id_dropout, seed=7, name="history_id_dropout")
        self.item_proj = keras.layers.Dense(dim, name="item_proj")
        self.id_proj = keras.layers.Dense(dim, use_bias=False, name="id_proj")
        self.position = keras.layers.Embedding(length + 1, dim, name="position")
        self.dropout = keras.layers.Dropout(dropout)
        # Hand-written rather than keras_hub.layers.TransformerEncoder(2 * dim, heads,
        # activation="gelu", layer_norm_epsilon=1e-3, normalize_first=True): given the same
        # weights the two give the same outputs at inference (checked: max difference 0.0), but
        # in training KerasHub's block also drops the attention output before its residual add
        # and draws its two dropouts from their own seed streams, while this block drops only
        # the attention probabilities and reuses `self.dropout`; KerasHub also makes (and seeds)
        # its sublayers at build time. Trained models would differ, so the block stays.
        if transformer:
            self.norm1 = keras.layers.LayerNormalization(name="norm1")
            self.attention = keras.layers.MultiHeadAttention(
                heads, dim // heads, dropout=dropout, name="self_attention"
            )
            self.norm2 = keras.layers.LayerNormalization(name="norm2")
            # Named as Keras named them in a fresh process: the loop's checkpoint keys are
            # variable paths, which must not depend on what else the process built before.
            self.ffn = keras.Sequential(
                [
                    keras.layers.Dense(2 * dim, activation="gelu", name="dense"),
                    keras.layers.Dense(dim, name="dense_1"),
                ],
                name="ffn",
            )
        self.pool_norm = keras.layers.LayerNormalization(name="pool_norm")
        self.pool_key = keras.layers.Dense(dim, activation="tanh", name="pool_key")
        self.pool_score = keras.layers.Dense(1, use_bias=False, name="pool_query")

    def build(self, input_shape=None):
        self.summary = self.add_weight(
            shape=(1, 1, self.dim), initializer="zeros", name="summary_token"
        )
        self.title_type = self.add_weight(
            shape=(1, 1, self.dim), initializer="zeros", name="title_type"
        )
        self.built = True

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "dim": self.dim,
                "heads": self.heads,
                "length": self.length,
                "transformer": self.use_transformer,
                "dropout": self.rate,
                "id_dropout": self.id_rate,
            }
        )
        return config

    def call(
        self, table, rows, ids, mask, titles=None, title_mask=None, training: bool = False
    ) -> tf.Tensor:
        # Project the (small) text table once, then gather: B * H times cheaper than projecting
        # every history position. No table (ID-only model): the ids alone.
        x = None
        if table is not None:
            x = keras.ops.take(self.item_proj(table), rows, axis=0)
        if ids is not None:
            ids = self.id_proj(self.id_dropout(ids, training=training))
            x = ids if x is None else x + ids
        batch, length = keras.ops.shape(x)[0], keras.ops.shape(x)[1]
        recency = keras.ops.minimum(keras.ops.arange(length) + 1, self.length)
        x = x + self.position(recency)[None]
        summary = keras.ops.broadcast_to(
            keras.ops.cast(self.summary, x.dtype), (batch, 1, self.dim)
        )
        parts, valid = [summary, x], [keras.ops.ones_like(mask[:, :1]), mask]
        if titles is not None:
            parts.append(self.item_proj(titles) + keras.ops.cast(self.title_type, x.dtype))
            valid.append(title_mask)
        x = self.dropout(keras.ops.concatenate(parts, axis=1), training=training)
        valid = keras.ops.concatenate(valid, axis=1)  # [B, 1 + H (+ P)]
        if self.use_transformer:
            attention_mask = keras.ops.logical_and(valid[:, None, :], valid[:, :, None])
            h = self.norm1(x)
            x = x + self.attention(h, h, attention_mask=attention_mask, training=training)
            x = x + self.dropout(self.ffn(self.norm2(x)), training=training)
        x = keras.ops.cast(self.pool_norm(x), "float32")
        scores = keras.ops.cast(self.pool_score(self.pool_key(x))[..., 0], "float32")
        scores = keras.ops.where(valid, scores, keras.ops.full_like(scores, -1e9))
        weights = keras.ops.softmax(scores, axis=-1)
        attended = keras.ops.sum(x * weights[..., None], axis=1)
        # The mean leaves the summary token out: it is what an empty history reads as zero.
        items = keras.ops.cast(valid, "float32")[..., None] * keras.ops.concatenate(
            [keras.ops.zeros_like(x[:, :1]), x[:, 1:]], axis=1
        )
        count = keras.ops.maximum(keras.ops.sum(keras.ops.cast(valid, "float32"), 1) - 1.0, 1.0)
        mean = keras.ops.sum(items, axis=1) / count[:, None]
        return keras.ops.concatenate([attended, mean], axis=-1)


class SetEncoder(keras.layers.Layer):
    """An unordered bag of the user's items (and typed titles) -> ``[B, 2 d]``.

    Each item is ``Dense(text vector) + Dense(id embedding)``, computed once per *catalog row*
    and gathered (a history of ``H`` items costs ``B * H * d`` reads, not ``B * H`` dense
    layers: the whole-history query reads hundreds of items per user). Each typed title is
    ``Dense(its text vector)`` (the same projection, so a title lands where its item would) +
    a learned "title" vector. Out: attention pooling (a linear score per element, softmax over
    the bag) and mean pooling, concatenated and layer-normalised; an empty bag gives the
    normalised zero vector plus the learned offsets, never NaN.

    Inputs: ``text_table`` ``[R, T]`` or None (ID-only), ``id_table`` ``[R, E]`` or None (text
    only): one row per catalog row; ``rows`` int ``[B, H]`` (catalog rows, < 2 = padding or an
    unknown item, both ignored); ``titles`` ``[B, P, T]`` + ``title_mask`` ``[B, P]`` or None.
    """

    def __init__(self, dim: int, dropout: float, id_dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.rate = dropout
        self.id_rate = id_dropout
        self.id_dropout = IdDropout(id_dropout, seed=11, name="history_id_dropout")
        self.item_proj = keras.layers.Dense(dim, name="item_proj")
        self.id_proj = keras.layers.Dense(dim, use_bias=False, name="id_proj")
        self.score = keras.layers.Dense(1, name="pool_score")
        self.dropout = keras.layers.Dropout(dropout)
        self.norm = keras.layers.LayerNormalization(name="norm")

    def build(self, input_shape=None):
        self.title_type = self.add_weight(
            shape=(1, 1, self.dim), initializer="zeros", name="title_type"
        )
        self.built = True

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"dim": self.dim, "dropout": self.rate, "id_dropout": self.id_rate})
        return config

    def project(self, text_table, id_table) -> tuple:
        """The per-catalog-row item vectors ``(Dense(text) [R, d], Dense(ids) [R, d])`` (None
        where the table is). Constant at serving time: an export computes them once."""
        return (
            None if text_table is None else self.item_proj(text_table),
            None if id_table is None else self.id_proj(id_table),
        )

    def call(
        self,
        text_table,
        id_table,
        rows,
        titles=None,
        title_mask=None,
        training: bool = False,
        projected: bool = False,
    ) -> tf.Tensor:
        """``projected``: the tables are already :meth:`project`'s output."""
        rows = keras.ops.cast(rows, "int32")
        if projected and not training:
            return self._pool_projected(text_table, id_table, rows, titles, title_mask)
        if not projected:
            text_table, id_table = self.project(text_table, id_table)
        x = None
        if text_table is not None:
            x = keras.ops.take(text_table, rows, axis=0)
        if id_table is not None:
            ids = keras.ops.take(id_table, rows, axis=0)
            ids = self.id_dropout(ids, training=training)
            x = ids if x is None else x + ids
        valid = rows > 1
        if titles is not None:
            typed = self.item_proj(titles) + keras.ops.cast(self.title_type, titles.dtype)
            x = keras.ops.concatenate([x, keras.ops.cast(typed, x.dtype)], axis=1)
            valid = keras.ops.concatenate([valid, title_mask], axis=1)
        # Cast after the dropout: a Keras layer casts its inputs to the policy's compute dtype
        # (bfloat16 under mixed precision), and the pooling below mixes x with float32 weights.
        x = keras.ops.cast(self.dropout(x, training=training), "float32")
        weights = keras.ops.cast(valid, "float32")
        scores = keras.ops.where(valid, self.score(x)[..., 0], keras.ops.full_like(weights, -1e9))
        attention = keras.ops.softmax(scores, axis=-1) * weights  # all zeros for an empty bag
        attended = keras.ops.sum(x * attention[..., None], axis=1)
        count = keras.ops.maximum(keras.ops.sum(weights, axis=1, keepdims=True), 1.0)
        mean = keras.ops.sum(x * weights[..., None], axis=1) / count
        return self.norm(keras.ops.concatenate([attended, mean], axis=-1))

    def _pool_projected(self, text_table, id_table, rows, titles, title_mask) -> tf.Tensor:
        """:meth:`call` at inference on projected tables, the same pooling in fewer ops.

        What an export runs on every request. The training path materialises ``[B, H, d]``
        four times over (two gathers, their sum, the concatenation with the titles) and scores
        every position with a Dense; here the two tables are summed once (``[R, d]``), each
        catalog row is scored once and the scores gathered, and both poolings are one
        ``[B, 2, L] x [B, L, d]`` contraction per part (history, titles). The same outputs to
        float rounding (about 1e-7 on the demo export's query embeddings). A whole known-text
        call of the demo export, in process on one thread, went from 4.61 to 3.30 ms for a
        26-query batch and from 10.25 to 6.89 ms for 64 (median of 3).
        """
        tables = [t for t in (text_table, id_table) if t is not None]
        table = keras.ops.cast(tables[0] if len(tables) == 1 else tables[0] + tables[1], "float32")
        x = keras.ops.take(table, rows, axis=0)  # [B, H, d]
        # Cast: under mixed precision a Dense answers in bfloat16.
        scores = keras.ops.take(keras.ops.cast(self.score(table)[..., 0], "float32"), rows, axis=0)
        valid = rows > 1
        typed = None
        if titles is not None:
            typed = keras.ops.cast(
                self.item_proj(titles) + keras.ops.cast(self.title_type, titles.dtype), "float32"
            )
            typed_scores = keras.ops.cast(self.score(typed)[..., 0], "float32")
            scores = keras.ops.concatenate([scores, typed_scores], axis=1)
            valid = keras.ops.concatenate([valid, title_mask], axis=1)
        weights = keras.ops.cast(valid, "float32")
        scores = keras.ops.where(valid, scores, keras.ops.full_like(weights, -1e9))
        attention = keras.ops.softmax(scores, axis=-1) * weights
        count = keras.ops.maximum(keras.ops.sum(weights, axis=1, keepdims=True), 1.0)
        pool = keras.ops.stack([attention, weights / count], axis=1)  # [B, 2, L]
        length = keras.ops.shape(rows)[1]
        out = keras.ops.einsum("bkl,bld->bkd", pool[:, :, :length], x)
        if typed is not None:
            out = out + keras.ops.einsum("bkl,bld->bkd", pool[:, :, length:], typed)
        return self.norm(keras.ops.reshape(out, (-1, 2 * self.dim)))
