"""Shared fixtures: tiny prepared data (synthetic, MovieLens layout) built once per session."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny-BERT two-tower model trained for two epochs on ``tiny_data_dir`` (split p2)."""
    from trainer import task

    path = str(tmp_path_factory.mktemp("model") / "tiny")
    argv = ["--data", tiny_data_dir, "--split", "p2", "--model-dir", path, *TINY_TRAIN_FLAGS]
    assert task.main(argv) == 0
    return path


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ScaNN export of ``tiny_model_dir``: returns ``<base>/movielens/1``."""
    from trainer.export import IndexConfig, export

    base = str(tmp_path_factory.mktemp("export"))
    return export(tiny_model_dir, base, "movielens", IndexConfig(kind="scann", max_k=20))


@pytest.fixture(scope="session")
def fake_export_base(tiny_data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/test_batch_score.py's hash-embedding export (brute force, the real signatures) of
    ``tiny_data_dir`` split p2: returns the model base ``<tmp>/movielens`` (version 1)."""
    from tests.test_batch_score import build_fake_export

    base = tmp_path_factory.mktemp("fake_export")
    build_fake_export(tiny_data_dir, str(base))
    return str(base / "movielens")
