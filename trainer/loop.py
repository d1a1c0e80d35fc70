"""The custom distributed training loop.

Why custom: Keras 3 ``fit`` fails under ``MultiWorkerMirroredStrategy`` with dict inputs, and
TFRS's retrieval task must be called from AutoGraph-converted code. So: a ``tf.function`` step
that calls ``strategy.run(replica_fn)``; the replica function computes the loss under a
``GradientTape`` scaled by the *global* batch, Keras 3 AdamW all-reduces and applies the
gradients, and the per-replica sums are ``strategy.reduce``-d with SUM.

Resumable: a ``tf.train.CheckpointManager`` keeps model, optimizers, global step, epoch, the
step inside the epoch, early-stopping state and the metric history. The input order of an epoch
is a pure function of ``(seed, epoch)``, so a resumed run skips the batches it already trained
on and continues with the same weights on the same data. SIGTERM/SIGINT set a flag (shared
between workers through the step's reduction); the loop then saves and returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from trainer import env as env_lib
from trainer import metrics
from trainer.config import ConfigError, TrainConfig
from trainer.data import records, schema
from trainer.data.movielens import DataError
from trainer.evaluate import RankingTask, index_of, items_by_user, ranking_task
from trainer.model import ModelAssets, TwoTowerModel, build_model, save_trained
from trainer.train_queries import (
    trainable_users,
    user_batch_count,
    user_batches,
    whole_history_queries,
)

log = logging.getLogger("trainer")

#: Resolution of the hash that picks the held-out validation slice of train (splits without a
#: valid part): an event is held out when hash(user, item, time) % this < fraction * this.
_HOLDOUT_BUCKETS = 10_000
_METRICS = ("examples", "positives", "retrieval_loss", "squared_error", "hits_at_10")


# ----------------------------------------------------------------------------- schedule


class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to ``peak`` over ``warmup_steps``, then cosine or linear decay to
    ``peak * min_ratio`` at ``total_steps`` (or constant)."""

    def __init__(
        self,
        peak: float,
        total_steps: int,
        warmup_steps: int,
        decay: str = "cosine",
        min_ratio: float = 0.0,
    ):
        self.peak = float(peak)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = max(int(warmup_steps), 0)
        self.decay = decay
        self.min_ratio = float(min_ratio)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.cast(max(self.warmup_steps, 1), tf.float32)
        warm = self.peak * (step + 1.0) / warmup
        span = float(max(self.total_steps - self.warmup_steps, 1))
        progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
        if self.decay == "cosine":
            factor = 0.5 * (1.0 + tf.cos(math.pi * progress))
        elif self.decay == "linear":
            factor = 1.0 - progress
        else:
            factor = tf.ones_like(progress)
        decayed = self.peak * (self.min_ratio + (1.0 - self.min_ratio) * factor)
        return tf.where(step < self.warmup_steps, warm, decayed)

    def get_config(self) -> dict:
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "min_ratio": self.min_ratio,
        }


# ----------------------------------------------------------------------------- data


def holdout_mask(features: Mapping[str, tf.Tensor], fraction: float) -> tf.Tensor:
    """True for events in the held-out validation slice of train (deterministic, by content)."""
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
    train_examples: int
    history_length: int
    assets: ModelAssets
    catalog: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    # p1: user id -> catalog rows of the items the user has in the training stream (excluded
    # from validation rankings, as the evaluation protocol excludes them).
    seen: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # One query per user from the train part (p2-p4): each training event's query is the
    # user's whole history without the target.
    users: dict[str, np.ndarray] | None = None
    # The valid part as the protocol ranks it (p2-p4): validation is then per user, as RecBole,
    # with the protocol's own queries, exclusions and truth (p4: the new users, no user id).
    ranking: RankingTask | None = None


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
    """Global batches of epoch ``epoch`` from step ``skip_steps`` on: deterministic order."""
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


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


# ----------------------------------------------------------------------------- validation


