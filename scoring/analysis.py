"""What a scored table says: ranking metrics, exposure, genre mix, MMR trade-off, explanations.

A *scored table* is what :func:`scoring.batch_score.score_users` returns or
:func:`scoring.shards.read_results` reads: a pandas DataFrame with one row per user and rank
(columns :data:`scoring.shards.COLUMNS`). The metrics are :mod:`trainer.metrics`' (one
definition of each); catalog rows are :func:`trainer.ranking.index_of`'s.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from scoring.backends import Retriever
from scoring.batch_score import score_users
from trainer import metrics, ranking
from trainer.data import records


def top_k_matrix(results, user_ids: Sequence[str], catalog: dict[str, np.ndarray], k: int):
    """A scored table -> ``[U, k]`` catalog indices in ``user_ids`` order (``-1`` = none)."""
    index = ranking.index_of(catalog)
    position = {str(u): i for i, u in enumerate(user_ids)}
    top = np.full((len(user_ids), k), -1, dtype=np.int64)
    frame = results[results["rank"] <= k]
    rows = frame["user_id"].map(position)
    cols = frame["item_id"].map(index)
    ok = rows.notna().to_numpy() & cols.notna().to_numpy()
    top[rows[ok].astype(np.int64).to_numpy(), frame["rank"][ok].to_numpy() - 1] = (
        cols[ok].astype(np.int64).to_numpy()
    )
    return top


def truth_lists(
    data_dir: str,
    split: str,
    user_ids: Sequence[str],
    catalog: dict[str, np.ndarray],
    part: str = "test",
) -> list[np.ndarray]:
    """Each user's ``part`` items as catalog indices (the relevant sets of ``ranking_metrics``)."""
    events = records.load_events(data_dir, split, part)
    groups = ranking.items_by_user(events, ranking.index_of(catalog))
    return [np.array(groups.get(u, []), dtype=np.int64) for u in user_ids]


def evaluate_results(
    results,
    data_dir: str,
    split: str,
    *,
    catalog: dict[str, np.ndarray] | None = None,
    item_embeddings: np.ndarray | None = None,
    ks: Sequence[int] = (10,),
    part: str = "test",
) -> dict[str, float]:
    """RecBole-style metrics of a scored table against ``part``, plus beyond-accuracy figures.

    The protocol is whatever the scoring run did: with ``--exclude-seen`` (train items) it is
    close to RecBole's full ranking on p1; on p2/p3 RecBole also removes valid items
    (``--exclude-parts train,valid``). Figures are over users with ``part`` items.
    ``item_embeddings`` ``[N, D]`` (catalog order) add the intra-list diversity.
    """
    catalog = records.load_catalog(data_dir, split) if catalog is None else catalog
    user_ids = list(dict.fromkeys(results["user_id"]))
    top = top_k_matrix(results, user_ids, catalog, max(ks))
    out = metrics.ranking_metrics(top, truth_lists(data_dir, split, user_ids, catalog, part), ks)
    num_items = len(catalog["item_id"])
    k = max(ks)
    out[f"coverage@{k}"] = metrics.catalog_coverage(top, num_items)
    out[f"gini@{k}"] = metrics.gini_index(top, num_items)
    out[f"popularity_percentile@{k}"] = metrics.popularity_percentile(top, catalog["popularity"])
    if item_embeddings is not None:
        out[f"intra_list_diversity@{k}"] = metrics.intra_list_diversity(top, item_embeddings)
    return out


