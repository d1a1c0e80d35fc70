"""Pictures of an evaluation: training curves, recall/NDCG at every k, exposure and popularity.

``python -m trainer.evaluate --output DIR/eval.json`` writes them beside the JSON; this module
also draws them from saved reports:

``python -m trainer.plots --reports a.json b.json [--model-dir DIR] --output-dir DIR``

Figures (PNG, matplotlib's headless Agg backend):

* ``<stem>.training.png``: per-epoch train retrieval loss, valid recall@10, train/valid RMSE,
  from the model dir's ``metrics.json`` history (what the training loop records each epoch).
* ``<stem>.ranking.png``: recall@k and NDCG@k for k = 1..100 (p1: top-k accuracy), one line
  per scorer: the report's own and every other report of the same split and part in its folder
  (so the model and the baselines evaluated into one folder share a figure).
* ``<stem>.exposure.png``: the Lorenz curve of how often each catalog item is recommended in the
  top-10 lists, and the share of recommendations falling in each popularity decile of the
  catalog (decile 10 = the most-rated tenth).

The numbers drawn come from :func:`trainer.metrics.ranking_curves` and :func:`exposure_summary`,
which ``trainer.evaluate`` stores in its report (``curves``, ``exposure``) so that reports
written at different times can be drawn together.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common import cli, staging
from trainer import metrics

#: Points of the stored Lorenz curve (shares 0, 1/(n-1), ..., 1 of the catalog).
LORENZ_POINTS = 101


# --------------------------------------------------------------------------- the numbers


def exposure_summary(top_k: np.ndarray, popularity: np.ndarray) -> dict[str, list[float]]:
    """How the top-k lists spread over the catalog.

    Args:
        top_k: ``[U, k]`` recommended catalog rows (``-1`` = no item).
        popularity: ``[N]`` train interactions of each catalog item.

    Returns:
        ``lorenz``: cumulative share of recommendations held by the least-recommended
        ``x`` share of the catalog, at ``LORENZ_POINTS`` evenly spaced ``x`` (0 and 1 included);
        ``popularity_deciles``: share of recommendations whose item falls in each tenth of the
        catalog ranked by popularity (first = least popular tenth, last = most popular);
        ``catalog_coverage``: share of the catalog recommended at least once.
    """
    top_k = np.asarray(top_k, dtype=np.int64)
    popularity = np.asarray(popularity, dtype=np.float64)
    num_items = len(popularity)
    rows = top_k[top_k >= 0]
    counts = np.bincount(rows, minlength=num_items).astype(np.float64)
    total = counts.sum()
    xs = np.linspace(0.0, 1.0, LORENZ_POINTS)
    if total == 0 or num_items == 0:
        return {
            "lorenz": xs.tolist(),
            "popularity_deciles": [0.0] * 10,
            "catalog_coverage": 0.0,
        }
    cumulative = np.concatenate([[0.0], np.cumsum(np.sort(counts)) / total])
    lorenz = np.interp(xs * num_items, np.arange(num_items + 1), cumulative)
    # Deciles by popularity rank (ties broken by catalog order: stable sort).
    rank = np.empty(num_items, np.int64)
    rank[np.argsort(popularity, kind="stable")] = np.arange(num_items)
    decile = np.minimum(rank * 10 // num_items, 9)
    shares = np.bincount(decile, weights=counts, minlength=10) / total
    return {
        "lorenz": lorenz.tolist(),
        "popularity_deciles": shares.tolist(),
        "catalog_coverage": metrics.catalog_coverage(top_k, num_items),
    }


# --------------------------------------------------------------------------- drawing


def _pyplot():
    """matplotlib's pyplot on the headless Agg backend (no display on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    """Writes the figure as PNG through a temporary sibling (readers never see half of it)."""
    try:
        with staging.staged_file(path) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    finally:
        _pyplot().close(fig)
    return path


def _label(report: Mapping[str, Any]) -> str:
    name = str(report.get("scorer", "?"))
    config = report.get("scorer_config") or {}
    if "l2" in config:
        name += f" (λ {config['l2']:g})"
    return name


def plot_training(history: Sequence[Mapping[str, float]], path: str, title: str = "") -> str:
    """Per-epoch figures of ``metrics.json``'s ``history``: loss, valid recall@10, RMSE."""
    if not history:
        raise ValueError("no training history to plot (the model dir records no epoch)")
    plt = _pyplot()
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = (
        ("train retrieval loss", (("train_retrieval_loss", "train"),)),
        ("valid recall", (("recall_at_10", "@10"), ("recall_at_50", "@50"))),
        ("RMSE", (("train_rmse", "train"), ("rmse", "valid"))),
    )
    for ax, (name, series) in zip(axes, panels, strict=True):
        drawn = False
        for key, label in series:
            values = [h.get(key) for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], "o-", label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=name, xlabel="epoch")
        ax.set_xticks(epochs if len(epochs) <= 12 else epochs[:: math.ceil(len(epochs) / 12)])
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    best = max(history, key=lambda h: h.get("recall_at_10", -1.0))
    if "recall_at_10" in best:
        axes[1].axvline(best.get("epoch", 0), color="grey", ls=":", lw=1)
    fig.suptitle(title or "training", y=1.02)
    return _save(fig, path)


