"""MovieLens data: offline loading, text features, evaluation protocols and TFRecords.

``python -m trainer.data prepare --dataset ml-100k --output DIR`` builds a data directory;
:mod:`trainer.data.records` reads it.
"""

from trainer.data.movielens import DataError
from trainer.data.records import (
    load_catalog,
    load_events,
    load_users,
    make_dataset,
    read_manifest,
)

__all__ = [
    "DataError",
    "load_catalog",
    "load_events",
    "load_users",
    "make_dataset",
    "read_manifest",
]