def evaluate_validation(model: TwoTowerModel, plan: DataPlan, config: TrainConfig) -> dict:
    """Full-catalog recall@10 / @50 on the validation data, and RMSE.

    With a valid part (p2-p4) recall is per user, as the protocol measures it
    (:func:`trainer.evaluate.ranking_task` over the valid part). Otherwise (p1's held-out slice of
    train) it is per event over a sample of positive events, each with its own past. Either way
    the user's training items are removed from the ranking, as evaluation removes them.

    Runs on every worker (same weights, same data: same answer, so early stopping agrees).
    """
    from trainer.model import _embed, predict_ratings

    items = _embed(model, "candidate", plan.catalog)
    valid = plan.valid
    out: dict[str, float] = {"valid_examples": float(len(valid["rating"]))}
    if not len(valid["rating"]):
        return out
    positive = np.flatnonzero(valid["rating"] >= config.model.positive_threshold)
    rng = np.random.default_rng(config.optim.seed)
    if len(positive) > config.data.valid_queries:
        positive = np.sort(rng.choice(positive, config.data.valid_queries, replace=False))
    index = index_of(plan.catalog)
    if plan.ranking is not None:
        out.update(_per_user_recall(model, plan.ranking, items))
    elif len(positive):
        queries = {k: v[positive] for k, v in valid.items()}
        scores = _embed(model, "query", queries) @ items.T
        for row, user in enumerate(queries["user_id"]):
            scores[row, plan.seen.get(user, [])] = -np.inf
        truth = np.array([index.get(i, -1) for i in queries["item_id"]])
        true_scores = scores[np.arange(len(truth)), np.maximum(truth, 0)]
        rank = (scores > true_scores[:, None]).sum(axis=1)
        for k in (10, 50):
            out[f"recall_at_{k}"] = float(np.mean((rank < k) & (truth >= 0)))
    cap = min(len(valid["rating"]), 20_000)
    subset = {k: v[:cap] for k, v in valid.items()}
    q = _embed(model, "query", subset)
    c = _embed(model, "candidate", subset)
    # The test figure's definition (trainer.evaluate): unclipped, one function for both.
    out["rmse"] = metrics.rmse(predict_ratings(model, q, c, subset), subset["rating"])
    return out


def _per_user_recall(
    model: TwoTowerModel, task: RankingTask, items: np.ndarray
) -> dict[str, float]:
    from trainer.model import _embed

    scores = _embed(model, "query", task.queries) @ items.T
    top = metrics.top_k_from_scores(scores, 50, task.exclude)
    ranked = metrics.ranking_metrics(top, task.truth, ks=(10, 50))
    return {"recall_at_10": ranked["recall@10"], "recall_at_50": ranked["recall@50"]}


def model_weights(model: keras.Model) -> dict[str, keras.Variable]:
    """Every weight of the model by its path, for ``tf.train.Checkpoint``.

    A checkpoint of the model object alone misses the weights of Keras 3 layers kept in plain
    lists or dicts (an MLP's blocks, the per-field embeddings): restoring the best epoch from
    it left those at the last epoch's values. Listing every weight explicitly closes that gap.
    """
    out: dict[str, keras.Variable] = {}
    for v in model.weights:
        key = v.path.replace("/", ".")
        while key in out:
            key += "_"
        out[key] = v
    return out


# ----------------------------------------------------------------------------- the loop


