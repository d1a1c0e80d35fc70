"""Evaluation under the four protocols, with the same harness for the model and the baselines.

``python -m trainer.evaluate --data DIR --split p1|p2|p3|p4 --model-dir DIR --output FILE.json``
``python -m trainer.evaluate --data DIR --split p2 --baseline popularity|ease [--ease-l2 X]``

* **p1** (TFRS tutorials): every test rating is a query (built from train ratings made before
  it); factorized top-{10, 50, 100} accuracy of its movie over the whole catalog, seen movies
  *not* removed; and the ranking head's RMSE over all test ratings.
* **p2** (RecBole 1.2.1 full ranking): one query per user from the whole train part; every item
  ranked, the user's train and valid items removed (RecBole's ``used_ids`` at test time); every
  test interaction relevant (RecBole's default has no rating threshold). Recall, NDCG, MRR, Hit
  and Precision at 10 and 20, per user, averaged over users with test items.
* **p3** (cold start): as p2 with held-out movies among the candidates, plus recall@10 counting
  only the held-out movies.
* **p4** (new users, strong generalisation as in Mult-VAE and EASE): full ranking over the
  held-out valid or test users only (they have no train ratings). Each query is the user's
  record in ``users.tfrecord`` (its history holds the fold-in items) with ``user_id`` blanked
  to ``""``, so the model must work without it; the user's fold-in items are removed from the
  ranking; the user's ratings in the part are relevant. Same metrics as p2.
* **Typed titles** (``--queries typed_titles``, p2-p4): each query cut to what a new user types,
  the profile and the liked titles of its query text, with no history and no user id; EASE
  folds in the items those titles name. Exclusions and truth as the protocol's.
* **Baselines**: ``popularity``, and ``ease`` (closed-form item-item model; its L2 weight
  chosen on the valid part from ``EASE_L2_GRID`` by per-user recall@10, then NDCG@10, unless
  ``--ease-l2`` pins it; p1 has no valid part, so a seeded 5% of train is held out for the
  choice, as the training loop does). On p4 EASE folds in: its ``B`` applied to the user's
  fold-in row.
* **Beyond accuracy** (top-10 lists): catalog coverage, Gini index of exposure, intra-list
  diversity, mean popularity percentile; and the MMR trade-off at a few λ.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Protocol

import numpy as np

from common import cli, staging
from trainer import lazy_import, metrics, plots, ranking
from trainer.baselines import (
    HELDOUT_USER_KEY,
    TYPED_ITEMS_KEY,
    EaseScorer,
    PopularityScorer,
    binary_matrix,
    gram,
    item_rows,
)
from trainer.config import ConfigError
from trainer.data.movielens import DataError
from trainer.ranking import index_of, items_by_user

# TensorFlow loads on first use, so that --help and bad flags answer at once.
records = lazy_import("trainer.data.records")

K_ACCURACY = (10, 50, 100)
K_RANKING = (10, 20)
MMR_LAMBDAS = (0.0, 0.1, 0.3, 0.5)
MMR_POOL = 100
#: The figures each user's report carries (``per_user``), for paired comparisons of systems.
PAIRED_METRICS = ("recall@10", "ndcg@10")
#: EASE's L2 weights tried on the valid part (Steck reports 200-1000 on ML-20M-sized data).
EASE_L2_GRID = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)

__all__ = [
    "EASE_L2_GRID",
    "RankingTask",
    "Scorer",
    "evaluate",
    "evaluate_full_ranking",
    "evaluate_p1",
    "main",
    "make_ease",
    "ranking_task",
    "select_ease_l2",
]


class Scorer(Protocol):
    """What the harness needs from a recommender (the model or a baseline).

    Queries carry the query features of :func:`trainer.data.schema.query_feature_spec`; p4
    queries also carry ``heldout_user_id`` (their ``user_id`` is ``""``), which only
    baselines keeping their own copy of the fold-in part may read. A scorer may have a
    ``config`` dict (e.g. EASE's chosen λ): the report includes it.
    """

    name: str

    def score(self, queries: dict[str, np.ndarray]) -> np.ndarray:
        """Scores of every catalog item for each query: ``[B, N]`` in catalog order."""

    def item_embeddings(self) -> np.ndarray | None:
        """``[N, D]`` candidate embeddings (for diversity), or ``None``."""

    def predict_ratings(self, events: dict[str, np.ndarray]) -> np.ndarray | None:
        """Predicted rating of each event ``[E]``, or ``None`` without a ranking head."""


def _batched_scores(scorer: Scorer, queries: dict[str, np.ndarray], batch: int = 512):
    size = len(next(iter(queries.values())))
    for start in range(0, size, batch):
        yield start, scorer.score({k: v[start : start + batch] for k, v in queries.items()})


def evaluate_p1(scorer: Scorer, data_dir: str, catalog: dict[str, np.ndarray]) -> dict:
    """TFRS protocol: factorized top-k accuracy of each test rating, and the ranking RMSE."""
    test = records.load_events(data_dir, "p1", "test")
    index = index_of(catalog)
    truth = np.array([index[i] for i in test["item_id"]])
    curve_ks = range(1, metrics.CURVE_MAX_K + 1)  # K_ACCURACY's cut-offs are among them
    hits = {k: 0 for k in curve_ks}
    for start, scores in _batched_scores(scorer, test):
        part = metrics.factorized_top_k_accuracy(
            scores, truth[start : start + len(scores)], ks=curve_ks
        )
        for k in curve_ks:
            hits[k] += part[f"top_{k}_accuracy"] * len(scores)
    result = {f"top_{k}_accuracy": hits[k] / len(truth) for k in K_ACCURACY}
    accuracy = [hits[k] / len(truth) for k in curve_ks]
    result["curves"] = {"k": list(curve_ks), "top_k_accuracy": accuracy}
    predicted = scorer.predict_ratings(test)
    if predicted is not None:
        result["rmse"] = metrics.rmse(predicted, test["rating"])
    result["num_queries"] = len(truth)
    return result


def _user_topk(
    scorer: Scorer, queries: dict[str, np.ndarray], exclude: list[np.ndarray] | None, k: int
) -> np.ndarray:
    """Top-``k`` catalog rows ``[U, k]`` of each query; ``exclude[u]``: rows never returned."""
    top = []
    for start, scores in _batched_scores(scorer, queries):
        rows = None if exclude is None else exclude[start : start + len(scores)]
        top.append(ranking.top_k_from_scores(scores, k, rows))
    return np.concatenate(top) if top else np.zeros([0, k], np.int64)


@dataclasses.dataclass
class RankingTask:
    """One full-ranking evaluation: a query per user, what to leave out, what is relevant."""

    queries: dict[str, np.ndarray]  # query features, each [U] (history [U, H])
    exclude: list[np.ndarray]  # U arrays of catalog rows never recommended ("seen")
    truth: list[np.ndarray]  # U arrays of relevant catalog rows


def _rows(groups: dict[str, list[int]], users: np.ndarray) -> list[np.ndarray]:
    return [np.array(groups.get(u, []), dtype=np.int64) for u in users]


def heldout_users(data_dir: str, split: str, part: str) -> list[str]:
    """p4's new users whose targets are in ``part`` (``valid`` or ``test``), from the manifest."""
    entry = records.read_manifest(data_dir)["splits"].get(split, {})
    if "heldout_users" not in entry:
        raise DataError(
            f"{data_dir}: split {split!r} lists no held-out users (prepared before p4 existed? "
            "run `python -m trainer.data prepare --overwrite` again)"
        )
    return list(entry["heldout_users"][part])


def ranking_task(
    data_dir: str, split: str, catalog: dict[str, np.ndarray], part: str = "test"
) -> RankingTask:
    """The queries, exclusions and truth of a full-ranking protocol (p2, p3, p4) over ``part``.

    p2/p3: every user's train-part record; train (and, at test time, valid) items excluded.
    p4: the new users of ``part`` only, ``user_id`` blanked to ``""`` (kept under
    ``heldout_user_id`` for fold-in baselines); their fold-in items excluded.
    """
    index = index_of(catalog)
    users = records.load_users(data_dir, split)
    truth_by_user = items_by_user(records.load_events(data_dir, split, part), index)
    if split == "p4":
        wanted = heldout_users(data_dir, split, part)
        where = {u: n for n, u in enumerate(users["user_id"])}
        missing = [u for u in wanted if u not in where]
        if missing:
            raise DataError(
                f"{data_dir}/{split}: held-out users {missing[:5]} not in users.tfrecord"
            )
        rows = np.array([where[u] for u in wanted], dtype=np.int64)
        queries = {k: v[rows] for k, v in users.items()}
        ids = queries["user_id"]
        queries[HELDOUT_USER_KEY] = ids
        queries["user_id"] = np.full(len(ids), "", dtype=object)  # a new user has no id
        seen = items_by_user(records.load_events(data_dir, split, "foldin"), index)
        return RankingTask(queries, _rows(seen, ids), _rows(truth_by_user, ids))
    seen = items_by_user(records.load_events(data_dir, split, "train"), index)
    if part == "test":  # RecBole removes train and valid interactions when testing
        for user, items in items_by_user(
            records.load_events(data_dir, split, "valid"), index
        ).items():
            seen[user].extend(items)
    ids = users["user_id"]
    return RankingTask(users, _rows(seen, ids), _rows(truth_by_user, ids))


#: What each query of a full-ranking protocol sends (``--queries``).
QUERY_KINDS = ("prepared", "typed_titles")


def typed_titles_task(task: RankingTask, catalog: dict[str, np.ndarray]) -> RankingTask:
    """``task`` with each query cut to what a new user types: the profile and the liked titles
    of its query text (split as the model splits them, :func:`trainer.features.liked_titles`),
    with ``history`` and ``user_id`` blanked. The items those titles name go under
    ``typed_item_ids`` for the baselines that read ids (EASE folds them in); exclusions and
    truth are unchanged."""
    import tensorflow as tf

    from trainer.data import schema
    from trainer.features import liked_titles

    titles, ids = catalog["item_title"].astype(str), catalog["item_id"].astype(str)
    by_title = dict(zip(titles, ids, strict=True))
    texts = tf.constant(task.queries["query_text"].astype(str))
    pieces = liked_titles(texts, schema.QUERY_TITLES).numpy()
    typed = [[by_title[t] for t in map(bytes.decode, row) if t in by_title] for row in pieces]
    width = max(1, max(map(len, typed), default=0))
    queries = dict(task.queries)
    queries.pop(HELDOUT_USER_KEY, None)
    queries[TYPED_ITEMS_KEY] = np.array([t + [""] * (width - len(t)) for t in typed], object)
    queries["history"] = np.full_like(queries["history"][:, :1], "")
    queries["user_id"] = np.full(len(typed), "", dtype=object)
    return RankingTask(queries, task.exclude, task.truth)


def evaluate_full_ranking(
    scorer: Scorer,
    data_dir: str,
    split: str,
    catalog: dict[str, np.ndarray],
    part: str = "test",
    task: RankingTask | None = None,
) -> tuple[dict, np.ndarray]:
    """RecBole protocol over ``part``; returns the metrics and the users' top-``MMR_POOL`` lists."""
    task = task if task is not None else ranking_task(data_dir, split, catalog, part)
    pool = _user_topk(scorer, task.queries, task.exclude, MMR_POOL)
    truth = task.truth
    result = metrics.ranking_metrics(pool, truth, ks=K_RANKING)
    result.update(cold_item_metrics(pool, truth, np.flatnonzero(catalog["is_cold"] == 1)))
    return result, pool


def cold_item_metrics(
    top: np.ndarray, truth: list[np.ndarray], cold: np.ndarray
) -> dict[str, float]:
    """Recall@10 and NDCG@10 counting only the ``cold`` catalog rows among each user's truth,
    the users with any, and the cold rows' share of the top-10 slots; empty without cold rows.

    The evaluation's cold items are the catalog's ``is_cold`` ones (held out of training, p3);
    the ``--new-item-recall-share`` policy counts every item nobody rated in train (what the
    new-item bias lifts).

    Args:
      top: ``[U, K >= 10]`` catalog rows, each user's ranking.
      truth: ``U`` arrays of the catalog rows each user holds out.
      cold: ``[C]`` catalog rows.
    """
    if not len(cold):
        return {}
    cold_set = set(cold.tolist())
    cold_truth = [np.array([i for i in t if i in cold_set], dtype=np.int64) for t in truth]
    ranked = metrics.ranking_metrics(top, cold_truth, ks=(10,))
    return {
        "cold_recall@10": ranked["recall@10"],
        "cold_ndcg@10": ranked["ndcg@10"],
        "cold_num_users": ranked["num_users"],
        "cold_share_of_top10": float(np.isin(top[:, :10], cold).mean()),
    }


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
    task: RankingTask | None = None,
) -> list[dict]:
    """Recall@10 and diversity of MMR re-ranking of the top-``MMR_POOL`` at a few λ."""
    embeddings = scorer.item_embeddings()
    if embeddings is None:
        return []
    task = task if task is not None else ranking_task(data_dir, split, catalog, part)
    relevance = np.concatenate(
        [
            np.take_along_axis(s, np.clip(pool[start : start + len(s)], 0, None), axis=1)
            for start, s in _batched_scores(scorer, task.queries)
        ]
    )
    rows = []
    for lam in MMR_LAMBDAS:
        top10 = ranking.mmr_rerank(pool, relevance, embeddings, 10, lam)
        ranked = metrics.ranking_metrics(top10, task.truth, ks=(10,))
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
    scorer: Scorer,
    data_dir: str,
    split: str,
    *,
    mmr: bool = True,
    part: str = "test",
    queries: str = "prepared",
) -> dict:
    """Every figure of ``split`` for one scorer, as a JSON-ready dict.

    ``part="valid"`` (p2, p3, p4) scores the validation part instead, to choose settings
    without looking at the test part. ``queries="typed_titles"`` (p2-p4) sends each user as a
    new user who only types their liked titles (:func:`typed_titles_task`).
    """
    if part not in ("test", "valid"):
        raise DataError(f"--part must be test or valid, not {part!r}")
    if part == "valid" and split == "p1":
        raise DataError("p1 has no validation part (the TFRS protocol is train/test only)")
    if queries not in QUERY_KINDS:
        raise DataError(f"--queries must be one of {', '.join(QUERY_KINDS)}, not {queries!r}")
    if queries != "prepared" and split == "p1":
        raise DataError("--queries typed_titles is for the per-user protocols (p2, p3, p4)")
    start = time.time()
    catalog = records.load_catalog(data_dir, split)
    task = None
    if split == "p1":
        result = evaluate_p1(scorer, data_dir, catalog)
        users = records.load_users(data_dir, split)
        pool = _user_topk(scorer, users, None, MMR_POOL)
    else:
        task = ranking_task(data_dir, split, catalog, part)
        if queries == "typed_titles":
            task = typed_titles_task(task, catalog)
        result, pool = evaluate_full_ranking(scorer, data_dir, split, catalog, part, task)
    curves = result.pop("curves", None) or metrics.ranking_curves(pool, task.truth)
    result.update(beyond_accuracy(scorer, pool[:, :10], catalog))
    out = {"scorer": scorer.name, "split": split, "part": part, "metrics": result}
    if queries != "prepared":
        out["queries"] = queries
    out["curves"] = curves  # recall/NDCG (p1: top-k accuracy) at k = 1..100, for the plots
    out["exposure"] = plots.exposure_summary(pool[:, :10], catalog["popularity"])
    if getattr(scorer, "config", None):
        out["scorer_config"] = scorer.config
    if mmr and split != "p1":
        out["mmr"] = mmr_tradeoff(scorer, pool, data_dir, split, catalog, part, task)
    if task is not None:
        out["per_user"] = per_user_figures(pool, task)
    out["seconds"] = round(time.time() - start, 1)
    return out


