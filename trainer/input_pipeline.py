"""What a training run reads: the data plan and the deterministic stream of global batches.

* :func:`plan_data`: checks the prepared data dir and split, loads the catalog, the users and
  the validation events (a :class:`DataPlan`).
* :func:`train_dataset`: the global batches of one epoch, in an order that is a pure function of
  ``(seed, epoch)``, so a resumed run skips exactly the batches it already trained on.
* :func:`epoch_steps`: steps per epoch and the global batch of the configured queries.
* :func:`holdout_mask`: the validation slice of train on splits without a valid part (p1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from trainer.config import ConfigError, TrainConfig
from trainer.data import records, schema
from trainer.data.movielens import DataError
from trainer.evaluate import RankingTask, ranking_task
from trainer.features import ModelAssets
from trainer.ranking import index_of, items_by_user
from trainer.train_queries import (
    ease_teacher,
    trainable_users,
    user_batch_count,
    user_batches,
    whole_history_queries,
)

#: Resolution of the hash that picks the held-out validation slice of train (splits without a
#: valid part): an event is held out when hash(user, item, time) % this < fraction * this.
_HOLDOUT_BUCKETS = 10_000


def holdout_mask(features: Mapping[str, tf.Tensor], fraction: float) -> tf.Tensor:
    """Which events are in the held-out validation slice of train (deterministic, by content).

    Args:
      features: ``user_id`` and ``item_id`` (string) and ``timestamp`` (int), each ``[E]``.
      fraction: the share held out, in ``(0, 1)``.

    Returns:
      Bool ``[E]``: true for a held-out event.
    """
    key = tf.strings.join(
        [features["user_id"], features["item_id"], tf.strings.as_string(features["timestamp"])],
        separator="/",
    )
    bucket = tf.strings.to_hash_bucket_fast(key, _HOLDOUT_BUCKETS)
    return bucket < int(round(fraction * _HOLDOUT_BUCKETS))


@dataclasses.dataclass
class DataPlan:
    """What the loop reads: the train stream, the validation events and the catalog."""

    data_dir: str
    split: str
    holdout: float  # > 0: validation is this slice of train (no valid part)
    train_examples: int  # events in the training stream (the held-out slice left out)
    history_length: int  # H, history items per query
    assets: ModelAssets
    catalog: dict[str, np.ndarray]  # candidate features, each [N], in catalog-row order
    valid: dict[str, np.ndarray]  # validation events: features [V] (history [V, H]), rating
    # p1: user id -> catalog rows of the items the user has in the training stream (excluded
    # from validation rankings, as the evaluation protocol excludes them).
    seen: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # One query per user from the train part (p2-p4): each training event's query is the
    # user's whole history without the target.
    users: dict[str, np.ndarray] | None = None
    # The valid part as the protocol ranks it (p2-p4): validation is then per user, as RecBole,
    # with the protocol's own queries, exclusions and truth (p4: the new users, no user id).
    ranking: RankingTask | None = None
    # EASE's item-item weights for --distill-ease, fit on first use.
    teacher: np.ndarray | None = None


def plan_data(config: TrainConfig) -> DataPlan:
    """Checks the data dir and split, loads catalog/users/validation events (DataError if bad)."""
    data_dir, split = config.data.data, config.data.split
    if not data_dir:
        raise ConfigError(
            "--data is required (a directory made by `python -m trainer.data prepare`)"
        )
    manifest = records.read_manifest(data_dir)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise DataError(f"{data_dir}: split {split!r} was not prepared (have: {sorted(splits)})")
    parts = splits[split]["parts"]
    records.part_files(data_dir, split, "train")  # every shard present
    catalog = records.load_catalog(data_dir, split)
    users = records.load_users(data_dir, split)
    ranking = None
    if "valid" in parts:
        assets = ModelAssets.from_tables(catalog, users, records.user_history_length(data_dir))
        holdout = 0.0
        valid = records.load_events(data_dir, split, "valid")
        train_examples = int(parts["train"]["examples"])
        seen: dict[str, list[int]] = {}
        ranking = ranking_task(data_dir, split, catalog, part="valid")
    else:
        history_length = int(manifest.get("history_length", schema.HISTORY_LENGTH))
        assets = ModelAssets.from_tables(catalog, users, history_length)
        holdout = config.data.valid_fraction
        train = records.load_events(data_dir, split, "train")
        mask = holdout_mask(
            {k: tf.constant(train[k]) for k in ("user_id", "item_id", "timestamp")}, holdout
        ).numpy()
        valid = {k: v[mask] for k, v in train.items()}
        train_examples = int((~mask).sum())
        seen = items_by_user({k: v[~mask] for k, v in train.items()}, index_of(catalog))
    return DataPlan(
        data_dir,
        split,
        holdout,
        train_examples,
        assets.history_length,
        assets,
        catalog,
        valid,
        seen,
        users if holdout == 0 else None,
        ranking,
    )


def train_dataset(
    plan: DataPlan, config: TrainConfig, epoch: int, skip_steps: int, steps_per_epoch: int
) -> tf.data.Dataset:
    """Global batches of epoch ``epoch`` from step ``skip_steps`` on: deterministic order.

    Event batches (``--train-queries events``): ``--batch-size`` training events, each a dict
    of ``[B]`` features (``history`` ``[B, H]``); on the per-user protocols each event's query
    is the user's whole history without the target. User batches (``users``): see
    :func:`trainer.train_queries.user_batches`. Auto-sharded by data across workers.
    """
    if config.data.train_queries == "users":
        d = config.data
        ds = user_batches(
            plan.users,
            plan.catalog,
            batch_size=d.user_batch_size,
            passes=d.user_passes,
            target_fraction=d.user_target_fraction,
            seed=config.optim.seed * 1009 + epoch,
            max_items=d.train_history_items,
            titles_only=d.user_titles_only,
            teacher=_ease_teacher(plan, config.model.distill_l2)
            if config.model.distill_ease
            else None,
        )
        return _finish(ds.skip(skip_steps))
    ds = records.make_dataset(plan.data_dir, plan.split, "train", 1024, shuffle=False)
    ds = ds.unbatch()
    if plan.holdout > 0:
        ds = ds.filter(lambda f: tf.logical_not(holdout_mask(f, plan.holdout)))
    ds = ds.shuffle(
        min(config.data.shuffle_buffer, max(plan.train_examples, 1)),
        seed=config.optim.seed + epoch,
        reshuffle_each_iteration=False,
    )
    ds = ds.batch(config.optim.batch_size, drop_remainder=True)
    ds = ds.take(steps_per_epoch)
    if plan.users is not None:
        attach = whole_history_queries(
            plan.users,
            config.data.history_dropout,
            seed=config.optim.seed * 1009 + epoch,
            max_items=config.data.train_history_items,
        )
        ds = ds.enumerate().map(attach, num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(ds.skip(skip_steps))


def _ease_teacher(plan: DataPlan, l2: float) -> np.ndarray:
    """EASE's ``[N, N]`` teacher, fit once per plan (every epoch's stream reuses it)."""
    if plan.teacher is None:
        plan.teacher = ease_teacher(plan.users, plan.catalog, l2)
    return plan.teacher


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
    # Deterministic: the resume contract (the same batches after a restart) needs it.
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def epoch_steps(plan: DataPlan, config: TrainConfig) -> tuple[int, int]:
    """``(steps per epoch, global batch)``: user batches or event batches, as configured."""
    if config.data.train_queries == "users":
        if plan.users is None:
            raise ConfigError("--train-queries users needs a split with a valid part (p2-p4)")
        users = len(trainable_users(plan.users))
        batch = config.data.user_batch_size
        steps = user_batch_count(users, batch, config.data.user_passes)
        if steps < 1:
            raise ConfigError(f"--user-batch-size {batch} exceeds the {users} training users")
        return steps, batch
    batch = config.optim.batch_size
    steps = plan.train_examples // batch
    if steps < 1:
        raise ConfigError(
            f"--batch-size {batch} exceeds the {plan.train_examples} training examples"
        )
    return steps, batch
