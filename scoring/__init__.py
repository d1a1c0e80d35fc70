"""Batch scoring: every user's top-k from an export's own signatures, to sharded Parquet.

- :mod:`scoring.backends`: where the model runs (:class:`~scoring.backends.ExportScorer` in
  process, :class:`~scoring.backends.ServerScorer` behind TF Serving / ``serving.server``).
- :mod:`scoring.batch_score`: request batches, :func:`~scoring.batch_score.score_users` and
  the CLI ``python -m scoring.batch_score``.
- :mod:`scoring.shards`: the resumable Parquet shard writer and reader.
- :mod:`scoring.analysis`: metrics, exposure, genre mix, MMR trade-off and explanations of a
  scored table.
- :mod:`scoring.beam`: the same scoring on Apache Beam (``python -m scoring.beam``).
- :mod:`scoring.cli`: the TensorFlow-free parsers, so ``--help`` answers at once.

Importing ``trainer`` first sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow loads (TensorFlow
Recommenders and KerasHub share the process). ``python -m scoring.<cli> --help`` (and
``bt-batch-score --help``) is answered here, before the module's TensorFlow imports run.
"""

from __future__ import annotations

import sys

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from common.cli import UsageError


class ScoringError(UsageError):
    """Batch scoring cannot run as asked (bad flags, missing model or data, unreachable server)."""


def _answer_help_early() -> None:
    argv = getattr(sys, "orig_argv", [])
    if "-h" in argv or "--help" in argv:
        from scoring.cli import answer_help_early

        answer_help_early(argv)


_answer_help_early()