def per_user_figures(pool: np.ndarray, task: RankingTask) -> dict[str, list]:
    """``{"user_id": [U'], "recall@10": [U'], "ndcg@10": [U']}`` of the users with relevant
    items, from their ranked lists ``pool`` ``[U, K]``: what two systems scored on the same
    users are compared by (:func:`trainer.metrics.paired_difference`). p4's users go by their
    held-out id; a query sent without one (typed titles) by its row, ``#i``, which is the same
    for every system of the protocol."""
    figures, users = metrics.per_user_ranking_metrics(pool, task.truth, ks=(10,))
    ids = np.asarray(task.queries.get(HELDOUT_USER_KEY, task.queries["user_id"])).astype(str)
    out: dict[str, list] = {"user_id": [ids[u] or f"#{u}" for u in users]}
    for name in PAIRED_METRICS:
        out[name] = [round(float(v), 6) for v in figures[name]]
    return out


# --------------------------------------------------------------------------- EASE's λ


def _p1_valid_task(
    train: dict[str, np.ndarray], catalog: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], RankingTask]:
    """p1 has no valid part: the training loop's seeded 5% slice of train is held out.

    Returns the rest of train (to fit on) and a per-user ranking task over the slice: the
    query is the user id (EASE reads the user's remaining train row), train items excluded.
    """
    import tensorflow as tf

    from trainer.config import DataConfig
    from trainer.input_pipeline import holdout_mask  # the very slice the loop validates on

    keys = {k: tf.constant(train[k]) for k in ("user_id", "item_id", "timestamp")}
    mask = holdout_mask(keys, DataConfig().valid_fraction).numpy()
    fit = {k: v[~mask] for k, v in train.items()}
    held = {k: v[mask] for k, v in train.items()}
    index = index_of(catalog)
    seen = items_by_user(fit, index)
    truth = items_by_user(held, index)
    ids = np.array(sorted(truth), dtype=object)
    queries = {"user_id": ids}
    return fit, RankingTask(queries, _rows(seen, ids), _rows(truth, ids))


