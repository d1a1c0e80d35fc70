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


def _answer_help_early() -> None:
    # `python -m trainer.export --help` imports this package before the module, whose top
    # imports TensorFlow: answer the help here (trainer.cli holds the TF-free parsers).
    argv = getattr(sys, "orig_argv", [])
    if "-h" in argv or "--help" in argv:
        from trainer.cli import answer_help_early

        answer_help_early(argv)


_answer_help_early()


def lazy_import(name: str):
    """``name``'s module, executed only when one of its attributes is first read.

    Keeps TensorFlow out of ``--help`` and argument errors: a CLI module can name a TF-backed
    module at its top and still answer ``--help`` in well under a second.
    """
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
