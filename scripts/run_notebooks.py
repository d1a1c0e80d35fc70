"""Executes the notebooks with their default parameters and saves them WITH their outputs.

``nice -n 10 .venv/bin/python scripts/run_notebooks.py [NAME.ipynb ...]``

Runs ``train_and_evaluate.ipynb`` (MovieLens-100K, MiniLM, one epoch: it writes
``runs/notebook/``) and then ``batch_scoring.ipynb`` over what it wrote, each in a fresh
``python3`` kernel of this interpreter with ``notebooks/`` as the working folder. Every notebook
is written to a temporary sibling and renamed over the committed one only when all its cells
ran; a failing cell leaves the committed notebook as it was and exits 1. ``NB_*`` variables in
the environment still override the parameters (see each notebook's first cell).

:func:`execute` is also what tests/test_notebooks.py runs the notebooks with.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import nbclient
import nbformat

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ORDER = ("train_and_evaluate.ipynb", "batch_scoring.ipynb")  # the second reads the first's run
CELL_TIMEOUT_S = 3600

sys.path.insert(0, str(REPO))  # `python scripts/run_notebooks.py` puts only scripts/ there
from common import staging  # noqa: E402


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """``env`` and the repository on ``PYTHONPATH`` for the block; the old values after it."""
    saved = {k: os.environ.get(k) for k in (*env, "PYTHONPATH")}
    os.environ.update(env)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved["PYTHONPATH"]]))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(
    name: str,
    env: Mapping[str, str] | None = None,
    *,
    timeout_s: int = CELL_TIMEOUT_S,
    keep: Path | None = None,
) -> nbformat.NotebookNode:
    """Runs ``notebooks/<name>`` top to bottom; returns the executed notebook.

    A fresh ``python3`` kernel of this interpreter (jupyter_client replaces the kernelspec's
    ``python`` with ``sys.executable``) runs in ``notebooks/``; it inherits this process's
    environment, here with ``env`` (the notebooks' ``NB_*`` parameters) and the repository on
    ``PYTHONPATH``. A failing cell raises ``CellExecutionError`` naming the cell and traceback.
    The committed notebook is not written; ``keep``, when given, receives the executed copy even
    after a failing cell (to debug it).
    """
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout_s,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    try:
        with _environment(env or {}):
            client.execute()
    finally:
        if keep is not None:
            nbformat.write(nb, keep)
    return nb


def run(name: str) -> float:
    """Executes ``notebooks/<name>`` and saves it in place; returns the seconds it took."""
    start = time.time()
    nb = execute(name)
    with staging.staged_file(str(NOTEBOOKS / name)) as tmp:
        nbformat.write(nb, tmp)
    return time.time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(ORDER), help="notebooks, in order")
    args = parser.parse_args(argv)
    for name in args.names:
        if not (NOTEBOOKS / name).is_file():
            print(f"error: notebooks/{name}: no such notebook", file=sys.stderr)
            return 2
    for name in args.names:
        print(f"running notebooks/{name} ...", flush=True)
        try:
            seconds = run(name)
        except nbclient.exceptions.CellExecutionError as e:
            print(f"error: notebooks/{name}: a cell failed; left unchanged\n{e}", file=sys.stderr)
            return 1
        print(f"saved notebooks/{name} with its outputs ({seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
