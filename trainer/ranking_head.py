"""The rating head (Keras 3): a query and a candidate embedding (and their ids) -> a rating.

``[q, c, q * c]`` -> DCN-v2 cross layers (:class:`Cross`, keras-rs's ``FeatureCross``) -> MLP
-> rating, plus biased matrix-factorisation terms of the user and item ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import keras_rs
import tensorflow as tf

from trainer.layers import MLP


class Cross(keras_rs.layers.FeatureCross):
    """keras-rs's DCN-v2 cross layer, full rank: ``x0``, ``x`` ``[..., F]`` -> ``x0 * (W x + b)
    + x`` ``[..., F]``.

    Three things are kept from the hand-written layer it replaced, so that saved models and
    seeded runs stay as they were:

    * the class name: ``model.weights.h5`` names the layers of a list after their class, so
      model dirs written before still load;
    * the inner Dense's name, ``dense``: the loop's checkpoint keys are variable paths, and
      keras-rs leaves it unnamed (a name from Keras's global counter);
    * when the kernel's seed is drawn: with ``kernel_initializer=None`` Keras draws it as the
      weight is made, once, at the first call; ``"glorot_uniform"`` would draw one when this
      layer is made and keras-rs's clone of it another.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("kernel_initializer", None)  # None: glorot_uniform, seeded at build
        super().__init__(**kwargs)

    def build(self, input_shape) -> None:
        super().build(input_shape)
        self.dense.name = "dense"  # before it builds: its variables' paths use the name


class RankingHead(keras.layers.Layer):
    """``[q, c, q * c]`` -> optional cross layers -> MLP -> rating ``[...]`` (float32), plus the
    biased matrix factorisation terms ``b_user + b_item + <p_user, p_item>`` when given ids.

    The towers' embeddings are shaped by the retrieval task (which items a user *watches*); a
    rating also needs how *generous* a user is and how *liked* an item is, which the normalised
    embeddings hardly carry (p1 train RMSE stalled at 0.97 without these terms). The bias and
    factor tables are zero-initialised (factors near zero), so an id never trained on, such as a
    cold item, adds nothing and the head falls back on the embeddings.

    Runs in float32 whatever the global policy: it is small, and its output is a regression.
    Works on any leading shape (``[B, D]`` pairs or ``[B, M, D]`` candidate lists; the ids are
    then ``[B]`` and ``[B]`` or ``[B, M]``).

    Args:
      layers: the MLP's widths.
      cross_layers: how many full-rank DCN-v2 cross layers, ``x0 * (W x + b) + x``, come first.
      dropout: the MLP's dropout rate.
      initial_rating: the output bias at the start (about the mean rating).
      id_buckets: rows of the user and item id tables (0: no id terms).
      factor_dim: ``F``, the size of each id's factor vector beside its bias.
    """

    def __init__(
        self,
        layers: Sequence[int],
        cross_layers: int,
        dropout: float,
        initial_rating: float = 3.5,
        id_buckets: int = 0,
        factor_dim: int = 0,
        **kwargs,
    ):
        kwargs["dtype"] = "float32"  # also over a saved config's dtype: always float32
        super().__init__(**kwargs)
        self.layer_sizes = [int(size) for size in layers]
        self.rate = dropout
        self.initial_rating = initial_rating
        self.id_buckets = id_buckets
        self.factor_dim = factor_dim
        self.crosses = [Cross(name=f"cross_{i}", dtype="float32") for i in range(cross_layers)]
        self.mlp = MLP(self.layer_sizes, dropout, name="mlp", dtype="float32")
        self.out = keras.layers.Dense(
            1,
            name="rating",
            dtype="float32",
            bias_initializer=keras.initializers.Constant(initial_rating),
        )
        self.uses_ids = id_buckets > 0
        if self.uses_ids:
            # One table per side: [bias, factors...].
            self.user_terms, self.item_terms = (
                keras.layers.Embedding(
                    id_buckets,
                    1 + factor_dim,
                    embeddings_initializer=keras.initializers.RandomNormal(stddev=1e-3),
                    name=name,
                    dtype="float32",
                )
                for name in ("user_terms", "item_terms")
            )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "layers": list(self.layer_sizes),
                "cross_layers": len(self.crosses),
                "dropout": self.rate,
                "initial_rating": self.initial_rating,
                "id_buckets": self.id_buckets,
                "factor_dim": self.factor_dim,
            }
        )
        return config

    def call(
        self,
        query: tf.Tensor,
        candidate: tf.Tensor,
        user: tf.Tensor | None = None,
        item: tf.Tensor | None = None,
        training: bool = False,
    ) -> tf.Tensor:
        """``query`` ``[B, D]``, ``candidate`` ``[B, D]`` or ``[B, M, D]``, ``user`` ``[B]``,
        ``item`` ``[B]`` or ``[B, M]`` (hashed ids) -> rating ``[B]`` or ``[B, M]`` float32."""
        query = keras.ops.cast(query, "float32")
        candidate = keras.ops.cast(candidate, "float32")
        if len(query.shape) < len(candidate.shape):  # [B, D] against [B, M, D]
            query = keras.ops.expand_dims(query, -2)
        query = keras.ops.broadcast_to(query, keras.ops.shape(candidate))
        x0 = keras.ops.concatenate([query, candidate, query * candidate], axis=-1)
        x = x0
        for cross in self.crosses:
            x = cross(x0, x)
        rating = self.out(self.mlp(x, training=training))[..., 0]
        if not self.uses_ids:
            return rating
        if user is None or item is None:
            raise ValueError("this ranking head reads user and item ids: pass both")
        u = self.user_terms(user)  # [B, 1 + F]
        i = self.item_terms(item)  # [B, 1 + F] or [B, M, 1 + F]
        if len(u.shape) < len(i.shape):
            u = keras.ops.expand_dims(u, -2)
        return rating + u[..., 0] + i[..., 0] + keras.ops.sum(u[..., 1:] * i[..., 1:], axis=-1)

    def id_penalty(self, user: tf.Tensor, item: tf.Tensor) -> tf.Tensor:
        """Squared norm of each pair's id terms ``[B]``: the classic MF regulariser, which
        (unlike weight decay) weighs an id by how often it is seen. Zeros without id terms."""
        if not self.uses_ids:
            return keras.ops.zeros(keras.ops.shape(user), "float32")
        terms = keras.ops.concatenate([self.user_terms(user), self.item_terms(item)], axis=-1)
        return keras.ops.sum(keras.ops.square(terms), axis=-1)
