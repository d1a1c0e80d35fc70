"""What a training run reports as it goes: step windows, TensorBoard scalars, a progress bar.

The train step returns SUM-reduced per-example totals (:data:`TOTALS`); a :class:`WindowSums`
adds them over a window of steps (or an epoch) and turns them into means.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import tensorflow as tf

from trainer.config import TrainConfig
from trainer.input_pipeline import DataPlan
from trainer.model import TwoTowerModel

log = logging.getLogger("trainer")

#: The step's SUM-reduced per-example totals that the logs average.
TOTALS = ("examples", "positives", "retrieval_loss", "squared_error", "hits_at_10")


class WindowSums:
    """The step's SUM-reduced totals over a window of steps (or an epoch), since ``started``."""

    def __init__(self):
        self.values = dict.fromkeys(TOTALS, 0.0)
        self.started = time.time()

    def add(self, values: dict[str, float]) -> None:
        for k in TOTALS:
            self.values[k] += values[k]

    def rate(self) -> float:
        """Examples per second."""
        return self.values["examples"] / max(time.time() - self.started, 1e-9)

    def figures(self) -> dict[str, float]:
        return _window_figures(self.values, self.started)


def current_lr(optimizer) -> float:
    return float(np.asarray(optimizer.learning_rate))


def _window_figures(window: dict, started: float) -> dict[str, float]:
    """Means over a window of steps from the step's SUM-reduced totals."""
    elapsed = max(time.time() - started, 1e-9)
    examples = max(window["examples"], 1.0)
    return {
        "loss/retrieval": window["retrieval_loss"] / max(window["positives"], 1.0),
        "rmse/train": math.sqrt(window["squared_error"] / examples),
        "recall_at_10/in_batch": window["hits_at_10"] / max(window["positives"], 1.0),
        "examples_per_second": window["examples"] / elapsed,
    }


def log_window(writer, step: int, window: WindowSums, lr: float) -> None:
    figures = {**window.figures(), "learning_rate": lr}
    log.info(
        "step %d: retrieval loss %.4f, rmse %.4f, in-batch recall@10 %.3f, %.0f ex/s, lr %.2e",
        step,
        figures["loss/retrieval"],
        figures["rmse/train"],
        figures["recall_at_10/in_batch"],
        figures["examples_per_second"],
        lr,
    )
    if writer is not None:
        with writer.as_default(step=step):
            for name, value in figures.items():
                tf.summary.scalar(name, value)


def log_plan(
    plan: DataPlan, config: TrainConfig, steps_per_epoch: int, batch: int, replicas: int
) -> None:
    log.info(
        "data %s/%s: %d train examples (%s), %d validation events, %d items; "
        "%d steps/epoch of %d %s, %d replicas",
        plan.data_dir,
        plan.split,
        plan.train_examples,
        f"{plan.holdout:.0%} of train held out" if plan.holdout else "valid part",
        len(plan.valid["rating"]),
        len(plan.catalog["item_id"]),
        steps_per_epoch,
        batch,
        config.data.train_queries,
        replicas,
    )


def log_model(model: TwoTowerModel, config: TrainConfig, precision: str) -> None:
    m = config.model
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    frozen = sum(int(np.prod(v.shape)) for v in model.non_trainable_variables)
    log.info(
        "model: %s, BERT %s, text %s, query text %s, D=%d; %s trainable / %s frozen "
        "weights; precision %s, XLA %s",
        m.preset,
        "frozen"
        if m.freeze_bert
        else (f"top {m.train_top_layers} layers" if m.train_top_layers else "fine-tuned"),
        "cached" if m.cache_text else "live",
        m.query_text,
        m.embedding_dim,
        f"{trainable:,}",
        f"{frozen:,}",
        precision,
        config.runtime.xla,
    )


#: Fewer valid users than this holding new-item targets make --new-item-recall-share's share
#: noise (valid users holding them: p2 9, p3 881): the log says so.
FEW_USERS = 30


def log_item_item(blend: dict) -> None:
    """The item-item term's weight and EASE's L2 weight chosen on the valid part."""
    curve = blend["valid_recall_at_10"]
    if not curve:
        log.info("item-item term: no valid events, weight stays %g", blend["weight"])
        return
    neighbours = blend.get("new_item_neighbours", 0)
    if neighbours:
        curve = blend["valid_recall_at_10_filled"]
    log.info(
        "item-item term: weight %g, EASE L2 %g, %d unrated items %s (valid recall@10 %.4f; "
        "%.4f without the term)",
        blend["weight"],
        blend["l2"],
        blend.get("unrated_items", 0),
        f"filled from {neighbours} text neighbours" if neighbours else "left unscored",
        curve[str(blend["weight"])],
        blend["valid_recall_at_10"].get(str(0.0), float("nan")),
    )


def log_prior(prior: dict) -> None:
    """The popularity-prior weight chosen on the valid part, against the prior off."""
    curve = prior["valid_recall_at_10"]
    if not curve:
        log.info("popularity prior: no valid events, weight stays 0")
        return
    log.info(
        "popularity prior: weight %g, new-item bias %g, unrated items' log counts %s "
        "(valid recall@10 %.4f; %.4f at weight 0)",
        prior["weight"],
        prior.get("new_item_bias", 0.0),
        "guessed from genres and year" if prior.get("content_prior") else "the mean",
        curve[str(prior["weight"])],
        curve[str(0.0)],
    )
    policy = prior.get("new_item_recall_share")
    if policy:
        log.info(
            "new-item recall share %g: %s (valid new-item recall@10 %.4f = %.2f x recall@10 "
            "%.4f, over the %d valid users who rated an item nobody rated in train)",
            policy["share"],
            "met" if policy["met"] else "not reachable on this grid, the nearest setting kept",
            policy["valid_new_item_recall_at_10"],
            policy["valid_ratio"],
            policy["valid_recall_at_10"],
            policy["valid_users"],
        )
        if policy["valid_users"] < FEW_USERS:
            log.warning(
                "--new-item-recall-share rests on %d valid users: a share over so few is noise",
                policy["valid_users"],
            )


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False
    )
