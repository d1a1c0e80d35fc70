"""What the model reads: the catalog and vocabularies it is built from, and raw string features
turned into the towers' numeric inputs.

* :class:`ModelAssets`: catalog ids/texts/popularity and the vocabularies (``assets.json``).
* :class:`FeaturePreprocessor`: raw string features -> hashed ids, vocabulary rows, catalog
  rows, multi-hot genres (host-side string work, no weights).
* :func:`profile_texts`, :func:`liked_titles`: the query text's pieces, built in the graph.
* :func:`cached_or_encoded`: cached text vectors where the cache holds the text, BERT's for
  the rest.
* :func:`dummy_features`: a small raw batch that builds every weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TFRS)
from trainer.config import ConfigError, ModelConfig
from trainer.data import schema
from trainer.text_encoder import TextCache, TextEncoder

#: OOV buckets of the categorical user fields (age band, gender, occupation).
FIELD_OOV = 8
#: Hash space of the candidate ids used to spot accidental hits (collisions are negligible).
_HIT_ID_BUCKETS = 2**62


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
NOTHING_LIKED = "nothing yet"


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
        pieces, tf.logical_and(pieces != "", tf.strings.lower(pieces) != NOTHING_LIKED)
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
    ``history_ids`` (hashed; with ``hash_history``), ``text`` (token dict when live, cache
    rows when cached).
    Candidate: ``item_id`` (hashed), ``row`` (catalog row), ``genres`` (multi-hot), ``year``,
    ``hit_id`` (int64 id for accidental-hit removal), ``text``.

    Args:
      id_buckets: hash buckets of the user and item ids.
      ages, genders, occupations: the user fields' vocabularies (``FIELD_OOV`` buckets beside).
      item_ids: the catalog, in row order (row = index + 2).
      genres, years: the candidate fields' vocabularies.
      hash_history: also hash the history's ids (the sequence encoders read them; the set
        encoder reads ids by catalog row).
    """

    def __init__(
        self,
        *,
        id_buckets: int,
        ages: Sequence[str],
        genders: Sequence[str],
        occupations: Sequence[str],
        item_ids: Sequence[str],
        genres: Sequence[str],
        years: Sequence[str],
        hash_history: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.id_buckets = id_buckets
        self.hash_history = hash_history
        self.vocabularies = {
            "ages": list(ages),
            "genders": list(genders),
            "occupations": list(occupations),
            "item_ids": list(item_ids),
            "genres": list(genres),
            "years": list(years),
        }
        self.hash_ids = keras.layers.Hashing(id_buckets, name="hash_ids")
        self.fields = {
            name: keras.layers.StringLookup(
                vocabulary=list(vocab) or ["unknown"],
                num_oov_indices=FIELD_OOV,
                name=f"lookup_{name}",
            )
            for name, vocab in (
                ("user_age", ages),
                ("user_gender", genders),
                ("user_occupation", occupations),
            )
        }
        self.field_buckets = max(layer.vocabulary_size() for layer in self.fields.values())
        self.item_rows = keras.layers.StringLookup(
            vocabulary=list(dict.fromkeys(item_ids)),
            mask_token="",
            num_oov_indices=1,
            name="lookup_item_row",
        )
        self.genres = keras.layers.StringLookup(
            vocabulary=list(genres) or ["unknown"],
            num_oov_indices=1,
            output_mode="multi_hot",
            name="lookup_genres",
        )
        self.years = keras.layers.StringLookup(
            vocabulary=list(years) or ["unknown"], num_oov_indices=1, name="lookup_year"
        )
        self.num_years = self.years.vocabulary_size()

    @classmethod
    def from_assets(cls, config: ModelConfig, assets: ModelAssets, **kwargs) -> FeaturePreprocessor:
        """The preprocessor of a model configured by ``config`` over ``assets``."""
        return cls(
            id_buckets=config.id_buckets,
            ages=assets.ages,
            genders=assets.genders,
            occupations=assets.occupations,
            item_ids=assets.item_ids,
            genres=assets.genres,
            years=assets.years,
            hash_history=config.history in ("attention", "transformer"),
            **kwargs,
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {"id_buckets": self.id_buckets, "hash_history": self.hash_history},
            **self.vocabularies,
        )
        return config

    def query(self, features: Mapping[str, tf.Tensor], text: dict | tf.Tensor) -> dict:
        """Raw query features (``[B]``, ``history`` ``[B, H]``) and the query's text input ->
        the query tower's inputs (``[B]`` each, ``history_*`` ``[B, H]``)."""
        history = tf.convert_to_tensor(features["history"])
        inputs = {
            "user_id": self.hash_ids(features["user_id"]),
            **{name: layer(features[name]) for name, layer in self.fields.items()},
            "history_rows": self.item_rows(history),
            "text": text,
        }
        if self.hash_history:
            inputs["history_ids"] = self.hash_ids(history)
        return inputs

    def candidate(self, features: Mapping[str, tf.Tensor], text: dict | tf.Tensor) -> dict:
        """Raw candidate features (``[N]``) and their text input -> the candidate tower's
        inputs (``[N]`` each, ``genres`` ``[N, G]``)."""
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
