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