def lorenz_curve(results, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Exposure Lorenz curve over the whole catalog (never-shown items count as 0).

    Returns ``(x, y)``, both ``[N + 1]`` from 0 to 1: the least-exposed ``x`` share of items
    gets the ``y`` share of all recommendation slots (the diagonal = equal exposure).
    """
    shown = results["item_id"].value_counts().to_numpy()
    if len(shown) > num_items:
        raise ValueError(f"{len(shown)} distinct items recommended, catalog has {num_items}")
    counts = np.sort(np.concatenate([np.zeros(num_items - len(shown)), shown]))
    x = np.linspace(0.0, 1.0, num_items + 1)
    total = counts.sum()
    y = np.concatenate([[0.0], np.cumsum(counts) / total]) if total else x.copy()
    return x, y


def genre_mix(item_ids: Sequence[str], catalog: dict[str, np.ndarray]) -> dict[str, float]:
    """Share of each genre among ``item_ids`` (an item with g genres counts 1/g to each)."""
    genres = {
        str(i): str(g).split("|")
        for i, g in zip(catalog["item_id"], catalog["item_genres"], strict=True)
    }
    totals: dict[str, float] = defaultdict(float)
    count = 0
    for item in item_ids:
        names = [g for g in genres.get(str(item), []) if g]
        if not names:
            continue
        count += 1
        for name in names:
            totals[name] += 1.0 / len(names)
    return {g: v / count for g, v in sorted(totals.items())} if count else {}


def diversity_tradeoff(
    scorer: Retriever,
    users: dict[str, np.ndarray],
    data_dir: str,
    split: str,
    lambdas: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    *,
    k: int = 10,
    seen: dict[str, list[str]] | None = None,
    catalog: dict[str, np.ndarray] | None = None,
    item_embeddings: np.ndarray | None = None,
    batch_size: int = 256,
) -> list[dict[str, float]]:
    """Recall@k and intra-list diversity of the export's own MMR at each λ (``diversity``)."""
    catalog = records.load_catalog(data_dir, split) if catalog is None else catalog
    if item_embeddings is None:
        item_embeddings = scorer.candidate_embeddings(catalog)
    rows = []
    for lam in lambdas:
        table = score_users(
            scorer, users, k, seen=seen, diversity=float(lam), batch_size=batch_size
        )
        result = evaluate_results(
            table, data_dir, split, catalog=catalog, item_embeddings=item_embeddings, ks=(k,)
        )
        rows.append(
            {
                "lambda": float(lam),
                f"recall@{k}": result[f"recall@{k}"],
                f"ndcg@{k}": result[f"ndcg@{k}"],
                f"intra_list_diversity@{k}": result[f"intra_list_diversity@{k}"],
                f"coverage@{k}": result[f"coverage@{k}"],
            }
        )
    return rows


def explain(
    results,
    users: dict[str, np.ndarray],
    catalog: dict[str, np.ndarray],
    item_embeddings: np.ndarray,
    user_ids: Sequence[str],
    *,
    top: int = 3,
    neighbours: int = 2,
) -> list[dict[str, Any]]:
    """For each user's first ``top`` recommendations, the nearest movies of their history.

    Nearness is the cosine between candidate-tower embeddings ``[N, D]`` (the export's
    ``candidate_embedding``): "recommended because you liked ...". Rows: user_id, rank, title,
    score, because (list of ``(history title, cosine)``).
    """
    index = ranking.index_of(catalog)
    unit = item_embeddings / np.maximum(
        np.linalg.norm(item_embeddings, axis=1, keepdims=True), 1e-12
    )
    row_of = {str(u): i for i, u in enumerate(users["user_id"])}
    out = []
    for user in user_ids:
        history = [index[h] for h in users["history"][row_of[str(user)]] if h in index]
        recs = results[(results["user_id"] == str(user)) & (results["rank"] <= top)]
        for rec in recs.sort_values("rank").itertuples():
            item = index.get(rec.item_id)
            if item is None or not history:
                continue
            cosines = unit[history] @ unit[item]
            best = np.argsort(-cosines, kind="stable")[:neighbours]
            out.append(
                {
                    "user_id": str(user),
                    "rank": int(rec.rank),
                    "title": rec.title,
                    "score": float(rec.score),
                    "because": [
                        (str(catalog["item_title"][history[j]]), float(cosines[j])) for j in best
                    ],
                }
            )
    return out
