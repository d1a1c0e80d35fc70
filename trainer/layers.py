"""Small Keras 3 building blocks the towers, the history encoders and the ranking head share.

* :class:`IdDropout`: drops whole id embeddings (not elements) of a share of examples.
* :class:`MLP`: Dense + GELU (+ dropout) blocks over the last axis.
* :class:`Projection`: fused features -> MLP -> ``Dense(D)`` -> L2-normalised float32.

They take plain arguments and implement ``get_config``, so
``layer.__class__.from_config(layer.get_config())`` rebuilds them (weights not included).
They live apart from :mod:`trainer.towers` because :mod:`trainer.history` needs them too, and
the towers need the history encoders.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf


class IdDropout(keras.layers.Layer):
    """Zeroes the whole id embedding of a random share of examples (or of history positions)
    while training: ``x`` ``[..., E]``, one draw per vector along the last axis.

    Unlike element dropout it removes the id signal entirely for those rows, so the tower learns
    to score from text and attributes too (what a cold item has). No rescaling: at serving time
    every id is present, and the fused MLP sees the same distribution as on most training rows.

    Args:
      rate: share of vectors zeroed, in ``[0, 1)``.
      seed: seed of the layer's own random stream (None: drawn from the global seed).
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"rate": self.rate, "seed": self.seed})
        return config

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        """``x`` ``[..., E]`` -> ``[..., E]``, the same vectors or zeros."""
        if not training or self.rate <= 0:
            return x
        shape = (*keras.ops.shape(x)[:-1], 1)
        keep = keras.random.uniform(shape, seed=self.seed_generator) >= self.rate
        return x * keras.ops.cast(keep, x.dtype)


class MLP(keras.layers.Layer):
    """Dense + GELU (+ dropout) blocks over the last axis of inputs of any rank.

    Args:
      sizes: width of each Dense layer, in order.
      dropout: dropout rate after each block (0: none).
    """

    def __init__(self, sizes: Sequence[int], dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.sizes = [int(size) for size in sizes]
        self.rate = dropout
        self.dense = [
            keras.layers.Dense(size, activation="gelu", name=f"dense_{i}", dtype=self.dtype_policy)
            for i, size in enumerate(self.sizes)
        ]
        self.dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy) if dropout else None

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"sizes": list(self.sizes), "dropout": self.rate})
        return config

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        """``x`` ``[..., F]`` -> ``[..., sizes[-1]]`` (``x`` itself when ``sizes`` is empty)."""
        for dense in self.dense:
            x = dense(x)
            if self.dropout is not None:
                x = self.dropout(x, training=training)
        return x


class Projection(keras.layers.Layer):
    """Fused features -> LayerNorm -> MLP -> Dense(D) -> L2-normalised float32 ``[B, D]``.

    Args:
      hidden: the MLP's widths.
      dim: ``D``, the output size.
      dropout: the MLP's dropout rate.
    """

    def __init__(self, hidden: Sequence[int], dim: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.hidden_sizes = [int(size) for size in hidden]
        self.dim = dim
        self.rate = dropout
        self.hidden = MLP(self.hidden_sizes, dropout, name="mlp")
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.out = keras.layers.Dense(dim, name="out", dtype="float32")

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"hidden": list(self.hidden_sizes), "dim": self.dim, "dropout": self.rate})
        return config

    def call(
        self, x: tf.Tensor, training: bool = False, residual: tf.Tensor | None = None
    ) -> tf.Tensor:
        """``x`` ``[B, F]`` -> ``[B, D]``; ``residual`` ``[B, D]``, optional: added before the
        normalisation (the id term)."""
        x = self.out(keras.ops.cast(self.hidden(self.norm(x), training=training), "float32"))
        if residual is not None:
            x = x + keras.ops.cast(residual, "float32")
        return keras.ops.normalize(x, axis=-1, order=2)
