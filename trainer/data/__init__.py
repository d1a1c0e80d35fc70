"""MovieLens data: offline loading, text features, evaluation protocols and TFRecords.

``python -m trainer.data prepare --dataset ml-100k --output DIR`` builds a data directory;
:mod:`trainer.data.records` reads it.

The readers below load TensorFlow, so they are imported on first use (PEP 562): importing
``trainer.data.movielens`` (``DataError``) or running ``--help`` stays TensorFlow-free.
"""

from __future__ import annotations

import importlib
from typing import Any

from trainer.data.movielens import DataError

_FROM_RECORDS = ("load_catalog", "load_events", "load_users", "make_dataset", "read_manifest")

__all__ = ["DataError", *_FROM_RECORDS]


_SUBMODULES = ("features", "movielens", "prepare", "records", "schema", "splits")


def __getattr__(name: str) -> Any:
    if name in _FROM_RECORDS:
        return getattr(importlib.import_module("trainer.data.records"), name)
    if name in _SUBMODULES:  # `trainer.data.records` after a lazy import of it
        return importlib.import_module(f"trainer.data.{name}")
    raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
