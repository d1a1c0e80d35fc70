"""Evaluation under the three protocols, with the same harness for the model and the baselines.

``python -m trainer.evaluate --data DIR --split p1|p2|p3 --model-dir DIR --output FILE.json``

* **p1** (TFRS tutorials): every test rating is a query (built from train ratings made before
  it); factorized top-{10, 50, 100} accuracy of its movie over the whole catalog, seen movies
  *not* removed; and the ranking head's RMSE over all test ratings.
* **p2** (RecBole 1.2.1 full ranking): one query per user from the whole train part; every item
  ranked, the user's train and valid items removed (RecBole's ``used_ids`` at test time); every
  test interaction relevant (RecBole's default has no rating threshold). Recall, NDCG, MRR, Hit
  and Precision at 10 and 20, per user, averaged over users with test items.
* **p3** (cold start): as p2 with held-out movies among the candidates, plus recall@10 counting
  only the held-out movies.
* **Beyond accuracy** (top-10 lists): catalog coverage, Gini index of exposure, intra-list
  diversity, mean popularity percentile; and the MMR trade-off at a few λ.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from typing import Protocol

import numpy as np

from trainer import metrics
from trainer.data import records
from trainer.data.movielens import DataError

K_ACCURACY = (10, 50, 100)
K_RANKING = (10, 20)
MMR_LAMBDAS = (0.0, 0.1, 0.3, 0.5)
MMR_POOL = 100


class Scorer(Protocol):
    """What the harness needs from a recommender (the model or a baseline)."""

    name: str

    def score(self, queries: dict[str, np.ndarray]) -> np.ndarray:
        """Scores of every catalog item for each query: ``[B, N]`` in catalog order."""

    def item_embeddings(self) -> np.ndarray | None:
        """``[N, D]`` candidate embeddings (for diversity), or ``None``."""

    def predict_ratings(self, events: dict[str, np.ndarray]) -> np.ndarray | None:
        """Predicted rating of each event ``[E]``, or ``None`` without a ranking head."""


@dataclasses.dataclass
class PopularityScorer:
    """Most-popular baseline: every query gets the train popularity ranking."""

    popularity: np.ndarray  # [N]
    name: str = "popularity"

    def score(self, queries: dict[str, np.ndarray]) -> np.ndarray:
        batch = len(next(iter(queries.values())))
        return np.broadcast_to(
            np.log1p(self.popularity.astype(np.float32)), (batch, len(self.popularity))
        )

    def item_embeddings(self) -> np.ndarray | None:
        return None

    def predict_ratings(self, events: dict[str, np.ndarray]) -> np.ndarray | None:
        return None


def _batched_scores(scorer: Scorer, queries: dict[str, np.ndarray], batch: int = 512):
    size = len(next(iter(queries.values())))
    for start in range(0, size, batch):
        yield start, scorer.score({k: v[start : start + batch] for k, v in queries.items()})


def index_of(catalog: dict[str, np.ndarray]) -> dict[str, int]:
    """Item id -> catalog row."""
    return {item: i for i, item in enumerate(catalog["item_id"])}


def items_by_user(events: dict[str, np.ndarray], index: dict[str, int]) -> dict[str, list[int]]:
    """User id -> catalog rows of the user's items in ``events`` (a missing user: none)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for user, item in zip(events["user_id"], events["item_id"], strict=True):
        groups[user].append(index[item])
    return groups


def evaluate_p1(scorer: Scorer, data_dir: str, catalog: dict[str, np.ndarray]) -> dict:
    """TFRS protocol: factorized top-k accuracy of each test rating, and the ranking RMSE."""
    test = records.load_events(data_dir, "p1", "test")
    index = index_of(catalog)
    truth = np.array([index[i] for i in test["item_id"]])
    hits = {k: 0 for k in K_ACCURACY}
    for start, scores in _batched_scores(scorer, test):
        part = metrics.factorized_top_k_accuracy(
            scores, truth[start : start + len(scores)], ks=K_ACCURACY
        )
        for k in K_ACCURACY:
            hits[k] += part[f"top_{k}_accuracy"] * len(scores)
    result = {f"top_{k}_accuracy": hits[k] / len(truth) for k in K_ACCURACY}
    predicted = scorer.predict_ratings(test)
    if predicted is not None:
        result["rmse"] = metrics.rmse(predicted, test["rating"])
    result["num_queries"] = len(truth)
    return result


