"""Which models and versions to serve: TF Serving's model config and version folders.

A model is a name, a base path and a version policy (``latest``/``all``/``specific``, as
TF Serving's ServableVersionPolicy) with optional version labels; :func:`parse_model_config_text`
reads them from a ``models.config`` (ModelServerConfig text proto). A version is an
integer-named folder ``<base_path>/<version>/`` holding a ``saved_model.pb``; anything else
(temporaries such as ``.tmp-3`` or ``3.tmp``, files) is ignored, so exporters can write to a
temporary name and rename it into place. Paths go through ``tf.io.gfile`` (``gs://`` works).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

_VERSION_DIR = re.compile(r"^[0-9]+$")


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
        path = join_path(base_path, name)
        if _VERSION_DIR.match(name) and tf.io.gfile.isdir(path):
            found[int(name)] = path
    return found


def join_path(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if "://" in base else os.path.join(base, name)


def fingerprint(path: str) -> tuple[int, int]:
    """Changes when a version folder is rewritten, so a failed version is retried then."""
    import tensorflow as tf

    for name in ("saved_model.pb", "saved_model.pbtxt"):
        try:
            st = tf.io.gfile.stat(join_path(path, name))
            return (st.mtime_nsec, st.length)
        except tf.errors.NotFoundError:
            continue
    return (-1, -1)


def has_saved_model(path: str) -> bool:
    import tensorflow as tf

    return any(
        tf.io.gfile.exists(join_path(path, name))
        for name in ("saved_model.pb", "saved_model.pbtxt")
    )


def fingerprint_safe(path: str) -> tuple[int, int]:
    try:
        return fingerprint(path)
    except Exception:  # a listing race or a flaky remote file system: treat as unknown
        return (-1, -1)
