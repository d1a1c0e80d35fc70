"""The one shape every command line shares: parse, run, and turn input errors into exit 2.

Each CLI (``trainer.task``, ``trainer.data``, ``trainer.evaluate``, ``trainer.export``,
``scoring.batch_score``, ``serving.server``, ``serving.client``) validates what it was given
and raises a :class:`UsageError` (or one of its own error classes, which derive from it) naming
the problem; :func:`run` prints ``error: <message>`` to stderr and returns 2, so a user sees
one line, never a traceback from deep inside TensorFlow.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence

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


def module_run(
    orig_argv: Sequence[str], scripts: Mapping[str, str] | None = None
) -> tuple[str | None, list[str]]:
    """The module a command line runs and its arguments.

    ``("scoring.batch_score", ["--help"])`` for ``python [opts] -m scoring.batch_score --help``,
    or for ``bt-batch-score --help`` when ``scripts`` maps that console script to the module;
    ``(None, [])`` for anything else (a script path, ``-c``, stdin).
    """
    argv = list(orig_argv)
    for i, arg in enumerate(argv[:2]):  # the script itself, or python's first argument
        script = os.path.basename(arg)
        if scripts and script in scripts:
            return scripts[script], argv[i + 1 :]
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m" and i + 1 < len(argv):
            return argv[i + 1], argv[i + 2 :]
        if arg.startswith("-m") and len(arg) > 2:
            return arg[2:], argv[i + 1 :]
        if arg in ("-c", "-") or not arg.startswith("-"):
            break  # a script path, a -c program or stdin: not `-m`
        i += 2 if arg in ("-X", "-W", "--check-hash-based-pycs") else 1
    return None, []


def answer_help_early(
    parsers: Mapping[str, Callable[[], argparse.ArgumentParser]],
    scripts: Mapping[str, str] | None = None,
    orig_argv: Sequence[str] | None = None,
) -> None:
    """Prints the help of ``python -m <module> --help`` and exits, before the module loads.

    For a package's ``__init__``, whose modules import TensorFlow (seconds) at their top:
    ``parsers`` maps a module name to its TensorFlow-free parser, ``scripts`` a console script
    to its module. Does nothing for any other command line (other modules, scripts, imports).
    """
    if orig_argv is None:
        orig_argv = getattr(sys, "orig_argv", [])
    module, args = module_run(orig_argv, scripts)
    if module in parsers and ("-h" in args or "--help" in args):
        parsers[module]().parse_args(["--help"])  # prints and exits 0


def module_doc(name: str) -> str:
    """The docstring of module ``name``, read from its source without running it."""
    spec = importlib.util.find_spec(name)  # imports the parent package only
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError):
        return ""
