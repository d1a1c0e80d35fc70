"""Two-tower BERT retrieval recommender: data, towers, training, evaluation and export.

TensorFlow Recommenders needs Keras 2 (``tf.keras`` through ``tf-keras``) while KerasHub
needs Keras 3. Both live in one process only if ``TF_USE_LEGACY_KERAS=1`` is set before
TensorFlow is first imported, so the package sets it here, before anything imports TF.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    raise ImportError(
        "TensorFlow was imported before `trainer` without TF_USE_LEGACY_KERAS=1; "
        "TensorFlow Recommenders then cannot load. Import `trainer` first, or export "
        "TF_USE_LEGACY_KERAS=1 before starting Python."
    )

__version__ = "0.1.0"