def select_ease_l2(
    data_dir: str, split: str, grid: tuple[float, ...] = EASE_L2_GRID
) -> tuple[float, list[dict]]:
    """EASE's L2 weight with the best per-user valid recall@10 (ties: NDCG@10) over ``grid``.

    Fits on the train part (p1: train less the held-out slice) and ranks the valid part as
    :func:`evaluate_full_ranking` does (p4: the valid new users, folded in). Returns the
    chosen λ and one ``{"l2", "recall@10", "ndcg@10"}`` row per λ tried.
    """
    if not grid:
        raise DataError("EASE needs at least one L2 weight to try")
    catalog = records.load_catalog(data_dir, split)
    parts = records.read_manifest(data_dir)["splits"][split]["parts"]
    train = records.load_events(data_dir, split, "train")
    foldin = records.load_events(data_dir, split, "foldin") if "foldin" in parts else None
    if "valid" in parts:
        fit, task = train, ranking_task(data_dir, split, catalog, "valid")
    else:
        fit, task = _p1_valid_task(train, catalog)
    index = index_of(catalog)
    g = gram(binary_matrix(item_rows(fit, index), len(index)))  # one XᵀX for the whole grid
    rows = []
    for l2 in grid:
        scorer = EaseScorer.fit(catalog, fit, l2, foldin, g=g)
        top = _user_topk(scorer, task.queries, task.exclude, 10)
        ranked = metrics.ranking_metrics(top, task.truth, ks=(10,))
        rows.append(
            {"l2": float(l2), "recall@10": ranked["recall@10"], "ndcg@10": ranked["ndcg@10"]}
        )
    best = max(rows, key=lambda r: (r["recall@10"], r["ndcg@10"], -r["l2"]))
    return best["l2"], rows


