"""Executes the notebooks with their default parameters and saves them WITH their outputs.

``nice -n 10 .venv/bin/python scripts/run_notebooks.py [NAME.ipynb ...]``

Runs ``train_and_evaluate.ipynb`` (MovieLens-100K, MiniLM, one epoch: it writes
``runs/notebook/``) and then ``batch_scoring.ipynb`` over what it wrote, each in a fresh
``python3`` kernel of this interpreter with ``notebooks/`` as the working folder. Every notebook
is written to a temporary sibling and renamed over the committed one only when all its cells
ran; a failing cell leaves the committed notebook as it was and exits 1. ``NB_*`` variables in
the environment still override the parameters (see each notebook's first cell).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ORDER = ("train_and_evaluate.ipynb", "batch_scoring.ipynb")  # the second reads the first's run
CELL_TIMEOUT_S = 3600


def run(name: str) -> float:
    """Executes ``notebooks/<name>`` in place; returns the seconds it took."""
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    start = time.time()
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
    )
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    tmp = path.with_name(f".tmp-{path.name}")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)
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
