"""The custom distributed training loop: epochs, checkpoints, resume, early stopping, logs.

The step itself (why custom, how gradients cross replicas) is :mod:`trainer.train_step`; the
data it reads :mod:`trainer.input_pipeline`; the end-of-epoch figures :mod:`trainer.validation`.

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
import tempfile
import time
from collections.abc import Callable

import keras
import tensorflow as tf

from common.cli import UsageError
from trainer import env as env_lib
from trainer import progress
from trainer.config import TrainConfig
from trainer.input_pipeline import DataPlan, epoch_steps, plan_data, train_dataset
from trainer.model import TwoTowerModel
from trainer.model_dir import METRICS_FILE, save_trained
from trainer.train_step import build_for_training, make_train_step
from trainer.validation import choose_item_item, choose_prior_weight, evaluate_validation

log = logging.getLogger("trainer")

#: The validation figure that early stopping and the best checkpoint follow.
_BEST_BY = "recall_at_10"


@dataclasses.dataclass
class TrainResult:
    status: str  # "finished" | "early_stopped" | "max_steps" | "interrupted"
    step: int
    epoch: int
    history: list[dict]
    model_dir: str | None
    signum: int = 0
    seconds: float = 0.0


class LoopState:
    """The loop's bookkeeping, checkpointed beside the model.

    Plain host variables outside the strategy that every worker updates the same way (a string
    variable could not be broadcast anyway). :meth:`variables` are the checkpoint's keys.
    """

    def __init__(self):
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.best = tf.Variable(-1.0, dtype=tf.float64, trainable=False)
        self.bad_epochs = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.history = tf.Variable("[]", dtype=tf.string, trainable=False)

    def variables(self) -> dict[str, tf.Variable]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
        }


@dataclasses.dataclass
class _Checkpoints:
    """The resumable checkpoint (everything) and the best epoch's (the weights only)."""

    full: tf.train.Checkpoint
    best: tf.train.Checkpoint
    manager: tf.train.CheckpointManager
    best_manager: tf.train.CheckpointManager


@dataclasses.dataclass
class _Epochs:
    """What every epoch of one run reads and updates."""

    config: TrainConfig
    plan: DataPlan
    model: TwoTowerModel
    state: LoopState
    checkpoints: _Checkpoints
    history: list[dict]  # one record per finished epoch (also in ``state.history``)
    writer: tf.summary.SummaryWriter | None  # TensorBoard; None on non-chief workers
    steps_per_epoch: int
    strategy: tf.distribute.Strategy
    train_step: Callable  # (per-replica batch, stop flag) -> SUM-reduced outputs
    optimizer: keras.optimizers.Optimizer  # whose learning rate the logs show
    show_progress: bool  # a progress bar on stderr
    on_step: Callable[[int], None] | None


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


