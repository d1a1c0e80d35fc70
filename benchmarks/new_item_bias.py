"""What the new-item bias trades (p3): recall@10 against the cold movies' recall and exposure.

    python benchmarks/new_item_bias.py [--data runs/quality/data] [--split p3]
                                       [--models runs/quality/two_tower_p3_s42 ...]
                                       [--biases 0 0.025 0.05 0.1 0.15 0.2] [--name NAME]

Takes models trained by ``benchmarks/quality.py`` (their popularity-prior weight as chosen on
valid), sets their new-item bias ``b`` (``--new-item-bias``: + b on every item nobody rated in
train) to each value of ``--biases`` in turn, and scores the valid and the test part with the
served embeddings (``trainer.evaluate``'s full ranking). Writes
``benchmarks/results/new_item_bias_<split>.{json,md}``: mean ± std over the models of recall@10,
NDCG@10, cold recall@10, the cold recall's ratio to recall@10 and the cold share of the top-10
slots, with the ``b`` each model chose on valid (and whether it chose the content guess of
the cold items' log counts, :mod:`trainer.content_prior`). A deployment that wants new items
seen more than recall alone would choose reads its ``b`` off the valid rows; the test rows
report it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import staging  # noqa: E402
from trainer.data import records  # noqa: E402
from trainer.evaluate import evaluate_full_ranking, ranking_task  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("valid", "test")
FIGURES = ("recall@10", "ndcg@10", "cold_recall@10", "cold_ratio", "cold_share_of_top10")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(ROOT, "runs", "quality", "data"))
    parser.add_argument("--split", default="p3")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--biases", nargs="+", type=float, default=[0, 0.025, 0.05, 0.1, 0.15, 0.2])
    parser.add_argument("--name", default=None, help="results name (new_item_bias_<split>)")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = [
            os.path.join(ROOT, "runs", "quality", f"two_tower_{args.split}_s{seed}")
            for seed in (42, 1, 2)
        ]
    missing = [m for m in args.models if not os.path.isfile(os.path.join(m, "metrics.json"))]
    if missing:
        parser.error(f"not trained model dirs: {missing} (run benchmarks/quality.py first)")
    if any(not 0.0 <= b <= 1.0 for b in args.biases):
        parser.error(f"--biases must be in [0, 1], got {args.biases}")
    return args


def score_model(args: argparse.Namespace, model_dir: str, tasks: dict, catalog: dict) -> dict:
    """``{"chosen": b, "rows": {part: {str(b): figures}}}`` of one trained model."""
    from trainer.inference import ModelScorer
    from trainer.model_dir import load_trained

    model, _ = load_trained(model_dir)
    if model.new_item_bias is None:
        raise SystemExit(f"{model_dir}: trained without the popularity prior (no new-item bias)")
    chosen = float(model.new_item_bias.numpy())
    rows: dict = {part: {} for part in PARTS}
    for bias in args.biases:
        model.new_item_bias.assign(bias)
        scorer = ModelScorer(model, catalog)  # the catalog embedded with this b
        for part in PARTS:
            metrics, _ = evaluate_full_ranking(
                scorer, args.data, args.split, catalog, part, task=tasks[part]
            )
            figures = {k: metrics[k] for k in FIGURES if k in metrics}
            figures["cold_ratio"] = metrics["cold_recall@10"] / max(metrics["recall@10"], 1e-12)
            rows[part][str(bias)] = figures
    with open(os.path.join(model_dir, "metrics.json")) as f:
        prior = json.load(f).get("popularity_prior") or {}
    return {
        "chosen": chosen,
        "weight": float(model.prior_weight.numpy()),
        "content_prior": bool(prior.get("content_prior")),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    chosen = " / ".join(f"{m['chosen']:g}" for m in result["models"].values())
    content = " / ".join(
        "yes" if m.get("content_prior") else "no" for m in result["models"].values()
    )
    lines = [
        f"New-item bias on {result['split']} ({len(result['models'])} models; b chosen on "
        f"valid: {chosen}; cold items' log counts guessed from genres and year: {content}; "
        "popularity-prior weight as each chose it)\n",
        "| part | b | " + " | ".join(FIGURES) + " |",
        "|" + " --- |" * (len(FIGURES) + 2),
    ]
    for part in PARTS:
        for bias in result["biases"]:
            cells = []
            for figure in FIGURES:
                values = [m["rows"][part][str(bias)][figure] for m in result["models"].values()]
                cells.append(f"{np.mean(values):.4f} ± {np.std(values):.4f}")
            lines.append(f"| {part} | {bias:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    catalog = records.load_catalog(args.data, args.split)
    tasks = {part: ranking_task(args.data, args.split, catalog, part) for part in PARTS}
    models = {}
    for model_dir in args.models:
        print(f"scoring {model_dir} at b = {args.biases}", flush=True)
        models[os.path.basename(model_dir.rstrip("/"))] = score_model(
            args, model_dir, tasks, catalog
        )
    result = {
        "split": args.split,
        "data": args.data,
        "biases": args.biases,
        "models": models,
        "wall_seconds": round(time.time() - started, 1),
    }
    table = markdown(result)
    print(table)
    name = args.name or f"new_item_bias_{args.split}"
    path = os.path.join(ROOT, "benchmarks", "results", name)
    staging.write_json(path + ".json", result)
    staging.write_text(path + ".md", table)
    print(f"wrote {path}.json and {path}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
