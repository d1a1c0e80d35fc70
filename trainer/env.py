"""Where the job runs: cluster role, output directories, distribution strategy, precision.

Reads what managed trainers set:

* ``TF_CONFIG`` (Kubeflow TFJob, Vertex AI, hand-made): ``{"cluster": {...}, "task": {...}}``,
  read by TensorFlow's own ``TFConfigClusterResolver`` (what ``MultiWorkerMirroredStrategy``
  reads), after a check that gives a bad one a clear error.
* ``CLUSTER_SPEC`` (Vertex AI custom jobs): worker pools ``workerpool0..3``; turned into a
  ``TF_CONFIG`` (pool 0 = chief, 1 = worker, 2 = ps, 3 = evaluator) when ``TF_CONFIG`` is absent.
* ``AIP_MODEL_DIR``, ``AIP_CHECKPOINT_DIR``, ``AIP_TENSORBOARD_LOG_DIR`` (Vertex AI): defaults for
  ``--model-dir``, ``--checkpoint-dir`` and ``--tensorboard-dir``.

Only the chief writes the model dir, TensorBoard logs and the shared checkpoints; other workers
write their (required, collective) checkpoint saves to a temporary dir and delete them, as in
TensorFlow's multi-worker guide, and restore from the chief's directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping

from trainer.config import ConfigError, RuntimeConfig

log = logging.getLogger("trainer")

_VERTEX_POOLS = {
    "workerpool0": "chief",
    "workerpool1": "worker",
    "workerpool2": "ps",
    "workerpool3": "evaluator",
}


@dataclasses.dataclass
class ClusterInfo:
    """This process's place in the cluster (a single process: no cluster, chief)."""

    cluster: dict[str, list[str]]
    task_type: str | None
    task_id: int

    @property
    def num_workers(self) -> int:
        return len(self.cluster.get("chief", [])) + len(self.cluster.get("worker", []))

    @property
    def is_multi_worker(self) -> bool:
        return self.num_workers > 1

    @property
    def is_chief(self) -> bool:
        if self.task_type in (None, "chief"):
            return True
        return self.task_type == "worker" and self.task_id == 0 and "chief" not in self.cluster