# ----------------------------------------------------------------------------- the run


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
    o, r = config.optim, config.runtime
    config.validate(num_replicas=strategy.num_replicas_in_sync)
    plan = plan_data(config)
    steps_per_epoch, batch = epoch_steps(plan, config)
    total_steps = steps_per_epoch * o.epochs
    if r.max_steps:
        total_steps = min(total_steps, r.max_steps)
    progress.log_plan(plan, config, steps_per_epoch, batch, strategy.num_replicas_in_sync)

    state = LoopState()
    model, optimizers, var_lists = build_for_training(
        config, plan.assets, strategy, total_steps, precision
    )
    checkpoints = _make_checkpoints(model, optimizers, state, strategy, dirs, r.keep_checkpoints)
    progress.log_model(model, config, precision)
    if r.resume:
        _resume(checkpoints, state, dirs.checkpoint_dir)
    history: list[dict] = json.loads(state.history.numpy().decode())
    train_step = make_train_step(model, config, strategy, optimizers, var_lists, precision)
    writer = tf.summary.create_file_writer(dirs.tensorboard_dir) if dirs.tensorboard_dir else None
    if config.model.cache_text is False:
        model.refresh_text_caches()  # restored encoder weights -> fresh history table
    run = _Epochs(
        config,
        plan,
        model,
        state,
        checkpoints,
        history,
        writer,
        steps_per_epoch,
        strategy,
        train_step,
        optimizers[0],
        r.progress and info.is_chief,
        on_step,
    )
    with _StopFlag() as stopper:
        status = _run_epochs(run, stopper)
        signum = stopper.signum
    if writer is not None:
        writer.flush()

    step = int(state.step)
    result = TrainResult(status, step, int(state.epoch), history, None, signum)
    if status == "interrupted":
        log.warning("interrupted at step %d; checkpoint saved in %s", step, dirs.checkpoint_dir)
    else:
        if o.restore_best:
            _restore_best(checkpoints.best, history, dirs.checkpoint_dir)
        summary = _summary(run, status, started, strategy.num_replicas_in_sync, precision)
        prior = choose_prior_weight(model, plan, config)
        if prior:
            summary["popularity_prior"] = prior
            progress.log_prior(prior)
        blend = choose_item_item(model, plan, config)
        if blend:
            summary["item_item"] = blend
            progress.log_item_item(blend)
        result.model_dir = _write_model(model, config, info, dirs, summary, started)
    _cleanup_worker_dir(info, dirs)
    result.seconds = time.time() - started
    return result


def _make_checkpoints(
    model: TwoTowerModel,
    optimizers: list,
    state: LoopState,
    strategy: tf.distribute.Strategy,
    dirs: env_lib.OutputDirs,
    keep: int,
) -> _Checkpoints:
    with strategy.scope():
        rng = {f"rng_{i}": v for i, v in enumerate(model.rng_variables())}
        weights = model_weights(model)
        full = tf.train.Checkpoint(
            model=model,
            weights=weights,
            **rng,
            **{f"optimizer_{i}": opt for i, opt in enumerate(optimizers)},
            **state.variables(),
        )
        best = tf.train.Checkpoint(model=model, weights=weights)
    manager = tf.train.CheckpointManager(full, dirs.save_checkpoint_dir, max_to_keep=keep)
    best_dir = os.path.join(dirs.save_checkpoint_dir, "best")
    best_manager = tf.train.CheckpointManager(best, best_dir, max_to_keep=1)
    return _Checkpoints(full, best, manager, best_manager)


class CheckpointMismatch(UsageError):
    """A checkpoint to resume from that does not hold this model's variables."""


def restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
    """Restores ``path`` into ``checkpoint`` (which tracks the model as ``model``), which must
    hold every variable of it but the model's post-training ones
    (:meth:`TwoTowerModel.post_training_variables`): a checkpoint written before one of those
    existed resumes with its built value, which is what training reads. Anything else missing
    raises :class:`CheckpointMismatch` naming it, instead of TensorFlow's assertion."""
    status = checkpoint.restore(path)
    try:
        status.assert_existing_objects_matched()
        return
    except AssertionError as e:
        unmatched = str(e)
    later = {v.name for v in checkpoint.model.post_training_variables()}
    missing = _keys_missing_from(checkpoint, path)
    if not missing:  # something other than a variable: keep TensorFlow's strictness
        raise CheckpointMismatch(f"{path} does not match this model: {unmatched}")
    other = [k for k in missing if _variable_name(k) not in later]
    if other:
        raise CheckpointMismatch(
            f"{path} lacks {len(other)} of this model's variables (e.g. "
            f"{', '.join(other[:3])}): another configuration or version of the trainer wrote "
            "it; train into a fresh --model-dir (or --checkpoint-dir), or resume with the flags "
            "and version that wrote it"
        )
    kept = sorted({_variable_name(k) for k in missing})
    log.warning("%s predates %s: kept at the values training reads", path, ", ".join(kept))


def _variable_name(key: str) -> str:
    """A checkpoint object path's variable name: ``model/item_item`` and
    ``weights/two_tower..item_item`` (:func:`model_weights`' keys) both give ``item_item``."""
    return key.split("/")[-1].split("..")[-1]


