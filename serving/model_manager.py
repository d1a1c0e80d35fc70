"""Model versions: discovery under `<base_path>/<version>/`, loading, hot swap and status.

Mirrors TF Serving's FileSystemStoragePathSource + AspiredVersionsManager with the
availability-preserving policy: a new version is loaded fully before the served set is swapped
(one pointer assignment under a lock), and only then are the versions that left the policy
unloaded. A request holds a reference to the `Servable` it resolved, so a version being unloaded
finishes the requests already running on it.

A version is loaded the way TF Serving loads it (the session-based SavedModel loader, run by
the SignatureDefs' tensor names; :mod:`serving.session_runner`), and the PredictionLogs of its
``assets.extra/tf_serving_warmup_requests`` are replayed before it turns AVAILABLE. Base paths
are read through ``tf.io.gfile``, so ``gs://`` and the other TensorFlow file systems work.
A version that fails to load goes to END with its error in GetModelStatus; its retries are
scheduled for later polls instead of sleeping, so newer versions and other models keep loading.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from serving.errors import Code, ServingError, log_event

logger = logging.getLogger("serving.model_manager")

_VERSION_DIR = re.compile(r"^[0-9]+$")

# ModelVersionStatus.State names (tensorflow_serving/apis/get_model_status.proto).
STATE_START = "START"
STATE_LOADING = "LOADING"
STATE_AVAILABLE = "AVAILABLE"
STATE_UNLOADING = "UNLOADING"
STATE_END = "END"


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's ServableVersionPolicy: latest{num_versions}, all, or specific{versions}."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, on_disk: Iterable[int]) -> set[int]:
        """Returns the versions this policy wants served out of those found on disk."""
        available = sorted(set(on_disk), reverse=True)
        if self.kind == "all":
            return set(available)
        if self.kind == "specific":
            return set(available) & set(self.versions)
        return set(available[: max(1, self.num_versions)])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One model: name, base path, version policy and version labels (ModelConfig proto)."""

    name: str
    base_path: str
    policy: VersionPolicy = dataclasses.field(default_factory=VersionPolicy)
    version_labels: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How versions are loaded and retried (tensorflow_model_server flags of the same names)."""

    saved_model_tags: tuple[str, ...] = ("serve",)
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    intra_op_parallelism: int = 0  # 0: TensorFlow's default
    inter_op_parallelism: int = 0


WARMUP_FILE = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit


@dataclasses.dataclass
class SignatureInfo:
    """A callable signature plus the input/output specs requests are validated against.

    ``fn(arrays, output_filter)`` feeds numpy arrays by input alias and returns numpy outputs.
    """

    name: str
    fn: Callable[..., Any]
    inputs: dict[str, Any]  # name -> tf.TensorSpec
    outputs: dict[str, Any]  # name -> tf.TensorSpec


@dataclasses.dataclass
class Servable:
    """One loaded model version."""

    name: str
    version: int
    path: str
    signatures: dict[str, SignatureInfo]
    signature_def_map: Any  # tensorflow_serving.apis.get_model_metadata_pb2.SignatureDefMap
    handle: Any = None  # the SessionModel; its session lives as long as the Servable
    warmup_requests: int = 0


@dataclasses.dataclass
class VersionState:
    """What GetModelStatus reports for one version."""

    state: str
    error_code: Code = Code.OK
    error_message: str = ""


Loader = Callable[[str, int, str, LoaderOptions], Servable]


def parse_model_config_text(text: str) -> list[ModelConfig]:
    """Parses a TF Serving `models.config` (ModelServerConfig text proto) into ModelConfigs."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    proto = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        raise ValueError(f"invalid model config: {exc}") from exc
    if proto.WhichOneof("config") != "model_config_list":
        raise ValueError("model config must contain a model_config_list")
    configs: list[ModelConfig] = []
    seen: set[str] = set()
    for cfg in proto.model_config_list.config:
        if not cfg.name or not cfg.base_path:
            raise ValueError("every model config needs a name and a base_path")
        if cfg.name in seen:
            raise ValueError(f"duplicate model name in config: {cfg.name}")
        if cfg.model_platform not in ("", "tensorflow"):
            raise ValueError(f"model {cfg.name}: unsupported model_platform {cfg.model_platform!r}")
        seen.add(cfg.name)
        configs.append(
            ModelConfig(
                name=cfg.name,
                base_path=cfg.base_path,
                policy=_policy_from_proto(cfg.model_version_policy),
                version_labels=dict(cfg.version_labels),
            )
        )
    return configs