class _StopFlag:
    """SIGTERM/SIGINT -> a flag the loop checks between steps (save, then leave)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread no handler can be set; then nothing to restore either.
            with contextlib.suppress(ValueError):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d: saving a checkpoint after this step, then stopping", signum)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclasses.dataclass
class TrainResult:
    status: str  # "finished" | "early_stopped" | "max_steps" | "interrupted"
    step: int
    epoch: int
    history: list[dict]
    model_dir: str | None
    signum: int = 0
    seconds: float = 0.0


def _make_optimizers(
    model: TwoTowerModel, config: TrainConfig, total_steps: int, precision: str
) -> tuple[list, list[list]]:
    """AdamW for the towers/head and (when BERT trains) a second AdamW at BERT's rate.

    Returns ``(optimizers, variable lists)``. Under float16 one loss-scaled optimizer holds
    everything (Keras's loss scaling is per optimizer); BERT then uses the main rate.
    """
    o = config.optim
    warmup = int(round(o.warmup_fraction * total_steps))

    def adamw(rate: float) -> keras.optimizers.Optimizer:
        opt = keras.optimizers.AdamW(
            learning_rate=WarmupDecay(rate, total_steps, warmup, o.decay, o.min_lr_ratio),
            weight_decay=o.weight_decay,
            global_clipnorm=o.clipnorm or None,
        )
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "summary_token"])
        return opt

    bert = {id(v) for v in model.bert_variables()}
    rest = [v for v in model.trainable_variables if id(v) not in bert]
    bert_vars = [v for v in model.trainable_variables if id(v) in bert]
    if precision == "mixed_float16":
        if bert_vars:
            log.warning("float16 loss scaling uses one optimizer: BERT trains at --learning-rate")
        opt = keras.optimizers.LossScaleOptimizer(adamw(o.learning_rate))
        return [opt], [rest + bert_vars]
    if bert_vars:
        return [adamw(o.learning_rate), adamw(o.bert_learning_rate)], [rest, bert_vars]
    return [adamw(o.learning_rate)], [rest]


def make_train_step(
    model: TwoTowerModel,
    config: TrainConfig,
    strategy: tf.distribute.Strategy,
    optimizers: list,
    var_lists: list[list],
    precision: str,
) -> Callable:
    """The distributed step: ``(per-replica batch, stop flag) -> SUM-reduced outputs``.

    Outputs: ``loss`` (summed over replicas: the global mean loss), ``stop`` (> 0 when any
    worker was signalled) and the per-example sums of :meth:`TwoTowerModel.compute_losses`.
    """
    forward = model.forward_numeric
    if config.runtime.xla == "on":  # the numeric towers only: string ops cannot be compiled
        forward = tf.function(model.forward_numeric, jit_compile=True, reduce_retracing=True)
    gather = config.model.gather_candidates
    all_vars = [v for variables in var_lists for v in variables]
    replicas = strategy.num_replicas_in_sync
    clipnorms = [None] * len(optimizers)
    if replicas > 1 and precision != "mixed_float16":  # float16: the scaled grads stay local
        clipnorms = [_take_clipnorm(opt) for opt in optimizers]
    if config.data.train_queries == "users":
        global_batch = config.data.user_batch_size

        def losses(features):
            return model.compute_user_losses(features, global_batch_size=global_batch)
    else:
        global_batch = config.optim.batch_size

        def losses(features):
            return model.compute_losses(
                features,
                global_batch_size=global_batch,
                training=True,
                gather_candidates=gather,
                forward=forward,
            )

    def replica_fn(features, stop):
        with tf.GradientTape() as tape:
            loss, sums = losses(features)
            scaled = optimizers[0].scale_loss(loss) if precision == "mixed_float16" else loss
        grads = tape.gradient(scaled, all_vars)
        start = 0
        for opt, variables, clipnorm in zip(optimizers, var_lists, clipnorms, strict=True):
            pairs = [
                (g, v)
                for g, v in zip(grads[start : start + len(variables)], variables, strict=True)
                if g is not None
            ]
            if clipnorm and pairs:
                pairs = _clip_across_replicas(pairs, clipnorm, replicas)
            opt.apply_gradients(pairs)
            start += len(variables)
        # tf.identity: the input tensor itself, returned by every replica, comes back from
        # MirroredStrategy.run as one plain tensor, which strategy.reduce refuses.
        return {"loss": loss, "stop": tf.identity(stop), **sums}

    @tf.function
    def train_step(batch, stop):
        outputs = strategy.run(replica_fn, args=(batch, stop))
        return {k: strategy.reduce("SUM", v, axis=None) for k, v in outputs.items()}

    return train_step


def _take_clipnorm(optimizer) -> float | None:
    """Moves the optimizer's global clipnorm out of it, for the step to apply across replicas.

    Keras clips each replica's own gradients before it all-reduces them, so with several
    replicas the update was not the one-device update (each half clipped on its own). Kept on
    the optimizer, so a second step built on it still clips.
    """
    if not hasattr(optimizer, "_replica_clipnorm"):
        optimizer._replica_clipnorm = optimizer.global_clipnorm
        optimizer.global_clipnorm = None
    return optimizer._replica_clipnorm


def _clip_across_replicas(pairs: list, clipnorm: float, replicas: int) -> list:
    """Clips the replicas' *summed* gradients by their global norm, as one device would, and
    returns this replica's 1/R share of them (the optimizer's all-reduce sums them again)."""
    summed = tf.distribute.get_replica_context().all_reduce("SUM", [g for g, _ in pairs])
    clipped, _ = tf.clip_by_global_norm(summed, clipnorm)
    out = []
    for g, (_, v) in zip(clipped, pairs, strict=True):
        if isinstance(g, tf.IndexedSlices):
            g = tf.IndexedSlices(g.values / replicas, g.indices, g.dense_shape)
        else:
            g = g / replicas
        out.append((g, v))
    return out


def build_for_training(
    config: TrainConfig,
    assets: ModelAssets,
    strategy: tf.distribute.Strategy,
    total_steps: int,
    precision: str,
) -> tuple[TwoTowerModel, list, list[list]]:
    """Model + optimizers (built) under the strategy's scope."""
    with strategy.scope():
        model = build_model(config.model, assets, seed=config.optim.seed)
        optimizers, var_lists = _make_optimizers(model, config, total_steps, precision)
        for opt, variables in zip(optimizers, var_lists, strict=True):
            opt.build(variables)
    return model, optimizers, var_lists