def _user_topk(
    scorer: Scorer, users: dict[str, np.ndarray], exclude: dict[str, list[int]], k: int
) -> np.ndarray:
    top = []
    for start, scores in _batched_scores(scorer, users):
        ids = users["user_id"][start : start + len(scores)]
        top.append(
            metrics.top_k_from_scores(
                scores, k, [np.array(exclude.get(u, []), dtype=np.int64) for u in ids]
            )
        )
    return np.concatenate(top)


def evaluate_full_ranking(
    scorer: Scorer, data_dir: str, split: str, catalog: dict[str, np.ndarray], part: str = "test"
) -> tuple[dict, np.ndarray]:
    """RecBole protocol over ``part``; returns the metrics and the users' top-``MMR_POOL`` lists."""
    index = index_of(catalog)
    users = records.load_users(data_dir, split)
    seen = items_by_user(records.load_events(data_dir, split, "train"), index)
    if part == "test":  # RecBole removes train and valid interactions when testing
        for user, items in items_by_user(
            records.load_events(data_dir, split, "valid"), index
        ).items():
            seen[user].extend(items)
    truth_by_user = items_by_user(records.load_events(data_dir, split, part), index)
    pool = _user_topk(scorer, users, seen, MMR_POOL)
    truth = [np.array(truth_by_user.get(u, []), dtype=np.int64) for u in users["user_id"]]
    result = metrics.ranking_metrics(pool, truth, ks=K_RANKING)
    cold = np.flatnonzero(catalog["is_cold"] == 1)
    if len(cold):
        cold_set = set(cold.tolist())
        cold_truth = [np.array([i for i in t if i in cold_set], dtype=np.int64) for t in truth]
        cold_metrics = metrics.ranking_metrics(pool, cold_truth, ks=(10,))
        result["cold_recall@10"] = cold_metrics["recall@10"]
        result["cold_ndcg@10"] = cold_metrics["ndcg@10"]
        result["cold_num_users"] = cold_metrics["num_users"]
        result["cold_share_of_top10"] = float(np.isin(pool[:, :10], cold).mean())
    return result, pool


def beyond_accuracy(scorer: Scorer, top10: np.ndarray, catalog: dict[str, np.ndarray]) -> dict:
    num_items = len(catalog["item_id"])
    result = {
        "coverage@10": metrics.catalog_coverage(top10, num_items),
        "gini@10": metrics.gini_index(top10, num_items),
        "popularity_percentile@10": metrics.popularity_percentile(top10, catalog["popularity"]),
    }
    embeddings = scorer.item_embeddings()
    if embeddings is not None:
        result["intra_list_diversity@10"] = metrics.intra_list_diversity(top10, embeddings)
    return result


def mmr_tradeoff(
    scorer: Scorer,
    pool: np.ndarray,
    data_dir: str,
    split: str,
    catalog: dict[str, np.ndarray],
    part: str = "test",
) -> list[dict]:
    """Recall@10 and diversity of MMR re-ranking of the top-``MMR_POOL`` at a few λ."""
    embeddings = scorer.item_embeddings()
    if embeddings is None:
        return []
    users = records.load_users(data_dir, split)
    relevance = np.concatenate(
        [
            np.take_along_axis(s, np.clip(pool[start : start + len(s)], 0, None), axis=1)
            for start, s in _batched_scores(scorer, users)
        ]
    )
    index = index_of(catalog)
    truth_by_user = items_by_user(records.load_events(data_dir, split, part), index)
    truth = [np.array(truth_by_user.get(u, []), dtype=np.int64) for u in users["user_id"]]
    rows = []
    for lam in MMR_LAMBDAS:
        top10 = metrics.mmr_rerank(pool, relevance, embeddings, 10, lam)
        ranked = metrics.ranking_metrics(top10, truth, ks=(10,))
        rows.append(
            {
                "lambda": lam,
                "recall@10": ranked["recall@10"],
                "ndcg@10": ranked["ndcg@10"],
                "intra_list_diversity@10": metrics.intra_list_diversity(top10, embeddings),
                "coverage@10": metrics.catalog_coverage(top10, len(catalog["item_id"])),
            }
        )
    return rows


