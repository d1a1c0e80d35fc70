"""Model versions: discovery under `<base_path>/<version>/`, loading, hot swap and status.

Mirrors TF Serving's FileSystemStoragePathSource + AspiredVersionsManager with the
availability-preserving policy: a new version is loaded fully before the served set is swapped
(one pointer assignment under a lock), and only then are the versions that left the policy
unloaded. A request holds a reference to the `Servable` it resolved, so a version being unloaded
finishes the requests already running on it.
"""

from __future__ import annotations

import dataclasses
import logging
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


@dataclasses.dataclass
class SignatureInfo:
    """A callable signature plus the input/output specs requests are validated against."""

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
    handle: Any = None  # the object tf.saved_model.load returned; keeps variables alive


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
    write to a temp name and rename it into place.
    """
    found: dict[int, str] = {}
    with os.scandir(base_path) as entries:
        for entry in entries:
            if _VERSION_DIR.match(entry.name) and entry.is_dir():
                found[int(entry.name)] = entry.path
    return found


def _fingerprint(path: str) -> tuple[int, int]:
    """Changes when a version folder is rewritten, so a failed version is retried then."""
    for name in ("saved_model.pb", "saved_model.pbtxt"):
        try:
            st = os.stat(os.path.join(path, name))
            return (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            continue
    return (os.stat(path).st_mtime_ns, -1)


def _has_saved_model(path: str) -> bool:
    return any(
        os.path.exists(os.path.join(path, name)) for name in ("saved_model.pb", "saved_model.pbtxt")
    )


class _ModelSlot:
    """Per-model state; `served` is replaced wholesale (copy-on-write) so reads need no lock."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.served: dict[int, Servable] = {}
        self.states: dict[int, VersionState] = {}
        self.failed: dict[int, tuple[int, int]] = {}
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
        # A version that failed stays skipped until its folder changes; a failure makes the
        # policy fall back to the next candidate, so the previous version keeps serving.
        while True:
            candidates = {
                v
                for v, p in ready.items()
                if v in loaded or slot.failed.get(v) != _fingerprint_safe(p)
            }
            wanted = cfg.policy.select(candidates)
            missing = sorted(wanted - set(loaded), reverse=True)
            if not missing or self._stop.is_set():
                break
            for version in missing:
                servable = self._load_with_retries(slot, version, ready[version])
                if servable is None:
                    slot.failed[version] = _fingerprint_safe(ready[version])
                else:
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

    def _load_with_retries(self, slot: _ModelSlot, version: int, path: str) -> Servable | None:
        cfg = slot.config
        attempts = 1 + max(0, self._options.max_num_load_retries)
        with self._lock:
            slot.states[version] = VersionState(STATE_LOADING)
        for attempt in range(1, attempts + 1):
            start = time.monotonic()
            try:
                servable = self._loader(cfg.name, version, path, self._options)
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                log_event(
                    logger,
                    logging.ERROR,
                    "load_failure",
                    model=cfg.name,
                    version=version,
                    path=path,
                    attempt=attempt,
                    error=message[:2000],
                )
                if attempt < attempts and not self._stop.wait(
                    self._options.load_retry_interval_micros / 1e6
                ):
                    continue
                with self._lock:
                    slot.states[version] = VersionState(STATE_END, Code.UNKNOWN, message[:2000])
                return None
            log_event(
                logger,
                logging.INFO,
                "load",
                model=cfg.name,
                version=version,
                path=path,
                signatures=sorted(servable.signatures),
                duration_s=round(time.monotonic() - start, 3),
            )
            return servable
        return None


def _fingerprint_safe(path: str) -> tuple[int, int]:
    try:
        return _fingerprint(path)
    except OSError:
        return (-1, -1)


_CUSTOM_OPS_LOCK = threading.Lock()
_custom_ops_registered = False


def register_custom_ops() -> None:
    """Imports the op libraries our exports embed (TF Text tokenizers, ScaNN) once.

    Without them tf.saved_model.load fails with `Op type not registered`. A missing package is
    only logged: models that do not use its ops still load.
    """
    global _custom_ops_registered
    with _CUSTOM_OPS_LOCK:
        if _custom_ops_registered:
            return
        try:
            import tensorflow_text  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the install
            log_event(
                logger,
                logging.WARNING,
                "custom_ops_missing",
                package="tensorflow_text",
                error=str(exc),
            )
        try:
            from scann.scann_ops.py import scann_ops  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the install
            log_event(
                logger, logging.WARNING, "custom_ops_missing", package="scann", error=str(exc)
            )
        _custom_ops_registered = True


def read_signature_def_map(path: str, tags: Iterable[str]) -> Any:
    """Reads the SignatureDefs from saved_model.pb exactly as TF Serving reports them."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2

    saved_model = saved_model_pb2.SavedModel()
    pb_path = os.path.join(path, "saved_model.pb")
    if os.path.exists(pb_path):
        with open(pb_path, "rb") as f:
            saved_model.ParseFromString(f.read())
    else:
        with open(os.path.join(path, "saved_model.pbtxt")) as f:
            text_format.Parse(f.read(), saved_model)
    wanted = set(tags)
    for meta_graph in saved_model.meta_graphs:
        if wanted <= set(meta_graph.meta_info_def.tags):
            result = get_model_metadata_pb2.SignatureDefMap()
            for key, sig in meta_graph.signature_def.items():
                result.signature_def[key].CopyFrom(sig)
            return result
    raise ValueError(f"no MetaGraphDef with tags {sorted(wanted)} in {path}")


def load_servable(name: str, version: int, path: str, options: LoaderOptions) -> Servable:
    """Loads one SavedModel version with tf.saved_model.load and indexes its signatures."""
    register_custom_ops()
    import tensorflow as tf

    tags = list(options.saved_model_tags)
    handle = tf.saved_model.load(path, tags=tags)
    signatures: dict[str, SignatureInfo] = {}
    for sig_name, fn in handle.signatures.items():
        _, kwargs = fn.structured_input_signature
        outputs = fn.structured_outputs
        if not isinstance(outputs, Mapping):
            raise ValueError(f"signature {sig_name!r} must return a dict of named outputs")
        signatures[sig_name] = SignatureInfo(
            name=sig_name, fn=fn, inputs=dict(kwargs), outputs=dict(outputs)
        )
    return Servable(
        name=name,
        version=version,
        path=path,
        signatures=signatures,
        signature_def_map=read_signature_def_map(path, tags),
        handle=handle,
    )