def _keys_missing_from(checkpoint: tf.train.Checkpoint, path: str) -> list[str]:
    """The variables ``checkpoint`` writes that the checkpoint at ``path`` lacks (object paths
    such as ``model/item_item``), found by writing ``checkpoint`` to a scratch folder."""

    def keys(prefix: str) -> set[str]:
        return {n.split("/.ATTRIBUTES")[0] for n, _ in tf.train.list_variables(prefix)}

    with tempfile.TemporaryDirectory() as scratch:
        wanted = keys(checkpoint.write(os.path.join(scratch, "probe")))
    return sorted(wanted - keys(path) - {"save_counter"})  # the counter is the writer's own


def _resume(checkpoints: _Checkpoints, state: LoopState, checkpoint_dir: str) -> None:
    """Restores the latest checkpoint of the shared ``checkpoint_dir``, when there is one."""
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    if not latest:
        return
    restore(checkpoints.full, latest)
    log.info(
        "resumed from %s: step %d, epoch %d, step %d of the epoch",
        latest,
        int(state.step),
        int(state.epoch) + 1,
        int(state.step_in_epoch),
    )


def _run_epochs(run: _Epochs, stopper: _StopFlag) -> str:
    """Epochs until the last, ``--max-steps``, early stopping or a signal; returns the status."""
    o, r = run.config.optim, run.config.runtime
    while True:
        step = int(run.state.step)
        if int(run.state.epoch) >= o.epochs:
            return "finished"
        if r.max_steps and step >= r.max_steps:
            return "max_steps"
        status = _train_epoch(run, stopper)
        run.checkpoints.manager.save(checkpoint_number=int(run.state.step))
        if status != "running":
            return status


def _train_epoch(run: _Epochs, stopper: _StopFlag) -> str:
    """The rest of the current epoch, then its validation when it is complete.

    Returns ``"running"`` (go on), ``"early_stopped"``, ``"max_steps"`` or ``"interrupted"``.
    """
    config, state = run.config, run.state
    r = config.runtime
    epoch, step = int(state.epoch), int(state.step)
    start_step = int(state.step_in_epoch)
    dataset = run.strategy.experimental_distribute_dataset(
        train_dataset(run.plan, config, epoch, start_step, run.steps_per_epoch)
    )
    bar = progress.progress_bar(
        run.show_progress,
        run.steps_per_epoch,
        start_step,
        f"epoch {epoch + 1}/{config.optim.epochs}",
    )
    window, epoch_sums = progress.WindowSums(), progress.WindowSums()
    status = "running"
    for batch in dataset:
        out = run.train_step(batch, tf.constant(1.0 if stopper.signum else 0.0))
        values = {k: float(v) for k, v in out.items()}
        step += 1
        state.step.assign(step)
        state.step_in_epoch.assign_add(1)
        window.add(values)
        epoch_sums.add(values)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss is {values['loss']} at step {step}")
        if bar is not None:
            bar.set_postfix(loss=f"{values['loss']:.3f}", ex_s=f"{window.rate():,.0f}")
            bar.update(1)
        if step % r.log_every == 0:
            progress.log_window(run.writer, step, window, progress.current_lr(run.optimizer))
            window = progress.WindowSums()
        if run.on_step is not None:
            run.on_step(step)
        if values["stop"] > 0:
            status = "interrupted"
            break
        if r.max_steps and step >= r.max_steps:
            status = "max_steps"
            break
        if step % r.checkpoint_every == 0:
            run.checkpoints.manager.save(checkpoint_number=step)
    if bar is not None:
        bar.close()
    log.info(
        "epoch %d: %d steps in %.1f s",
        epoch + 1,
        int(state.step_in_epoch) - start_step,
        time.time() - epoch_sums.started,
    )
    if status == "running" or int(state.step_in_epoch) >= run.steps_per_epoch:
        # The epoch is complete: validate, early-stop, move on.
        ended = _end_epoch(run, epoch_sums.figures(), epoch, step)
        if status == "running":
            status = ended
    return status


