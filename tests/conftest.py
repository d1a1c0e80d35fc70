"""Shared fixtures: tiny prepared data (synthetic, MovieLens layout) built once per session."""

from __future__ import annotations

import functools
import os
from typing import Protocol

import numpy as np
import pytest

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A prepared data dir of synthetic MovieLens-like data: 40 users, 60 items, 1,500 ratings."""
    from trainer.data.prepare import prepare_synthetic

    path = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_synthetic(path, num_users=40, num_items=60, num_ratings=1500, seed=0)
    return path


# The defaults (p2: the whole-history set encoder, typed titles, full-catalog softmax).
TINY_TRAIN_FLAGS = (
    "--preset", "tiny", "--epochs", "2", "--no-progress", "--batch-size", "128",
    "--user-batch-size", "16", "--user-passes", "4",
)  # fmt: skip


#: The tiny model's fixed item-item weight: a term large enough to reorder its lists.
TINY_ITEM_ITEM_WEIGHT = 0.5


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny-BERT two-tower model trained for two epochs on ``tiny_data_dir`` (split p2), its
    item-item term weighed in (``--item-item-weight``) so every export test serves it."""
    from trainer import task

    path = str(tmp_path_factory.mktemp("model") / "tiny")
    argv = ["--data", tiny_data_dir, "--split", "p2", "--model-dir", path, *TINY_TRAIN_FLAGS]
    argv += ["--item-item-weight", str(TINY_ITEM_ITEM_WEIGHT)]
    assert task.main(argv) == 0
    return path


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ScaNN export of ``tiny_model_dir``: returns ``<base>/movielens/1``."""
    from trainer.export import export
    from trainer.serving_module import IndexConfig

    base = str(tmp_path_factory.mktemp("export"))
    return export(tiny_model_dir, base, "movielens", IndexConfig(kind="scann", max_k=20))


# The fake export: hash-embedding towers instead of BERT inside the real export module, so the
# signatures, exclusions, MMR and padding are the real contract, built in seconds without training.
FAKE_BUCKETS, FAKE_DIM = 4096, 16


def build_fake_export(
    data_dir: str,
    export_base: str,
    *,
    split: str = "p2",
    model_name: str = "movielens",
    version: int | None = None,
    max_k: int = 20,
    seed: int = 0,
) -> str:
    """Saves a hash-embedding recommender with the export contract; returns the version dir.

    Query embedding = normalised mean of the history items' embeddings + a little of the user
    id's, so recommendations are near what the user watched (the notebook's explanations then
    have something to find). ``seed`` draws the embedding table, so exports built with
    different seeds answer differently. The towers embed to ``[N, FAKE_DIM]``.
    """
    import tensorflow as tf

    from trainer.data import records
    from trainer.export import save_export
    from trainer.serving_module import IndexConfig, RecommenderModule

    class HashTowers(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            rng = np.random.default_rng(seed)
            self.table = tf.Variable(rng.normal(size=(FAKE_BUCKETS, FAKE_DIM)).astype(np.float32))

        def embed(self, ids: tf.Tensor) -> tf.Tensor:
            return tf.gather(self.table, tf.strings.to_hash_bucket_fast(ids, FAKE_BUCKETS))

        def query(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
            history = features["history"]  # [B, H]
            mask = tf.cast(history != "", tf.float32)[..., None]
            mean = tf.reduce_sum(self.embed(history) * mask, 1) / tf.maximum(
                tf.reduce_sum(mask, 1), 1.0
            )
            return tf.math.l2_normalize(mean + 0.3 * self.embed(features["user_id"]), -1)

        def candidate(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
            return tf.math.l2_normalize(self.embed(features["item_id"]), -1)

    towers = HashTowers()
    catalog = records.load_catalog(data_dir, split)
    users = records.load_users(data_dir, split)
    item_embeddings = towers.candidate({"item_id": tf.constant(list(catalog["item_id"]))}).numpy()
    module = RecommenderModule(
        query_model=towers.query,
        candidate_model=towers.candidate,
        rating_fn=lambda q, c, u, i: 3.0 + tf.einsum("bd,bmd->bm", q, c),
        catalog=catalog,
        item_embeddings=item_embeddings,
        index=IndexConfig(kind="brute_force", max_k=max_k).resolved(len(catalog["item_id"])),
        history_length=users["history"].shape[1],
    )
    module.towers = towers  # tracked, so the table is saved with the module
    return save_export(module, export_base, model_name, version, users, catalog)


class FakeExportFactory(Protocol):
    def __call__(
        self,
        export_base: str,
        *,
        split: str = "p2",
        model_name: str = "movielens",
        version: int | None = None,
        max_k: int = 20,
        seed: int = 0,
    ) -> str: ...


@pytest.fixture(scope="session")
def fake_export_factory(tiny_data_dir: str) -> FakeExportFactory:
    """Builds fake exports of ``tiny_data_dir``: ``build(export_base, *, split="p2",
    model_name="movielens", version=None, max_k=20, seed=0)`` returns the version dir
    ``<export_base>/<model_name>/<version>`` (the next free version when ``None``)."""
    return functools.partial(build_fake_export, tiny_data_dir)


@pytest.fixture(scope="session")
def fake_export_base(
    fake_export_factory: FakeExportFactory, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The fake export of ``tiny_data_dir`` split p2 (brute force, the real signatures): returns
    the model base ``<tmp>/movielens`` holding version 1."""
    base = tmp_path_factory.mktemp("fake_export")
    fake_export_factory(str(base))
    return str(base / "movielens")