def make_ease(data_dir: str, split: str, l2: float | None = None) -> EaseScorer:
    """EASE fitted on the split's train part, λ pinned by ``l2`` or chosen on valid."""
    if l2 is not None and not (np.isfinite(l2) and l2 > 0):
        raise DataError(f"--ease-l2 must be a positive number, got {l2}")
    config: dict = {"l2": l2, "chosen_on": "pinned (--ease-l2)"}
    if l2 is None:
        l2, grid = select_ease_l2(data_dir, split)
        config = {
            "l2": l2,
            "chosen_on": "valid part" if split != "p1" else "5% of train held out (as the loop)",
            "grid": grid,
        }
    parts = records.read_manifest(data_dir)["splits"][split]["parts"]
    foldin = records.load_events(data_dir, split, "foldin") if "foldin" in parts else None
    scorer = EaseScorer.fit(
        records.load_catalog(data_dir, split),
        records.load_events(data_dir, split, "train"),
        l2,
        foldin,
    )
    scorer.config = config
    return scorer


def format_report(report: dict) -> str:
    part = report.get("part", "test")
    lines = [f"{report['scorer']} on {report['split']} {part} ({report['seconds']}s)"]
    rows = [
        {"metric": k, "value": f"{v:.4f}" if isinstance(v, float) else str(v)}
        for k, v in report["metrics"].items()
    ]
    lines.append(metrics.format_table(rows, ["metric", "value"]))
    config = report.get("scorer_config") or {}
    if config.get("grid"):
        lines.append(f"\nL2 weight chosen on the {config['chosen_on']}: {config['l2']:g}")
        lines.append(metrics.format_table(config["grid"], ["l2", "recall@10", "ndcg@10"]))
    elif "l2" in config:
        lines.append(f"\nL2 weight {config['l2']:g} ({config['chosen_on']})")
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
    parser.add_argument(
        "--split",
        required=True,
        choices=["p1", "p2", "p3", "p4"],
        help="protocol: p1 TFRS, p2 RecBole, p3 cold-start items, p4 new users (see above)",
    )
    parser.add_argument("--model-dir", help="trained model directory (omit with --baseline)")
    parser.add_argument(
        "--baseline", choices=["popularity", "ease"], help="evaluate a baseline instead"
    )
    parser.add_argument(
        "--ease-l2",
        type=float,
        help="pin EASE's L2 weight (default: chosen on the valid part from "
        + ", ".join(f"{v:g}" for v in EASE_L2_GRID)
        + ")",
    )
    parser.add_argument(
        "--output",
        help="write the report as JSON here, and beside it the plots (NAME.ranking.png, "
        "NAME.exposure.png, with --model-dir NAME.training.png); with --model-dir the model "
        "dir's MODEL_CARD.md gets the figures of this report and of the baselines beside it",
    )
    parser.add_argument("--no-mmr", action="store_true", help="skip the MMR trade-off")
    parser.add_argument(
        "--part",
        default="test",
        choices=["test", "valid"],
        help="which held-out part to score (valid: p2, p3 and p4, for choosing settings)",
    )
    parser.add_argument(
        "--queries",
        default="prepared",
        choices=QUERY_KINDS,
        help="prepared: each user's query as prepared (profile, history, typed titles); "
        "typed_titles (p2-p4): only the profile and the liked titles of the query text, no "
        "history and no user id, as a new user who types what they liked (EASE folds in the "
        "items those titles name)",
    )
    return parser