def plot_ranking(reports: Sequence[Mapping[str, Any]], path: str) -> str:
    """recall@k and NDCG@k (p1: top-k accuracy) for k = 1..100, one line per report."""
    usable = [r for r in reports if r.get("curves")]
    if not usable:
        raise ValueError("no report carries curves (evaluate with this version of trainer)")
    plt = _pyplot()
    first = usable[0]
    p1 = "top_k_accuracy" in first["curves"]
    panels = (("top_k_accuracy", "top-k accuracy"),) if p1 else (
        ("recall", "recall@k"), ("ndcg", "NDCG@k"),
    )  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels, strict=True):
        for report in usable:
            curves = report["curves"]
            if key in curves:
                ax.plot(curves["k"], curves[key], label=_label(report))
        for k in (10, 20):
            ax.axvline(k, color="grey", ls=":", lw=0.8)
        ax.set(title=name, xlabel="k", xlim=(1, max(first["curves"]["k"])))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{first.get('split', '?')} {first.get('part', 'test')}", y=1.02)
    return _save(fig, path)


def plot_exposure(reports: Sequence[Mapping[str, Any]], path: str) -> str:
    """Lorenz curve of top-10 exposure and the popularity deciles of what is recommended."""
    usable = [r for r in reports if r.get("exposure")]
    if not usable:
        raise ValueError("no report carries exposure figures")
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.plot([0, 1], [0, 1], "k--", lw=1, label="equal exposure")
    width = 0.8 / len(usable)
    for n, report in enumerate(usable):
        exposure = report["exposure"]
        lorenz = exposure["lorenz"]
        metrics = report.get("metrics", {})
        label = f"{_label(report)}: coverage {exposure.get('catalog_coverage', 0):.0%}"
        if "gini@10" in metrics:
            label += f", Gini {metrics['gini@10']:.2f}"
        left.plot(np.linspace(0, 1, len(lorenz)), lorenz, label=label)
        deciles = np.arange(1, 11) + (n - (len(usable) - 1) / 2) * width
        right.bar(deciles, exposure["popularity_deciles"], width=width, label=_label(report))
    right.axhline(0.1, color="grey", ls=":", lw=1, label="uniform")
    left.set(
        title="exposure of catalog items in the top-10",
        xlabel="share of catalog (least recommended first)",
        ylabel="share of recommendations",
    )
    right.set(
        title="popularity of what is recommended",
        xlabel="catalog popularity decile (10 = most rated)",
        ylabel="share of recommendations",
        xticks=range(1, 11),
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- reports on disk


def read_report(path: str) -> dict:
    """An evaluation report (``trainer.evaluate --output``); ``ValueError`` names a bad file."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such report") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON report ({e})") from None
    if not isinstance(report, dict) or "metrics" not in report or "split" not in report:
        raise ValueError(f"{path}: not an evaluation report (no metrics / split)")
    return report


def sibling_reports(path: str, report: Mapping[str, Any]) -> list[dict]:
    """The other reports of the same split and part in ``path``'s folder (baselines, ...)."""
    folder = os.path.dirname(os.path.abspath(path))
    out = []
    for name in sorted(os.listdir(folder)):
        other = os.path.join(folder, name)
        if not name.endswith(".json") or os.path.abspath(other) == os.path.abspath(path):
            continue
        try:
            candidate = read_report(other)
        except ValueError:
            continue  # not every JSON beside a report is one
        same = (candidate.get("split"), candidate.get("part", "test")) == (
            report.get("split"),
            report.get("part", "test"),
        )
        if same and candidate.get("curves"):
            out.append(candidate)
    return out


def read_history(model_dir: str) -> list[dict]:
    """The per-epoch history the training loop stored in ``<model_dir>/metrics.json``."""
    path = os.path.join(model_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            return list(json.load(f).get("history") or [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []


def write_report_plots(
    report: Mapping[str, Any],
    output_json: str,
    model_dir: str | None = None,
    others: Sequence[Mapping[str, Any]] | None = None,
) -> list[str]:
    """Writes every figure of one report beside ``output_json``; returns the PNG paths.

    ``others``: reports drawn beside this one (default: :func:`sibling_reports`).
    """
    stem = os.path.splitext(output_json)[0]
    others = sibling_reports(output_json, report) if others is None else list(others)
    reports = [dict(report), *others]
    paths = []
    if report.get("curves"):
        paths.append(plot_ranking(reports, f"{stem}.ranking.png"))
    if report.get("exposure"):
        paths.append(plot_exposure(reports, f"{stem}.exposure.png"))
    history = read_history(model_dir) if model_dir and os.path.isdir(model_dir) else []
    if history:
        title = f"training: {os.path.basename(os.path.normpath(model_dir))}"
        paths.append(plot_training(history, f"{stem}.training.png", title))
    return paths


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--reports",
        nargs="+",
        required=True,
        metavar="FILE.json",
        help="evaluation reports (trainer.evaluate --output) drawn together; the first names "
        "the figures (<output-dir>/<its stem>.ranking.png, ...)",
    )
    parser.add_argument(
        "--model-dir", help="trained model dir whose metrics.json history gives the training curves"
    )
    parser.add_argument(
        "--output-dir", help="where the PNGs go (default: the first report's folder)"
    )
    return parser


def run(args: argparse.Namespace) -> None:
    """Draws the figures of ``--reports`` into ``--output-dir``."""
    reports = [read_report(p) for p in args.reports]
    if args.model_dir and not os.path.isfile(os.path.join(args.model_dir, "metrics.json")):
        raise ValueError(f"--model-dir {args.model_dir}: no metrics.json (not a model dir)")
    folder = args.output_dir or os.path.dirname(os.path.abspath(args.reports[0]))
    target = os.path.join(folder, os.path.basename(args.reports[0]))
    for path in write_report_plots(reports[0], target, args.model_dir, others=reports[1:]):
        print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # read_report and the drawing name a bad report or history with a ValueError.
    return cli.run(lambda: run(args), expected=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
