"""The one shape every command line shares: parse, run, and turn input errors into exit 2.

Each CLI (``trainer.task``, ``trainer.data``, ``trainer.evaluate``, ``trainer.export``,
``scoring.batch_score``, ``serving.server``, ``serving.client``) validates what it was given
and raises a :class:`UsageError` (or one of its own error classes, which derive from it) naming
the problem; :func:`run` prints ``error: <message>`` to stderr and returns 2, so a user sees
one line, never a traceback from deep inside TensorFlow.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

#: The exit status of a command given bad input (argparse's own).
USAGE_EXIT = 2


class UsageError(ValueError):
    """Input from outside (a flag, a file, a config) that cannot be used as given."""


def run(
    body: Callable[[], int | None],
    *,
    expected: tuple[type[BaseException], ...] = (),
) -> int:
    """Runs a command's body; returns its exit status.

    Args:
      body: the command, parsed arguments already bound; returns an exit status (``None`` = 0).
      expected: error types besides :class:`UsageError` that are the user's to fix (a missing
        file, say): printed as one line, exit status 2.
    """
    try:
        status = body()
    except (UsageError, *expected) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    return 0 if status is None else int(status)