def _policy_from_proto(policy: Any) -> VersionPolicy:
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy(kind="all")
    if choice == "specific":
        versions = tuple(sorted(set(policy.specific.versions)))
        if not versions:
            raise ValueError("model_version_policy specific{} needs at least one version")
        return VersionPolicy(kind="specific", versions=versions)
    num = policy.latest.num_versions if choice == "latest" else 1
    return VersionPolicy(kind="latest", num_versions=max(1, num))


def list_versions(base_path: str) -> dict[int, str]:
    """Returns {version: path} for the integer-named subdirectories of base_path.

    Anything else (temp dirs such as `.tmp-3` or `3.tmp`, files) is ignored, so exporters can
    write to a temp name and rename it into place. Any ``tf.io.gfile`` path works (``gs://``).
    """
    import tensorflow as tf

    found: dict[int, str] = {}
    try:
        names = tf.io.gfile.listdir(base_path)
    except tf.errors.OpError as exc:
        raise OSError(f"cannot list {base_path}: {exc.message}") from exc
    for name in names:
        name = name.rstrip("/")
        path = _join(base_path, name)
        if _VERSION_DIR.match(name) and tf.io.gfile.isdir(path):
            found[int(name)] = path
    return found


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if "://" in base else os.path.join(base, name)


def _fingerprint(path: str) -> tuple[int, int]:
    """Changes when a version folder is rewritten, so a failed version is retried then."""
    import tensorflow as tf

    for name in ("saved_model.pb", "saved_model.pbtxt"):
        try:
            st = tf.io.gfile.stat(_join(path, name))
            return (st.mtime_nsec, st.length)
        except tf.errors.NotFoundError:
            continue
    return (-1, -1)


def _has_saved_model(path: str) -> bool:
    import tensorflow as tf

    return any(
        tf.io.gfile.exists(_join(path, name)) for name in ("saved_model.pb", "saved_model.pbtxt")
    )


@dataclasses.dataclass
class _Failure:
    """A version that failed to load: retried at ``retry_at`` (monotonic), or when its
    folder changes."""

    fingerprint: tuple[int, int]
    attempts: int
    retry_at: float


