"""One distributed training step, its optimizers and their learning-rate schedule.

Why a custom step: Keras 3 ``fit`` fails under ``MultiWorkerMirroredStrategy`` with dict
inputs, and TFRS's retrieval task must be called from AutoGraph-converted code. So: a
``tf.function`` that calls ``strategy.run(replica_fn)``; the replica function computes the loss
under a ``GradientTape`` scaled by the *global* batch, Keras 3 AdamW all-reduces and applies the
gradients, and the per-replica sums are ``strategy.reduce``-d with SUM. With several replicas
the gradients are clipped by the norm of their sum (:func:`_clip_across_replicas`), as one
device would clip them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import keras
import tensorflow as tf

from trainer.config import TrainConfig
from trainer.features import ModelAssets
from trainer.model import TwoTowerModel, build_model

log = logging.getLogger("trainer")


# ----------------------------------------------------------------------------- schedule


class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """``peak * (step + 1) / warmup_steps`` over the first ``warmup_steps`` steps, then
    ``after(step - warmup_steps)``.

    Keras's own warm-up (``CosineDecay(warmup_target=...)``) starts from the initial rate at
    step 0, so the first update would be at rate 0; this one reaches ``peak / warmup_steps``
    at the first step, as the loop always has. The decay after it is Keras's.
    """

    def __init__(
        self,
        peak: float,
        warmup_steps: int,
        after: keras.optimizers.schedules.LearningRateSchedule,
    ):
        self.peak = float(peak)
        self.warmup_steps = max(int(warmup_steps), 0)
        self.after = after

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.cast(max(self.warmup_steps, 1), tf.float32)
        warm = self.peak * (step + 1.0) / warmup
        return tf.where(step < self.warmup_steps, warm, self.after(step - self.warmup_steps))

    def get_config(self) -> dict:
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "after": keras.optimizers.schedules.serialize(self.after),
        }

    @classmethod
    def from_config(cls, config: dict) -> LinearWarmup:
        after = keras.optimizers.schedules.deserialize(config["after"])
        return cls(config["peak"], config["warmup_steps"], after)


def learning_rate_schedule(
    peak: float, total_steps: int, warmup_steps: int, decay: str = "cosine", min_ratio: float = 0.0
) -> LinearWarmup:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine or linear decay to
    ``peak * min_ratio`` at ``total_steps`` (or constant): a schedule of the optimizer step."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = max(int(warmup_steps), 0)
    span = max(total_steps - warmup_steps, 1)
    schedules = keras.optimizers.schedules
    if decay == "cosine":
        after = schedules.CosineDecay(peak, decay_steps=span, alpha=min_ratio)
    elif decay == "linear":
        after = schedules.PolynomialDecay(
            peak, decay_steps=span, end_learning_rate=peak * min_ratio, power=1.0
        )
    else:  # constant
        after = schedules.PolynomialDecay(peak, decay_steps=span, end_learning_rate=peak)
    return LinearWarmup(peak, warmup_steps, after)


# ----------------------------------------------------------------------------- optimizers


def make_optimizers(
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
            learning_rate=learning_rate_schedule(
                rate, total_steps, warmup, o.decay, o.min_lr_ratio
            ),
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
        optimizers, var_lists = make_optimizers(model, config, total_steps, precision)
        for opt, variables in zip(optimizers, var_lists, strict=True):
            opt.build(variables)
    return model, optimizers, var_lists


# ----------------------------------------------------------------------------- the step


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
