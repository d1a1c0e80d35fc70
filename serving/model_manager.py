"""Model versions: hot swap and status over what :mod:`serving.model_config` finds on disk.

Mirrors TF Serving's FileSystemStoragePathSource + AspiredVersionsManager with the
availability-preserving policy: a new version is loaded fully before the served set is swapped
(one pointer assignment under a lock), and only then are the versions that left the policy
unloaded. A request holds a reference to the `Servable` it resolved, so a version being unloaded
finishes the requests already running on it.

Versions load through :func:`serving.servable.load_servable` (TF Serving's session-based
loader, then the warm-up replay). A version that fails to load goes to END with its error in
GetModelStatus; its retries are scheduled for later polls instead of sleeping, so newer
versions and other models keep loading.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import threading
import time
from collections.abc import Iterable

from serving.errors import Code, ServingError, log_event
from serving.model_config import ModelConfig, fingerprint_safe, has_saved_model, list_versions
from serving.servable import Loader, LoaderOptions, Servable, load_servable

logger = logging.getLogger("serving.model_manager")

# ModelVersionStatus.State names (tensorflow_serving/apis/get_model_status.proto).
STATE_START = "START"
STATE_LOADING = "LOADING"
STATE_AVAILABLE = "AVAILABLE"
STATE_UNLOADING = "UNLOADING"
STATE_END = "END"


@dataclasses.dataclass
class VersionState:
    """What GetModelStatus reports for one version."""

    state: str
    error_code: Code = Code.OK
    error_message: str = ""


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
        freeze_heap: bool = False,
    ) -> None:
        """``freeze_heap``: after each change of the served set, collect once and freeze what
        survives (:func:`settle_heap`); for a serving process, not for a library user."""
        self._freeze_heap = freeze_heap
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
                    changed = self._sync_model(slot)
                except Exception as exc:  # a poll must never kill the poller
                    changed = False
                    log_event(
                        logger,
                        logging.ERROR,
                        "poll_failure",
                        model=slot.config.name,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                # Here, once _sync_model's locals (which still hold an unloaded version) are gone.
                if changed and self._freeze_heap:
                    settle_heap()

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

    def _sync_model(self, slot: _ModelSlot) -> bool:
        """One model's poll; True when its served set changed."""
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
            return False
        ready = {v: p for v, p in on_disk.items() if has_saved_model(p)}
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
            return False
        slot.warned_missing = False

        loaded: dict[int, Servable] = dict(slot.served)
        # A failed version is skipped until its retry time or until its folder changes; the
        # policy then falls back to the next candidate, so the previous version keeps serving.
        fingerprints = {v: fingerprint_safe(p) for v, p in ready.items()}
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
            return False  # never drop to zero served versions because nothing new loaded
        added = set(new_served) - set(slot.served)
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
        return bool(added or removed)

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
            dropped = [n for n in slots if n not in names]
            for name in dropped:
                slot = slots.pop(name)
                with self._lock:
                    for version in sorted(slot.served):
                        slot.states[version] = VersionState(STATE_END)
                        log_event(logger, logging.INFO, "unload", model=name, version=version)
                    slot.served = {}
            self._slots = slots  # copy-on-write: readers see the old or the new dict
        if dropped and self._freeze_heap:
            settle_heap()


def settle_heap() -> None:
    """Collects once, then freezes every object still alive out of the cyclic GC.

    A server with a loaded model holds about 380,000 tracked Python objects (TensorFlow, the
    graph's wrappers) that every full collection walks again: measured in the server process
    on these cores, full collections of 0.1-0.4 s, one of them while it answered requests of
    2-4 ms. With the heap frozen (``gc.freeze``, CPython's answer for long-lived servers), no
    collection while answering took over 0.1 ms. Unfrozen first, so the objects of versions
    just unloaded are collected instead of kept.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    log_event(logger, logging.INFO, "heap_frozen", objects=gc.get_freeze_count())
