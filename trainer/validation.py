"""Validation at the end of each epoch: full-catalog recall on the validation data, and RMSE.

The figures are those of the evaluation, computed by the same functions: per-user recall with
:func:`trainer.evaluate.ranking_task`'s queries, exclusions and truth scored by
:func:`trainer.metrics.ranking_metrics`; per-event recall (p1) by
:func:`trainer.metrics.factorized_top_k_accuracy`; RMSE by :func:`trainer.metrics.rmse`,
unclipped, as the test RMSE.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from common import contract
from trainer import content_prior, item_item, metrics, ranking
from trainer.baselines import binary_matrix, ease_from_gram, gram, item_rows
from trainer.config import TrainConfig
from trainer.data import records
from trainer.evaluate import EASE_L2_GRID, RankingTask, cold_item_metrics
from trainer.inference import embed, predict_ratings
from trainer.input_pipeline import DataPlan
from trainer.model import TwoTowerModel, log_popularity_by_row

#: Validation events whose rating the RMSE compares (the first ones; the figure is a mean).
_RMSE_EVENTS = 20_000
_KS = (10, 50)


#: Popularity-prior weights tried on the valid part after training (cosine units per unit of
#: log(1 + train count); on p2 the valid recall@10 peaked near 0.05).
PRIOR_WEIGHTS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15)
#: New-item biases tried with them when the catalog has items nobody rated in train (cosine
#: units; p3 valid recall@10 is flat up to 0.1 while cold recall@10 grows 4x).
NEW_ITEM_BIASES = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2)


def evaluate_validation(
    model: TwoTowerModel, plan: DataPlan, config: TrainConfig, *, rmse: bool = True
) -> dict:
    """Full-catalog recall@10 / @50 on the validation data, and RMSE.

    With a valid part (p2-p4) recall is per user, as the protocol measures it
    (:func:`trainer.evaluate.ranking_task` over the valid part). Otherwise (p1's held-out slice of
    train) it is per event over a sample of positive events, each with its own past. Either way
    the user's training items are removed from the ranking, as evaluation removes them.

    Runs on every worker (same weights, same data: same answer, so early stopping agrees).

    Returns:
      ``valid_examples`` and, when there are validation events, ``recall_at_10``,
      ``recall_at_50`` (when any event is positive, or with a valid part) and ``rmse`` (unless
      ``rmse`` is False).
    """
    valid = plan.valid
    out: dict[str, float] = {"valid_examples": float(len(valid["rating"]))}
    if not len(valid["rating"]):
        return out
    queries = _recall_queries(plan, config)
    if queries is not None:
        scores = embed(model, "query", queries) @ embed(model, "candidate", plan.catalog).T
        out.update(_recall(scores, plan, queries))
    if not rmse:
        return out
    cap = min(len(valid["rating"]), _RMSE_EVENTS)
    subset = {k: v[:cap] for k, v in valid.items()}
    q = embed(model, "query", subset)
    c = embed(model, "candidate", subset)
    out["rmse"] = metrics.rmse(predict_ratings(model, q, c, subset), subset["rating"])
    return out


def choose_prior_weight(model: TwoTowerModel, plan: DataPlan, config: TrainConfig) -> dict:
    """Sets the model's popularity-prior weight ``w``, new-item bias ``b`` and the log counts of
    the items nobody rated in train to the best valid recall@10 (the early-stopping figure) over
    :data:`PRIOR_WEIGHTS` x :data:`NEW_ITEM_BIASES` x {the neutral mean, the genres-and-year
    guess of :mod:`trainer.content_prior`}; ties go to the smaller ``w``, the smaller ``b``,
    then the neutral mean. ``b`` and the guess are only tried when some catalog item has no
    train rating, and ``--new-item-bias`` fixes ``b``.

    The settings are tried on the valid part only; without valid events ``w`` stays 0 (``b`` as
    fixed) and the table neutral. Returns ``{"weight": w, "new_item_bias": b, "content_prior":
    bool, "valid_recall_at_10": {str(w): recall at b}, "new_item_bias_valid_recall_at_10":
    {str(b): recall at w}}`` (empty curves without valid events), plus ``"content_fit"`` (the
    guess's L2 weight and out-of-fold R^2) when a guess was tried, for ``metrics.json``.
    """
    if model.prior_weight is None:
        return {}
    fixed = config.model.new_item_bias
    queries = _recall_queries(plan, config)
    tables = {False: log_popularity_by_row(model.assets.popularity)}
    model.prior_log_count.assign(tables[False])
    if queries is None:
        bias = fixed or 0.0
        model.prior_weight.assign(0.0)
        model.new_item_bias.assign(bias)
        return {
            "weight": 0.0,
            "new_item_bias": bias,
            "content_prior": False,
            "valid_recall_at_10": {},
        }
    # score = cosine + w * log(1 + count) + b * untrained: one pass through each tower serves
    # the whole grid (ten passes made validation 10x dearer, live BERT included); the prior's
    # terms are per-row tables, read without a tower.
    dim = model.model_config.embedding_dim
    items = embed(model, "candidate", plan.catalog)[:, :dim]
    cosine = embed(model, "query", queries)[:, :dim] @ items.T
    rows = np.asarray(
        model.preprocessor.item_rows(tf.constant(plan.catalog["item_id"].astype(str)))
    )
    new = np.asarray(model.prior_terms(rows))[:, 1]
    extra: dict = {}
    a, guess = model.assets, None
    if new.any():
        guess = content_prior.predicted_log_counts(a.popularity, a.item_genres, a.item_years)
    if guess is not None:
        tables[True] = log_popularity_by_row(a.popularity, guess[0])
        extra["content_fit"] = guess[1]
    biases = (fixed,) if fixed is not None else NEW_ITEM_BIASES if new.any() else (0.0,)
    figures = {
        (w, b, c): _recall(cosine + w * table[rows] + b * new, plan, queries)
        for c, table in tables.items()
        for w in PRIOR_WEIGHTS
        for b in biases
    }
    grid = {wbc: f["recall_at_10"] for wbc, f in figures.items()}
    share = config.model.new_item_recall_share
    if share is not None and any("new_item_recall_at_10" in f for f in figures.values()):
        extra["new_item_recall_share"] = _new_item_share_choice(figures, share)
        unrated = _unrated_rows(plan.catalog)
        users = sum(bool(np.isin(t, unrated).any()) for t in plan.ranking.truth)
        extra["new_item_recall_share"]["valid_users"] = users
        best = extra["new_item_recall_share"]["chosen"]
    else:
        best = max(grid, key=_preference(grid))
    w, b, content = best
    model.prior_weight.assign(w)
    model.new_item_bias.assign(b)
    model.prior_log_count.assign(tables[content])
    return {
        "weight": w,
        "new_item_bias": b,
        "content_prior": content,
        "valid_recall_at_10": {str(x): grid[x, b, content] for x in PRIOR_WEIGHTS},
        "new_item_bias_valid_recall_at_10": {str(x): grid[w, x, content] for x in biases},
        **extra,
    }


def choose_item_item(model: TwoTowerModel, plan: DataPlan, config: TrainConfig) -> dict:
    """Fits the item-item term (:mod:`trainer.item_item`) after training, on the valid part only.

    ``B``: EASE fit on the events the model trained on (p2-p4: the train part; p1: train less
    its held-out slice), its ``λ`` the one of :data:`trainer.evaluate.EASE_L2_GRID` whose EASE
    scores of the valid queries' histories rank best alone (valid recall@10, ties to the
    smaller). ``α``: the best valid recall@10 of the served score (the prior as chosen) over
    :data:`trainer.item_item.ITEM_ITEM_WEIGHTS`, ties to the smaller; ``--item-item-weight``
    fixes it. Chosen with it: whether the columns of the items nobody rated there are filled
    from :data:`trainer.item_item.NEW_ITEM_NEIGHBOURS` text neighbours
    (:func:`trainer.item_item.fill_new_items`; ties to no fill). With
    ``--new-item-recall-share``, only the choices whose valid new-item share stays at least
    what α = 0 reaches (capped at the share) are tried. Without valid queries α stays 0 (or as
    fixed). Returns what ``metrics.json`` records; ``{}`` without the term.
    """
    if model.item_item is None:
        return {}
    fixed = config.model.item_item_weight
    queries = _recall_queries(plan, config)
    if queries is None:
        model.item_item_weight.assign(fixed or 0.0)
        return {"weight": fixed or 0.0, "l2": None, "valid_recall_at_10": {}}
    index = ranking.index_of(plan.catalog)
    if plan.users is not None:
        fit = records.load_events(plan.data_dir, plan.split, "train")
        g = gram(binary_matrix(item_rows(fit, index), len(index)))
    else:  # p1: what the training stream holds (train less the held-out slice)
        g = gram(binary_matrix({u: np.unique(r) for u, r in plan.seen.items()}, len(index)))
    ease_recall: dict[float, float] = {}
    best: tuple[float, np.ndarray, np.ndarray] | None = None  # (λ, B, e): one [N, N] kept
    for l2 in EASE_L2_GRID:
        weights_l2 = ease_from_gram(g, l2).astype(np.float32)
        e = item_item.ease_scores(queries[contract.HISTORY], index, weights_l2)
        ease_recall[l2] = _recall(e.copy(), plan, queries)["recall_at_10"]
        if best is None or round(ease_recall[l2], 9) > round(ease_recall[best[0]], 9):
            best = (l2, weights_l2, e)
    l2, fit_weights, e = best
    items = embed(model, "candidate", plan.catalog)
    served = embed(model, "query", queries) @ items.T
    unrated = int((~fit_weights.any(axis=0)).sum())
    fills = {0: (fit_weights, e)}  # neighbours -> (B, e = x B)
    if unrated:  # the fill is a choice: it helps random new items, not a long tail's (p2)
        filled = item_item.fill_new_items(fit_weights, items[:, : config.model.embedding_dim])
        fills[item_item.NEW_ITEM_NEIGHBOURS] = (
            filled,
            item_item.ease_scores(queries[contract.HISTORY], index, filled),
        )
    weights = (fixed,) if fixed is not None else item_item.ITEM_ITEM_WEIGHTS
    figures = {}  # (neighbours, α) -> valid figures
    for neighbours, (_, e) in fills.items():
        for a in weights:
            blended = item_item.blend_full(served, e, a).copy()
            figures[neighbours, a] = _recall(blended, plan, queries)
    allowed = list(figures)
    share = config.model.new_item_recall_share
    if share is not None and fixed is None and "new_item_recall_at_10" in figures[0, 0.0]:
        floor = min(share, _share(figures[0, 0.0]))
        allowed = [c for c in figures if _share(figures[c]) >= floor]
    neighbours, alpha = max(
        allowed, key=lambda c: (round(figures[c]["recall_at_10"], 9), -c[1], -c[0])
    )
    model.item_item.assign(fills[neighbours][0])
    model.item_item_weight.assign(alpha)
    model.item_item_neighbours.assign(neighbours)
    return {
        "weight": alpha,
        "l2": l2,
        "new_item_neighbours": neighbours,
        "unrated_items": unrated,
        "ease_valid_recall_at_10": {str(x): ease_recall[x] for x in EASE_L2_GRID},
        "valid_recall_at_10": {str(a): figures[0, a]["recall_at_10"] for a in weights},
        "valid_recall_at_10_filled": {
            str(a): figures[n, a]["recall_at_10"] for n, a in figures if n
        },
    }


def _share(figures: dict[str, float]) -> float:
    """Valid new-item recall@10 as a share of recall@10."""
    return figures.get("new_item_recall_at_10", 0.0) / max(figures["recall_at_10"], 1e-12)


def _new_item_share_choice(figures: dict[tuple, dict[str, float]], share: float) -> dict:
    """The ``--new-item-recall-share`` policy over the prior's grid ``{(w, b, content): valid
    figures}``: the best valid recall@10 among the settings whose recall@10 on the items nobody
    rated in train is at least ``share`` x their recall@10 (ties as the unconstrained grid);
    when none reaches it, the setting nearest it (the highest ratio, then recall). Returns the
    choice, whether it met the share, and its valid ratio and recall@10, for ``metrics.json``."""

    def ratio(wbc: tuple) -> float:
        return _share(figures[wbc])

    order = _preference({wbc: f["recall_at_10"] for wbc, f in figures.items()})
    meeting = [wbc for wbc in figures if ratio(wbc) >= share]
    if meeting:
        chosen = max(meeting, key=order)
    else:
        chosen = max(figures, key=lambda wbc: (round(ratio(wbc), 9), *order(wbc)))
    return {
        "share": share,
        "met": bool(meeting),
        "chosen": chosen,
        "valid_ratio": ratio(chosen),
        "valid_recall_at_10": figures[chosen]["recall_at_10"],
        "valid_new_item_recall_at_10": figures[chosen].get("new_item_recall_at_10", 0.0),
    }


def _preference(recall: dict[tuple, float]):
    """The prior grid's order over ``(w, b, content)`` settings, as a ``max`` key: the higher
    valid recall@10 (to 9 decimals), then the smaller ``w``, the smaller ``b``, the mean
    before the guess."""
    return lambda wbc: (round(recall[wbc], 9), -wbc[0], -wbc[1], -wbc[2])


def _unrated_rows(catalog: dict[str, np.ndarray]) -> np.ndarray:
    """``[C]`` catalog rows of the items nobody rated in train (what the new-item bias lifts)."""
    return np.flatnonzero(np.asarray(catalog["popularity"]) <= 0)


def _recall_queries(plan: DataPlan, config: TrainConfig) -> dict | None:
    """The queries the valid recall ranks for: every valid user's (a valid part: p2-p4), else
    a sample of positive validation events, each with its own past (p1); None without
    validation events, or when p1 has no positive one."""
    if not len(plan.valid["rating"]):
        return None
    if plan.ranking is not None:
        return plan.ranking.queries
    positive = _positive_sample(plan.valid["rating"], config)
    if not len(positive):
        return None
    return {k: v[positive] for k, v in plan.valid.items()}


def _recall(scores: np.ndarray, plan: DataPlan, queries: dict) -> dict[str, float]:
    """``recall_at_10`` / ``_50`` of ``scores`` ``[Q, N]`` (``queries`` against the catalog)."""
    if plan.ranking is not None:
        return _per_user_recall(scores, plan.ranking, plan.catalog)
    return _per_event_recall(scores, plan, queries)


def _positive_sample(rating: np.ndarray, config: TrainConfig) -> np.ndarray:
    """Rows ``[P]`` of at most ``--valid-queries`` positive events, sorted; seeded."""
    positive = np.flatnonzero(rating >= config.model.positive_threshold)
    rng = np.random.default_rng(config.optim.seed)
    if len(positive) > config.data.valid_queries:
        positive = np.sort(rng.choice(positive, config.data.valid_queries, replace=False))
    return positive


def _per_user_recall(
    scores: np.ndarray, task: RankingTask, catalog: dict[str, np.ndarray]
) -> dict[str, float]:
    """RecBole recall of each user's top 50 of ``scores`` ``[U, N]``, seen items left out, and
    ``new_item_recall_at_10`` over the items nobody rated in train when some valid user holds
    any (p3's cold movies)."""
    top = ranking.top_k_from_scores(scores, max(_KS), task.exclude)
    ranked = metrics.ranking_metrics(top, task.truth, ks=_KS)
    out = {f"recall_at_{k}": ranked[f"recall@{k}"] for k in _KS}
    cold = cold_item_metrics(top, task.truth, _unrated_rows(catalog))
    if cold.get("cold_num_users"):
        out["new_item_recall_at_10"] = cold["cold_recall@10"]
    return out


def _per_event_recall(scores: np.ndarray, plan: DataPlan, queries: dict) -> dict[str, float]:
    """Top-k accuracy of the validation events ``queries`` from their ``scores`` ``[P, N]``.

    Each event's query ranks the whole catalog but the user's training items; an event whose
    item is not in the catalog is a miss. ``scores`` is changed in place.
    """
    for row, user in enumerate(queries["user_id"]):
        scores[row, plan.seen.get(user, [])] = -np.inf
    index = ranking.index_of(plan.catalog)
    truth = np.array([index.get(i, -1) for i in queries["item_id"]], dtype=np.int64)
    unknown = np.flatnonzero(truth < 0)
    truth[unknown] = 0
    scores[unknown, 0] = -np.inf  # a true score that is not finite: a miss, as in_top_k
    accuracy = metrics.factorized_top_k_accuracy(scores, truth, ks=_KS)
    return {f"recall_at_{k}": accuracy[f"top_{k}_accuracy"] for k in _KS}