def train(
    config: TrainConfig,
    strategy: tf.distribute.Strategy,
    info: env_lib.ClusterInfo,
    dirs: env_lib.OutputDirs,
    precision: str,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Trains as configured (``config`` resolved); the chief writes ``dirs.model_dir`` at the end.

    ``on_step``: called with the global step after every step (tests use it to time a kill).
    """
    started = time.time()
    m, o, r = config.model, config.optim, config.runtime
    replicas = strategy.num_replicas_in_sync
    config.validate(num_replicas=replicas)
    plan = plan_data(config)
    if config.data.train_queries == "users":
        if plan.users is None:
            raise ConfigError("--train-queries users needs a split with a valid part (p2-p4)")
        users = len(trainable_users(plan.users))
        batch = config.data.user_batch_size
        steps_per_epoch = user_batch_count(users, batch, config.data.user_passes)
        if steps_per_epoch < 1:
            raise ConfigError(f"--user-batch-size {batch} exceeds the {users} training users")
    else:
        batch = o.batch_size
        steps_per_epoch = plan.train_examples // batch
        if steps_per_epoch < 1:
            raise ConfigError(
                f"--batch-size {batch} exceeds the {plan.train_examples} training examples"
            )
    total_steps = steps_per_epoch * o.epochs
    if r.max_steps:
        total_steps = min(total_steps, r.max_steps)
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

    # Loop bookkeeping lives on the host, outside the strategy: plain variables that every
    # worker updates the same way (a string variable could not be broadcast anyway).
    state = {
        "step": tf.Variable(0, dtype=tf.int64, trainable=False),
        "epoch": tf.Variable(0, dtype=tf.int64, trainable=False),
        "step_in_epoch": tf.Variable(0, dtype=tf.int64, trainable=False),
        "best": tf.Variable(-1.0, dtype=tf.float64, trainable=False),
        "bad_epochs": tf.Variable(0, dtype=tf.int64, trainable=False),
        "history": tf.Variable("[]", dtype=tf.string, trainable=False),
    }
    model, optimizers, var_lists = build_for_training(
        config, plan.assets, strategy, total_steps, precision
    )
    with strategy.scope():
        rng = {f"rng_{i}": v for i, v in enumerate(model.rng_variables())}
        weights = model_weights(model)
        checkpoint = tf.train.Checkpoint(
            model=model,
            weights=weights,
            **rng,
            **{f"optimizer_{i}": opt for i, opt in enumerate(optimizers)},
            **state,
        )
        best_checkpoint = tf.train.Checkpoint(model=model, weights=weights)
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
        r.xla,
    )

    manager = tf.train.CheckpointManager(
        checkpoint, dirs.save_checkpoint_dir, max_to_keep=r.keep_checkpoints
    )
    best_dir = os.path.join(dirs.save_checkpoint_dir, "best")
    best_manager = tf.train.CheckpointManager(best_checkpoint, best_dir, max_to_keep=1)
    latest = tf.train.latest_checkpoint(dirs.checkpoint_dir) if r.resume else None
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        log.info(
            "resumed from %s: step %d, epoch %d, step %d of the epoch",
            latest,
            int(state["step"]),
            int(state["epoch"]) + 1,
            int(state["step_in_epoch"]),
        )
    history: list[dict] = json.loads(state["history"].numpy().decode())

    train_step = make_train_step(model, config, strategy, optimizers, var_lists, precision)

    writer = tf.summary.create_file_writer(dirs.tensorboard_dir) if dirs.tensorboard_dir else None
    if m.cache_text is False:
        model.refresh_text_caches()  # restored encoder weights -> fresh history table
    step = int(state["step"])
    status = "running"
    with _StopFlag() as stopper:
        while status == "running":
            epoch = int(state["epoch"])
            if epoch >= o.epochs:
                status = "finished"
                break
            if r.max_steps and step >= r.max_steps:
                status = "max_steps"
                break
            start_step = int(state["step_in_epoch"])
            dataset = strategy.experimental_distribute_dataset(
                train_dataset(plan, config, epoch, start_step, steps_per_epoch)
            )
            bar = _progress(
                r.progress and info.is_chief,
                steps_per_epoch,
                start_step,
                f"epoch {epoch + 1}/{o.epochs}",
            )
            window = dict.fromkeys(_METRICS, 0.0)
            epoch_sums = dict.fromkeys(_METRICS, 0.0)
            window_start = epoch_start = time.time()
            for batch in dataset:
                out = train_step(batch, tf.constant(1.0 if stopper.signum else 0.0))
                values = {k: float(v) for k, v in out.items()}
                step += 1
                state["step"].assign(step)
                state["step_in_epoch"].assign_add(1)
                for k in _METRICS:
                    window[k] += values[k]
                    epoch_sums[k] += values[k]
                if not math.isfinite(values["loss"]):
                    raise FloatingPointError(f"loss is {values['loss']} at step {step}")
                if bar is not None:
                    rate = window["examples"] / max(time.time() - window_start, 1e-9)
                    bar.set_postfix(loss=f"{values['loss']:.3f}", ex_s=f"{rate:,.0f}")
                    bar.update(1)
                if step % r.log_every == 0:
                    _log_window(writer, step, window, window_start, _current_lr(optimizers[0]))
                    window = dict.fromkeys(_METRICS, 0.0)
                    window_start = time.time()
                if on_step is not None:
                    on_step(step)
                if values["stop"] > 0:
                    status = "interrupted"
                    break
                if r.max_steps and step >= r.max_steps:
                    status = "max_steps"
                    break
                if step % r.checkpoint_every == 0:
                    manager.save(checkpoint_number=step)
            if bar is not None:
                bar.close()
            log.info(
                "epoch %d: %d steps in %.1f s",
                epoch + 1,
                int(state["step_in_epoch"]) - start_step,
                time.time() - epoch_start,
            )
            if status == "running" or int(state["step_in_epoch"]) >= steps_per_epoch:
                # The epoch is complete: validate, early-stop, move on.
                train_figures = _window_figures(epoch_sums, epoch_start)
                ended = _end_epoch(
                    model,
                    train_figures,
                    plan,
                    config,
                    state,
                    history,
                    epoch,
                    step,
                    writer,
                    best_manager,
                    m.cache_text is False,
                )
                if status == "running":
                    status = ended
            manager.save(checkpoint_number=step)
        signum = stopper.signum
    if writer is not None:
        writer.flush()

    result = TrainResult(
        status, step, int(state["epoch"]), history, None, signum, time.time() - started
    )
    if status == "interrupted":
        log.warning("interrupted at step %d; checkpoint saved in %s", step, dirs.checkpoint_dir)
        _cleanup_worker_dir(info, dirs)
        return result
    best_latest = tf.train.latest_checkpoint(os.path.join(dirs.checkpoint_dir, "best"))
    if best_latest and history and o.restore_best:
        best_epoch = max(history, key=lambda h: h.get("recall_at_10", -1.0))
        if best_epoch is not history[-1]:
            best_checkpoint.restore(best_latest).assert_existing_objects_matched()
            log.info(
                "restored the weights of epoch %d (best valid recall@10 %.4f)",
                best_epoch["epoch"],
                best_epoch["recall_at_10"],
            )
    metrics = {
        "status": status,
        "steps": step,
        "epochs": int(state["epoch"]),
        "seconds": round(time.time() - started, 1),
        "history": history,
        "best": max(history, key=lambda h: h.get("recall_at_10", -1.0)) if history else None,
        "train_examples": plan.train_examples,
        "replicas": replicas,
        "precision": precision,
    }
    if info.is_chief:
        save_trained(model, config, dirs.model_dir, extra_files={"metrics.json": metrics})
        log.info(
            "model written to %s (%s after %d steps, %.0f s)",
            dirs.model_dir,
            status,
            step,
            time.time() - started,
        )
        result.model_dir = dirs.model_dir
    elif r.worker_model_copy:
        copy = f"{dirs.model_dir.rstrip('/')}-{info.task_type}-{info.task_id}"
        save_trained(model, config, copy, extra_files={"metrics.json": metrics})
        result.model_dir = copy
    _cleanup_worker_dir(info, dirs)
    result.seconds = time.time() - started
    return result


def _end_epoch(
    model,
    train_figures,
    plan,
    config,
    state,
    history,
    epoch,
    step,
    writer,
    best_manager,
    live_text: bool,
) -> str:
    """Validation, early stopping and epoch bookkeeping; returns the loop's status."""
    t0 = time.time()
    figures = evaluate_validation(model, plan, config)
    train = {
        "train_retrieval_loss": train_figures["loss/retrieval"],
        "train_rmse": train_figures["rmse/train"],
        "train_in_batch_recall_at_10": train_figures["recall_at_10/in_batch"],
        "examples_per_second": train_figures["examples_per_second"],
    }
    record = {
        "epoch": epoch + 1,
        "step": step,
        **{k: round(v, 5) for k, v in {**train, **figures}.items()},
    }
    history.append(record)
    log.info(
        "epoch %d: %s (%.1f s)",
        epoch + 1,
        ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if k != "valid_examples"),
        time.time() - t0,
    )
    if writer is not None:
        with writer.as_default(step=step):
            for k, v in figures.items():
                tf.summary.scalar(f"valid/{k}", v)
        writer.flush()
    status = "running"
    metric = figures.get("recall_at_10", -1.0)
    if metric > float(state["best"]) + 1e-6:
        state["best"].assign(metric)
        state["bad_epochs"].assign(0)
        best_manager.save(checkpoint_number=step)
    else:
        state["bad_epochs"].assign_add(1)
        patience = config.optim.early_stopping_patience
        if patience and int(state["bad_epochs"]) >= patience:
            log.info("early stopping: valid recall@10 has not improved for %d epochs", patience)
            status = "early_stopped"
    state["history"].assign(json.dumps(history))
    state["epoch"].assign(epoch + 1 if status == "running" else config.optim.epochs)
    state["step_in_epoch"].assign(0)
    if live_text and status == "running":
        model.refresh_text_caches()
    return status


def _current_lr(optimizer) -> float:
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


def _log_window(writer, step: int, window: dict, started: float, lr: float) -> None:
    figures = {**_window_figures(window, started), "learning_rate": lr}
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


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False
    )


def _cleanup_worker_dir(info: env_lib.ClusterInfo, dirs: env_lib.OutputDirs) -> None:
    if not info.is_chief and tf.io.gfile.exists(dirs.save_checkpoint_dir):
        tf.io.gfile.rmtree(dirs.save_checkpoint_dir)