class _ModelSlot:
    """Per-model state; `served` is replaced wholesale (copy-on-write) so reads need no lock."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.served: dict[int, Servable] = {}
        self.states: dict[int, VersionState] = {}
        self.failed: dict[int, _Failure] = {}
        self.warned_missing = False


class ServableManager:
    """Loads, serves and hot-swaps model versions; resolves ModelSpecs to Servables."""

    def __init__(
        self,
        configs: Iterable[ModelConfig],
        loader: Loader | None = None,
        options: LoaderOptions | None = None,
    ) -> None:
        self._slots = {cfg.name: _ModelSlot(cfg) for cfg in configs}
        self._loader = loader or load_servable
        self._options = options or LoaderOptions()
        self._lock = threading.Lock()  # guards slot mutation; reads use the swapped dicts
        self._poll_lock = threading.Lock()  # one poll at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def model_names(self) -> list[str]:
        return list(self._slots)

    # -- resolution ---------------------------------------------------------------------------

    def get(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """Resolves a ModelSpec to a loaded Servable, raising TF Serving's errors."""
        slot = self._slots.get(name)
        served = slot.served if slot else {}
        if label:
            if version is not None:
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"Both model version ({version}) and model version label ({label}) "
                    "cannot be supplied.",
                )
            labels = slot.config.version_labels if slot else {}
            if label not in labels:
                raise ServingError(
                    Code.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}"
                )
            version = labels[label]
        if version is None:
            if not served:
                raise ServingError(
                    Code.NOT_FOUND, f"Servable not found for request: Latest({name})"
                )
            return served[max(served)]
        servable = served.get(version)
        if servable is None:
            raise ServingError(
                Code.NOT_FOUND, f"Servable not found for request: Specific({name}, {version})"
            )
        return servable

    def status(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> list[tuple[int, VersionState]]:
        """Returns [(version, state)] newest first, as GetModelStatus does."""
        slot = self._slots.get(name)
        if slot is not None and label:
            if label not in slot.config.version_labels:
                raise ServingError(
                    Code.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}"
                )
            version = slot.config.version_labels[label]
        states = dict(slot.states) if slot else {}
        if version is not None:
            if version not in states:
                raise ServingError(
                    Code.NOT_FOUND, f"Could not find version {version} of model {name}"
                )
            return [(version, states[version])]
        if not states:
            raise ServingError(Code.NOT_FOUND, f"Could not find any versions of model {name}")
        return sorted(states.items(), reverse=True)

    def served_versions(self, name: str) -> list[int]:
        slot = self._slots.get(name)
        return sorted(slot.served) if slot else []

    # -- polling ------------------------------------------------------------------------------

    def poll_once(self) -> None:
        """Scans every model's base path once and loads / swaps / unloads versions."""
        with self._poll_lock:
            for slot in self._slots.values():
                if self._stop.is_set():
                    return
                try:
                    self._sync_model(slot)
                except Exception as exc:  # a poll must never kill the poller
                    log_event(
                        logger,
                        logging.ERROR,
                        "poll_failure",
                        model=slot.config.name,
                        error=f"{type(exc).__name__}: {exc}",
                    )

    def start_polling(self, interval_s: float) -> None:
        """Polls in a daemon thread every interval_s seconds (0 or less: never)."""
        if interval_s <= 0 or self._thread is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval_s):
                self.poll_once()

        self._thread = threading.Thread(target=run, name="version-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops polling and unloads every version."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            for slot in self._slots.values():
                for version in sorted(slot.served):
                    slot.states[version] = VersionState(STATE_END)
                    log_event(
                        logger, logging.INFO, "unload", model=slot.config.name, version=version
                    )
                slot.served = {}

    def _sync_model(self, slot: _ModelSlot) -> None:
        cfg = slot.config
        try:
            on_disk = list_versions(cfg.base_path)
        except OSError as exc:
            # Keep what is served: a transient listing failure must not unload the model.
            if not slot.warned_missing:
                log_event(
                    logger,
                    logging.WARNING,
                    "base_path_unreadable",
                    model=cfg.name,
                    base_path=cfg.base_path,
                    error=str(exc),
                )
                slot.warned_missing = True
            return
        ready = {v: p for v, p in on_disk.items() if _has_saved_model(p)}
        if not ready:
            if not slot.warned_missing:
                log_event(
                    logger,
                    logging.WARNING,
                    "no_versions_found",
                    model=cfg.name,
                    base_path=cfg.base_path,
                )
                slot.warned_missing = True
            return
        slot.warned_missing = False

        loaded: dict[int, Servable] = dict(slot.served)
        # A failed version is skipped until its retry time or until its folder changes; the
        # policy then falls back to the next candidate, so the previous version keeps serving.
        fingerprints = {v: _fingerprint_safe(p) for v, p in ready.items()}
        while True:
            now = time.monotonic()
            candidates = {
                v for v in ready if v in loaded or self._may_load(slot, v, fingerprints[v], now)
            }
            wanted = cfg.policy.select(candidates)
            missing = sorted(wanted - set(loaded), reverse=True)
            if not missing or self._stop.is_set():
                break
            for version in missing:
                servable = self._load_once(slot, version, ready[version], fingerprints[version])
                if servable is not None:
                    slot.failed.pop(version, None)
                    loaded[version] = servable
        new_served = {v: s for v, s in loaded.items() if v in wanted}
        if not new_served and slot.served:
            return  # never drop to zero served versions because nothing new loaded
        removed = sorted(set(slot.served) - set(new_served))
        with self._lock:
            slot.served = new_served  # the atomic switch
            for version in new_served:
                slot.states[version] = VersionState(STATE_AVAILABLE)
            for version in removed:
                slot.states[version] = VersionState(STATE_END)
        for version in removed:
            log_event(logger, logging.INFO, "unload", model=cfg.name, version=version)
        # Versions loaded but not wanted (e.g. policy changed mid-load) are dropped here too.

    def _may_load(
        self, slot: _ModelSlot, version: int, fingerprint: tuple[int, int], now: float
    ) -> bool:
        failure = slot.failed.get(version)
        return failure is None or failure.fingerprint != fingerprint or failure.retry_at <= now

    def _load_once(
        self, slot: _ModelSlot, version: int, path: str, fingerprint: tuple[int, int]
    ) -> Servable | None:
        """One load attempt; a failure schedules the next retry instead of waiting for it."""
        cfg = slot.config
        previous = slot.failed.get(version)
        attempt = 1 if previous is None or previous.fingerprint != fingerprint else (
            previous.attempts + 1
        )  # fmt: skip
        with self._lock:
            slot.states[version] = VersionState(STATE_LOADING)
        start = time.monotonic()
        try:
            servable = self._loader(cfg.name, version, path, self._options)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"[:2000]
            retries_left = self._options.max_num_load_retries - (attempt - 1)
            interval = self._options.load_retry_interval_micros / 1e6
            retry_at = time.monotonic() + interval if retries_left > 0 else math.inf
            slot.failed[version] = _Failure(fingerprint, attempt, retry_at)
            log_event(
                logger,
                logging.ERROR,
                "load_failure",
                model=cfg.name,
                version=version,
                path=path,
                attempt=attempt,
                retries_left=max(0, retries_left),
                error=message,
            )
            with self._lock:
                slot.states[version] = VersionState(STATE_END, Code.UNKNOWN, message)
            return None
        log_event(
            logger,
            logging.INFO,
            "load",
            model=cfg.name,
            version=version,
            path=path,
            signatures=sorted(servable.signatures),
            warmup_requests=servable.warmup_requests,
            duration_s=round(time.monotonic() - start, 3),
        )
        return servable

    # -- model config reload ------------------------------------------------------------------

    def update_configs(self, configs: Iterable[ModelConfig]) -> None:
        """Applies a re-read model config file: adds, changes and removes models.

        A removed model's versions are unloaded (requests already holding them finish).
        """
        configs = list(configs)
        with self._poll_lock:
            slots = dict(self._slots)
            names = {cfg.name for cfg in configs}
            for cfg in configs:
                slot = slots.get(cfg.name)
                if slot is None:
                    slots[cfg.name] = _ModelSlot(cfg)
                elif slot.config != cfg:
                    slot.config = cfg
            for name in [n for n in slots if n not in names]:
                slot = slots.pop(name)
                with self._lock:
                    for version in sorted(slot.served):
                        slot.states[version] = VersionState(STATE_END)
                        log_event(logger, logging.INFO, "unload", model=name, version=version)
                    slot.served = {}
            self._slots = slots  # copy-on-write: readers see the old or the new dict


def _fingerprint_safe(path: str) -> tuple[int, int]:
    try:
        return _fingerprint(path)
    except Exception:  # a listing race or a flaky remote file system: treat as unknown
        return (-1, -1)


def register_custom_ops() -> None:
    """Registers TF Text's and ScaNN's ops (see :mod:`serving.session_runner`)."""
    from serving.session_runner import register_custom_ops as register

    register()


def _tensor_spec(info: Any) -> Any:
    import tensorflow as tf

    dtype = tf.dtypes.as_dtype(info.dtype)
    if info.tensor_shape.unknown_rank:
        return tf.TensorSpec(None, dtype, name=info.name)
    dims = [d.size if d.size >= 0 else None for d in info.tensor_shape.dim]
    return tf.TensorSpec(dims, dtype, name=info.name)


def load_servable(name: str, version: int, path: str, options: LoaderOptions) -> Servable:
    """Loads one version through the session-based loader, then replays its warm-up file."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    from serving.session_runner import SessionModel

    model = SessionModel(
        path,
        options.saved_model_tags,
        intra_op_parallelism=options.intra_op_parallelism,
        inter_op_parallelism=options.inter_op_parallelism,
    )
    signatures: dict[str, SignatureInfo] = {}
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for sig_name, sig_def in model.signature_defs.items():
        sig_map.signature_def[sig_name].CopyFrom(sig_def)
        if sig_name.startswith("__"):
            continue  # the loader's own ops (`__saved_model_init_op`): metadata only

        def run(arrays: Mapping[str, Any], output_filter: Any = (), _name: str = sig_name) -> Any:
            return model.run(_name, arrays, output_filter)

        signatures[sig_name] = SignatureInfo(
            name=sig_name,
            fn=run,
            inputs={k: _tensor_spec(v) for k, v in sig_def.inputs.items()},
            outputs={k: _tensor_spec(v) for k, v in sig_def.outputs.items()},
        )
    servable = Servable(
        name=name,
        version=version,
        path=path,
        signatures=signatures,
        signature_def_map=sig_map,
        handle=model,
    )
    try:
        servable.warmup_requests = replay_warmup(servable)
    except BaseException:
        model.close()
        raise
    return servable


def replay_warmup(servable: Servable) -> int:
    """Runs the PredictLogs of ``assets.extra/tf_serving_warmup_requests`` (at most 1,000).

    As in TF Serving, a failing warm-up request fails the load, so a version that cannot
    answer its own sample requests never turns AVAILABLE. Returns the number replayed.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = _join(_join(servable.path, "assets.extra"), WARMUP_FILE)
    if not tf.io.gfile.exists(path):
        return 0
    count = 0
    for raw in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        if log.WhichOneof("log_type") != "predict_log":
            raise ValueError(
                f"warm-up record {count}: only predict_log records are supported, got "
                f"{log.WhichOneof('log_type')}"
            )
        request = log.predict_log.request
        sig_name = request.model_spec.signature_name or "serving_default"
        sig = servable.signatures.get(sig_name)
        if sig is None:
            raise ValueError(f"warm-up record {count}: no signature {sig_name!r}")
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        try:
            sig.fn(inputs)
        except Exception as exc:
            first = str(getattr(exc, "message", exc)).strip().splitlines()[:1]
            raise ValueError(
                f"warm-up record {count} ({sig_name}) failed: {type(exc).__name__}: "
                f"{first[0] if first else ''}"
            ) from exc
        count += 1
    return count