def _parse_json(name: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"${name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"${name} must be a JSON object")
    return value


def tf_config_from_cluster_spec(cluster_spec: Mapping) -> dict:
    """Vertex AI's ``CLUSTER_SPEC`` as a ``TF_CONFIG``."""
    cluster = {}
    for pool, addresses in cluster_spec.get("cluster", {}).items():
        if pool not in _VERTEX_POOLS:
            raise ConfigError(f"$CLUSTER_SPEC: unknown worker pool {pool!r}")
        cluster[_VERTEX_POOLS[pool]] = list(addresses)
    task = cluster_spec.get("task", {})
    return {
        "cluster": cluster,
        "task": {
            "type": _VERTEX_POOLS.get(task.get("type", "workerpool0"), "chief"),
            "index": int(task.get("index", 0)),
        },
    }


def cluster_info(environ: Mapping[str, str] | None = None) -> ClusterInfo:
    """Reads ``TF_CONFIG`` (or ``CLUSTER_SPEC``); validates roles; sets ``TF_CONFIG`` for TF."""
    environ = os.environ if environ is None else environ
    if environ.get("TF_CONFIG"):
        text = environ["TF_CONFIG"]
        _parse_json("TF_CONFIG", text)
    elif environ.get("CLUSTER_SPEC"):
        spec = tf_config_from_cluster_spec(_parse_json("CLUSTER_SPEC", environ["CLUSTER_SPEC"]))
        text = json.dumps(spec)
        if environ is os.environ:
            os.environ["TF_CONFIG"] = text
    else:
        return ClusterInfo({}, None, 0)
    cluster, task_type, task_id = _resolve(text)
    if cluster and task_type not in cluster:
        raise ConfigError(f"$TF_CONFIG: task type {task_type!r} is not in the cluster")
    if cluster and not 0 <= task_id < len(cluster[task_type]):
        raise ConfigError(f"$TF_CONFIG: task index {task_id} out of range for {task_type!r}")
    if task_type in ("ps", "evaluator"):
        raise ConfigError(
            f"$TF_CONFIG: task type {task_type!r} is not supported; this trainer is synchronous "
            "data-parallel (chief + workers)"
        )
    return ClusterInfo(cluster, task_type, task_id)


def _resolve(tf_config: str) -> tuple[dict[str, list[str]], str | None, int]:
    """``(cluster, task type, task index)`` of a ``TF_CONFIG`` text, as TensorFlow reads it."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    try:
        with _tf_config_set(tf_config):  # the resolver reads the process environment only
            cluster = resolver.cluster_spec().as_dict()
            task_type, task_id = resolver.task_type, resolver.task_id
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"$TF_CONFIG: not a cluster TensorFlow can read ({e})") from None
    addresses = {
        job: list(a.values()) if isinstance(a, dict) else list(a) for job, a in cluster.items()
    }
    return addresses, task_type, 0 if task_id is None else task_id


@contextlib.contextmanager
def _tf_config_set(text: str) -> Iterator[None]:
    """``$TF_CONFIG`` = ``text`` for the block (the value before it afterwards)."""
    previous = os.environ.get("TF_CONFIG")
    os.environ["TF_CONFIG"] = text
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TF_CONFIG"]
        else:
            os.environ["TF_CONFIG"] = previous


@dataclasses.dataclass
class OutputDirs:
    model_dir: str  # the final model dir (written by the chief only)
    checkpoint_dir: str  # shared checkpoints: the chief saves here, everyone restores from here
    save_checkpoint_dir: str  # where this process saves (a temp dir on non-chief workers)
    tensorboard_dir: str | None  # None on non-chief workers


def output_dirs(
    runtime: RuntimeConfig, info: ClusterInfo, environ: Mapping[str, str] | None = None
) -> OutputDirs:
    environ = os.environ if environ is None else environ
    model_dir = runtime.model_dir or environ.get("AIP_MODEL_DIR", "")
    if not model_dir:
        raise ConfigError("--model-dir is required (or set $AIP_MODEL_DIR)")
    checkpoint_dir = (
        runtime.checkpoint_dir
        or environ.get("AIP_CHECKPOINT_DIR")
        or os.path.join(model_dir.rstrip("/") + "-checkpoints")
    )
    tensorboard_dir = (
        runtime.tensorboard_dir
        or environ.get("AIP_TENSORBOARD_LOG_DIR")
        or os.path.join(model_dir.rstrip("/") + "-logs")
    )
    save_dir = checkpoint_dir
    if not info.is_chief:
        save_dir = os.path.join(checkpoint_dir, f"workertemp_{info.task_type}_{info.task_id}")
    return OutputDirs(
        model_dir, checkpoint_dir, save_dir, tensorboard_dir if info.is_chief else None
    )


# ------------------------------------------------------------------ devices and strategy


def gpu_count() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def make_strategy(mode: str, info: ClusterInfo):
    """``auto``: MultiWorkerMirrored when ``TF_CONFIG`` names several workers, Mirrored with
    several GPUs, else the default strategy (one device). Create it first thing in the process:
    multi-worker collectives must be set up before TensorFlow runs any op."""
    import tensorflow as tf

    if mode == "auto":
        if info.is_multi_worker:
            mode = "multi_worker"
        elif gpu_count() > 1:
            mode = "mirrored"
        else:
            mode = "default"
    if mode == "multi_worker":
        if not info.cluster:
            raise ConfigError("--strategy multi_worker needs $TF_CONFIG (or $CLUSTER_SPEC)")
        implementation = (
            tf.distribute.experimental.CommunicationImplementation.NCCL
            if gpu_count()
            else tf.distribute.experimental.CommunicationImplementation.RING
        )
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation
            )
        )
    if mode == "mirrored":
        return tf.distribute.MirroredStrategy()
    if mode == "default":
        return tf.distribute.get_strategy()
    raise ConfigError(f"--strategy must be auto, default, mirrored or multi_worker; got {mode!r}")


def configure_precision(mode: str) -> str:
    """Sets Keras's global dtype policy; returns its name.

    ``gpu`` (what ``auto`` resolves to with a GPU): bfloat16 on Ampere or newer (no loss
    scaling needed), float16 before.
    """
    import keras
    import tensorflow as tf

    if mode == "gpu":
        mode = "float16"
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            major = tf.config.experimental.get_device_details(gpus[0]).get(
                "compute_capability", (0, 0)
            )[0]
            mode = "bfloat16" if major >= 8 else "float16"
    policy = {"off": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}[mode]
    keras.mixed_precision.set_global_policy(policy)
    return policy