def evaluate(
    scorer: Scorer, data_dir: str, split: str, *, mmr: bool = True, part: str = "test"
) -> dict:
    """Every figure of ``split`` for one scorer, as a JSON-ready dict.

    ``part="valid"`` (p2, p3) scores the validation part instead, to choose settings without
    looking at the test part.
    """
    if part not in ("test", "valid"):
        raise DataError(f"--part must be test or valid, not {part!r}")
    if part == "valid" and split == "p1":
        raise DataError("p1 has no validation part (the TFRS protocol is train/test only)")
    start = time.time()
    catalog = records.load_catalog(data_dir, split)
    if split == "p1":
        result = evaluate_p1(scorer, data_dir, catalog)
        users = records.load_users(data_dir, split)
        pool = _user_topk(scorer, users, {}, MMR_POOL)
    else:
        result, pool = evaluate_full_ranking(scorer, data_dir, split, catalog, part)
    result.update(beyond_accuracy(scorer, pool[:, :10], catalog))
    out = {"scorer": scorer.name, "split": split, "part": part, "metrics": result}
    if mmr and split != "p1":
        out["mmr"] = mmr_tradeoff(scorer, pool, data_dir, split, catalog, part)
    out["seconds"] = round(time.time() - start, 1)
    return out


def format_report(report: dict) -> str:
    part = report.get("part", "test")
    lines = [f"{report['scorer']} on {report['split']} {part} ({report['seconds']}s)"]
    rows = [
        {"metric": k, "value": f"{v:.4f}" if isinstance(v, float) else str(v)}
        for k, v in report["metrics"].items()
    ]
    lines.append(metrics.format_table(rows, ["metric", "value"]))
    if report.get("mmr"):
        lines.append("\nMMR re-ranking of the top-100 (λ weights diversity):")
        lines.append(
            metrics.format_table(
                [
                    {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()}
                    for r in report["mmr"]
                ],
                list(report["mmr"][0]),
            )
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="prepared data directory")
    parser.add_argument("--split", required=True, choices=["p1", "p2", "p3"])
    parser.add_argument("--model-dir", help="trained model directory (omit with --baseline)")
    parser.add_argument("--baseline", choices=["popularity"], help="evaluate a baseline instead")
    parser.add_argument("--output", help="write the report as JSON here")
    parser.add_argument("--no-mmr", action="store_true", help="skip the MMR trade-off")
    parser.add_argument(
        "--part",
        default="test",
        choices=["test", "valid"],
        help="which held-out part to score (valid: p2 and p3, for choosing settings)",
    )
    return parser


def load_scorer(args: argparse.Namespace) -> Scorer:
    if args.baseline == "popularity":
        return PopularityScorer(records.load_catalog(args.data, args.split)["popularity"])
    if not args.model_dir:
        raise DataError("give --model-dir (a trained model) or --baseline")
    from trainer.model import ModelScorer  # TensorFlow model code only when needed

    return ModelScorer.from_model_dir(args.model_dir, records.load_catalog(args.data, args.split))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        records.part_files(args.data, args.split, args.part)
        report = evaluate(
            load_scorer(args), args.data, args.split, mmr=not args.no_mmr, part=args.part
        )
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