def _end_epoch(run: _Epochs, train_figures: dict[str, float], epoch: int, step: int) -> str:
    """Validation, early stopping and epoch bookkeeping; returns the loop's status."""
    t0 = time.time()
    config, state = run.config, run.state
    figures = evaluate_validation(run.model, run.plan, config)
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
    run.history.append(record)
    log.info(
        "epoch %d: %s (%.1f s)",
        epoch + 1,
        ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if k != "valid_examples"),
        time.time() - t0,
    )
    if run.writer is not None:
        with run.writer.as_default(step=step):
            for k, v in figures.items():
                tf.summary.scalar(f"valid/{k}", v)
        run.writer.flush()
    status = _early_stopping(run, figures.get(_BEST_BY, -1.0), step)
    state.history.assign(json.dumps(run.history))
    state.epoch.assign(epoch + 1 if status == "running" else config.optim.epochs)
    state.step_in_epoch.assign(0)
    if config.model.cache_text is False and status == "running":
        run.model.refresh_text_caches()
    return status


def _early_stopping(run: _Epochs, metric: float, step: int) -> str:
    """Saves a better epoch as the best; ``"early_stopped"`` after ``patience`` worse ones."""
    state = run.state
    if metric > float(state.best) + 1e-6:
        state.best.assign(metric)
        state.bad_epochs.assign(0)
        run.checkpoints.best_manager.save(checkpoint_number=step)
        return "running"
    state.bad_epochs.assign_add(1)
    patience = run.config.optim.early_stopping_patience
    if patience and int(state.bad_epochs) >= patience:
        log.info("early stopping: valid recall@10 has not improved for %d epochs", patience)
        return "early_stopped"
    return "running"


def _best_record(history: list[dict]) -> dict | None:
    return max(history, key=lambda h: h.get(_BEST_BY, -1.0)) if history else None


def _restore_best(best: tf.train.Checkpoint, history: list[dict], checkpoint_dir: str) -> None:
    """Back to the weights of the best validation epoch, when a later one is worse."""
    best_latest = tf.train.latest_checkpoint(os.path.join(checkpoint_dir, "best"))
    best_epoch = _best_record(history)
    if best_latest and best_epoch is not None and best_epoch is not history[-1]:
        restore(best, best_latest)
        log.info(
            "restored the weights of epoch %d (best valid recall@10 %.4f)",
            best_epoch["epoch"],
            best_epoch["recall_at_10"],
        )


def _summary(run: _Epochs, status: str, started: float, replicas: int, precision: str) -> dict:
    """``metrics.json``: how the run ended, its per-epoch history and its best epoch."""
    return {
        "status": status,
        "steps": int(run.state.step),
        "epochs": int(run.state.epoch),
        "seconds": round(time.time() - started, 1),
        "history": run.history,
        "best": _best_record(run.history),
        "train_examples": run.plan.train_examples,
        "replicas": replicas,
        "precision": precision,
    }


def _write_model(
    model: TwoTowerModel,
    config: TrainConfig,
    info: env_lib.ClusterInfo,
    dirs: env_lib.OutputDirs,
    summary: dict,
    started: float,
) -> str | None:
    """The chief writes the model dir (a worker its copy when asked); returns where, or None."""
    extra = {METRICS_FILE: summary}
    if info.is_chief:
        save_trained(model, config, dirs.model_dir, extra_files=extra)
        log.info(
            "model written to %s (%s after %d steps, %.0f s)",
            dirs.model_dir,
            summary["status"],
            summary["steps"],
            time.time() - started,
        )
        return dirs.model_dir
    if config.runtime.worker_model_copy:
        copy = f"{dirs.model_dir.rstrip('/')}-{info.task_type}-{info.task_id}"
        save_trained(model, config, copy, extra_files=extra)
        return copy
    return None


def _cleanup_worker_dir(info: env_lib.ClusterInfo, dirs: env_lib.OutputDirs) -> None:
    if not info.is_chief and tf.io.gfile.exists(dirs.save_checkpoint_dir):
        tf.io.gfile.rmtree(dirs.save_checkpoint_dir)
