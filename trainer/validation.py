"""Validation at the end of each epoch: full-catalog recall on the validation data, and RMSE.

The figures are those of the evaluation, computed by the same functions: per-user recall with
:func:`trainer.evaluate.ranking_task`'s queries, exclusions and truth scored by
:func:`trainer.metrics.ranking_metrics`; per-event recall (p1) by
:func:`trainer.metrics.factorized_top_k_accuracy`; RMSE by :func:`trainer.metrics.rmse`,
unclipped, as the test RMSE.
"""

from __future__ import annotations

import numpy as np

from trainer import metrics, ranking
from trainer.config import TrainConfig
from trainer.evaluate import RankingTask
from trainer.inference import embed, predict_ratings
from trainer.input_pipeline import DataPlan
from trainer.model import TwoTowerModel

#: Validation events whose rating the RMSE compares (the first ones; the figure is a mean).
_RMSE_EVENTS = 20_000
_KS = (10, 50)


#: Popularity-prior weights tried on the valid part after training (cosine units per unit of
#: log(1 + train count); on p2 the valid recall@10 peaked near 0.05).
PRIOR_WEIGHTS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15)


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
    """Sets the model's popularity-prior weight to the one of :data:`PRIOR_WEIGHTS` with the
    best valid recall@10 (the early-stopping figure; ties go to the smaller weight).

    The weights are tried on the valid part only; without valid events the prior stays 0.
    Returns ``{"weight": w, "valid_recall_at_10": {str(weight): recall}}`` (empty curve
    without valid events), for ``metrics.json``.
    """
    if model.prior_weight is None:
        return {}
    model.prior_weight.assign(0.0)
    queries = _recall_queries(plan, config)
    if queries is None:
        return {"weight": 0.0, "valid_recall_at_10": {}}
    # score(w) = cosine + w * log(1 + count): one pass through the towers serves the whole
    # grid (ten passes made validation 10x dearer, live BERT included). At w = 1 the items'
    # prior column is log(1 + count) itself.
    dim = model.model_config.embedding_dim
    model.prior_weight.assign(1.0)
    items = embed(model, "candidate", plan.catalog)
    model.prior_weight.assign(0.0)
    cosine = embed(model, "query", queries)[:, :dim] @ items[:, :dim].T
    log_count = items[:, dim]
    curve: dict[str, float] = {}
    best, best_recall = 0.0, -1.0
    for weight in PRIOR_WEIGHTS:
        recall = _recall(cosine + weight * log_count, plan, queries)["recall_at_10"]
        curve[str(weight)] = recall
        if recall > best_recall + 1e-9:
            best, best_recall = weight, recall
    model.prior_weight.assign(best)
    return {"weight": best, "valid_recall_at_10": curve}


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
        return _per_user_recall(scores, plan.ranking)
    return _per_event_recall(scores, plan, queries)


def _positive_sample(rating: np.ndarray, config: TrainConfig) -> np.ndarray:
    """Rows ``[P]`` of at most ``--valid-queries`` positive events, sorted; seeded."""
    positive = np.flatnonzero(rating >= config.model.positive_threshold)
    rng = np.random.default_rng(config.optim.seed)
    if len(positive) > config.data.valid_queries:
        positive = np.sort(rng.choice(positive, config.data.valid_queries, replace=False))
    return positive


def _per_user_recall(scores: np.ndarray, task: RankingTask) -> dict[str, float]:
    """RecBole recall of each user's top 50 of ``scores`` ``[U, N]``, seen items left out."""
    top = ranking.top_k_from_scores(scores, max(_KS), task.exclude)
    ranked = metrics.ranking_metrics(top, task.truth, ks=_KS)
    return {f"recall_at_{k}": ranked[f"recall@{k}"] for k in _KS}


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