def load_scorer(args: argparse.Namespace) -> Scorer:
    if args.ease_l2 is not None and args.baseline != "ease":
        raise DataError("--ease-l2 is only for --baseline ease")
    if args.baseline == "ease":
        return make_ease(args.data, args.split, args.ease_l2)
    if args.baseline == "popularity":
        return PopularityScorer(records.load_catalog(args.data, args.split)["popularity"])
    if not args.model_dir:
        raise DataError("give --model-dir (a trained model) or --baseline")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise ConfigError(
            f"--model-dir {args.model_dir} is not a trained model dir (no config.json)"
        )
    from trainer.inference import ModelScorer  # TensorFlow model code only when needed

    return ModelScorer.from_model_dir(args.model_dir, records.load_catalog(args.data, args.split))


def run(args: argparse.Namespace) -> None:
    """Evaluates, prints the report and writes it (and its plots, the card) under ``--output``."""
    records.part_files(args.data, args.split, args.part)
    report = evaluate(
        load_scorer(args),
        args.data,
        args.split,
        mmr=not args.no_mmr,
        part=args.part,
        queries=args.queries,
    )
    print(format_report(report))
    if args.output:
        staging.write_json(args.output, report)
        model_dir = None if args.baseline else args.model_dir
        for path in plots.write_report_plots(report, args.output, model_dir):
            print(f"wrote {path}")
        if model_dir:
            from trainer import model_card

            print(f"wrote {model_card.refresh_model_dir_card(model_dir, args.output)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # DataError and ConfigError are usage errors; a missing data file is the user's to fix too.
    return cli.run(lambda: run(args), expected=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
