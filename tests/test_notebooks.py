"""Executes every notebook top to bottom on tiny artifacts, so they never rot.

Notebooks are run by ``scripts/run_notebooks.py``'s :func:`execute` (``nbclient``, a ``python3``
kernel of this interpreter), with their parameters set through ``NB_*`` environment variables,
which the kernel inherits.

* ``train_and_evaluate.ipynb`` prepares synthetic data, trains a tiny-BERT model, evaluates it
  beside the popularity and EASE baselines (with the plots) and exports it (with its model card).
* ``batch_scoring.ipynb`` runs on conftest's fake export (the real export contract around hash
  embeddings), and again on conftest's ``tiny_export`` (a trained tiny-BERT model with a ScaNN
  index).

Both are marked ``slow`` but stay in the default run (about a minute on 2 cores).

The committed notebooks carry the outputs of a real run (MovieLens-100K, see each notebook's
first cell), so a reader on GitHub sees the tables and plots; the tests execute a copy and never
write them back. ``scripts/run_notebooks.py`` refreshes the committed outputs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

CELL_TIMEOUT_S = 600

pytestmark = pytest.mark.slow

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from scripts import run_notebooks  # noqa: E402  (needs nbclient)
from scripts.run_notebooks import NOTEBOOKS  # noqa: E402


def execute(name: str, env: dict[str, str], tmp_path: Path) -> nbformat.NotebookNode:
    """Runs ``notebooks/<name>`` in a fresh kernel with ``env`` set; returns the executed copy.

    The executed copy is written to ``tmp_path`` (for debugging); the committed notebook is
    never touched. A failing cell raises ``CellExecutionError`` naming the cell and traceback.
    """
    return run_notebooks.execute(name, env, timeout_s=CELL_TIMEOUT_S, keep=tmp_path / name)


def outputs_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(parts)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_notebooks_are_committed_with_their_outputs():
    """Every code cell ran, in order, without an error, and the plots are in the file."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        counts = [c.execution_count for c in code]
        assert None not in counts, f"{path.name}: a cell was not executed"
        assert counts == sorted(counts), f"{path.name}: cells executed out of order"
        for cell in code:
            kinds = {o.get("output_type") for o in cell.outputs}
            assert "error" not in kinds, f"{path.name}: a cell failed: {cell.source[:60]}"
        assert _images(nb) >= 3, f"{path.name}: its plots are missing"
        assert "Traceback" not in outputs_text(nb), path.name
        assert "parameters" in code[0].metadata.get("tags", []), path.name


def _trainer_available() -> str | None:
    """Why the trainer cannot run yet (a module missing), or None."""
    for module in ("trainer.task", "trainer.model", "trainer.export"):
        if importlib.util.find_spec(module) is None:
            return f"{module} does not exist yet"
    return None


def test_train_and_evaluate_notebook(tmp_path: Path):
    """prepare (synthetic) -> train (tiny BERT, 1 epoch) -> evaluate -> export -> query."""
    reason = _trainer_available()
    if reason:
        pytest.skip(f"train_and_evaluate.ipynb needs the trainer: {reason}")
    env = {
        "NB_WORK_DIR": str(tmp_path / "work"),
        "NB_DATASET": "synthetic",
        "NB_PRESET": "tiny",
        "NB_SPLIT": "p2",
        "NB_EPOCHS": "1",
        "NB_BATCH_SIZE": "64",
        "NB_MAX_STEPS": "0",
        "NB_INDEX": "brute_force",
        "NB_MODEL_NAME": "movielens",
    }
    nb = execute("train_and_evaluate.ipynb", env, tmp_path)
    work = tmp_path / "work"
    assert (work / "data" / "manifest.json").exists()
    version = work / "export" / "movielens" / "1"
    assert (version / "saved_model.pb").exists()
    report = json.loads((work / "eval" / "two_tower.json").read_text())
    assert "recall@10" in report["metrics"] and len(report["curves"]["recall"]) == 100
    for figure in ("training", "ranking", "exposure"):
        assert (work / "eval" / f"two_tower.{figure}.png").stat().st_size > 1000, figure
    card = (version / "assets.extra" / "MODEL_CARD.md").read_text()
    assert "## Known limits" in card and "popularity" in card and "ease" in card
    assert (work / "model" / "MODEL_CARD.md").exists()
    text = outputs_text(nb)
    assert "two-tower" in text and "popularity" in text and "Traceback" not in text
    assert _images(nb) == 3
    assert "saving the SavedModel" in text and "tracing the 4 signatures" in text  # progress


@pytest.mark.parametrize("model", ["fake_export", "trained_export"])
def test_batch_scoring_notebook(
    model: str, tiny_data_dir: str, fake_export_factory, tmp_path: Path, request
):
    """On the fake export always (isolates the notebook), and on the trained one once it exists."""
    if model == "trained_export":
        reason = _trainer_available()
        if reason:
            pytest.skip(f"no trained export yet: {reason}")
        # conftest's session fixture: a tiny-BERT model trained on tiny_data_dir and exported.
        data_dir, export = tiny_data_dir, request.getfixturevalue("tiny_export")
    else:
        data_dir = tiny_data_dir
        fake_export_factory(str(tmp_path / "export"))
        export = str(tmp_path / "export" / "movielens")
    out = tmp_path / "scores"
    env = {
        "NB_DATA_DIR": data_dir,
        "NB_EXPORT": export,
        "NB_SPLIT": "p2",
        "NB_K": "5",
        "NB_OUTPUT_DIR": str(out),
        "NB_LAMBDAS": "0,0.5",
        "NB_SERVER": "",
    }
    nb = execute("batch_scoring.ipynb", env, tmp_path)
    text = outputs_text(nb)
    assert "recall@5" in text and "two-tower" in text
    assert (out / "_SUCCESS").exists() and list(out.glob("part-*.parquet"))
    for figure in ("score_distributions", "lorenz", "genre_mix", "mmr_tradeoff"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000, figure
    assert _images(nb) == 4
    assert "<-" in text  # the explanations printed "recommendation <- nearest history titles"
