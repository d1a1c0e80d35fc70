"""Where the model runs: an export loaded in this process, or a model behind a server.

Both backends call the export's own signatures (:mod:`common.contract`), so scoring gives what
TF Serving serves. Strings cross the boundary as ``bytes`` and come back as ``str`` object
arrays (:func:`encode`, :func:`decode`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from common import contract
from scoring import ScoringError
from trainer import ranking


class Retriever(Protocol):
    """What scoring needs from a model: the retrieve signature, in process or remote.

    A ``max_k`` attribute, when there is one, is the largest ``k`` the model allows.
    """

    def retrieve(
        self,
        features: dict[str, np.ndarray],
        k: int,
        exclude_item_ids: np.ndarray,
        diversity: float,
    ) -> dict[str, np.ndarray]:
        """Query features (strings ``[B]``, ``history`` ``[B, H]``), exclusions ``[B, E]``.

        Returns ``item_ids`` / ``titles`` (``str`` object arrays) and ``scores`` float32, all
        ``[B, k]``.
        """

    def candidate_embeddings(
        self, catalog: dict[str, np.ndarray], batch_size: int = 512
    ) -> np.ndarray:
        """``[N, D]`` unit embeddings of the catalog's items (popularity-prior column left out), in
        catalog order: for item-item similarity."""

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity of the model (recorded in the run manifest)."""


#: The query inputs of every query signature, in the contract's order.
QUERY_INPUTS = (*contract.QUERY_FEATURES, contract.HISTORY)


def decode(values: np.ndarray) -> np.ndarray:
    """bytes -> str object array (any shape); other dtypes unchanged."""
    values = np.asarray(values)
    if values.dtype == object or values.dtype.kind == "S":
        return (
            np.vectorize(
                lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v),
                otypes=[object],
            )(values)
            if values.size
            else values.astype(object)
        )
    return values


def encode(values: np.ndarray) -> np.ndarray:
    """str -> bytes object array (what tf.constant and TensorProtos want for strings)."""
    values = np.asarray(values, dtype=object)
    if not values.size:
        return values
    return np.vectorize(
        lambda v: v if isinstance(v, bytes) else str(v).encode("utf-8"), otypes=[object]
    )(values)


def absolute(path: str) -> str:
    """Local paths made absolute (so a resume from another directory still matches)."""
    return path if "://" in path else os.path.abspath(path)


def check_k(k: int, max_k: int | None) -> None:
    """Raises :class:`ScoringError` unless ``1 <= k <= max_k`` (``None``: no upper bound)."""
    if k < 1:
        raise ScoringError(f"-k must be at least 1, got {k}")
    if max_k is not None and k > max_k:
        raise ScoringError(f"-k {k} is more than the export allows (max_k = {max_k})")


def resolve_export_dir(path: str) -> str:
    """A SavedModel version dir from either that dir or a model base (highest numeric version).

    TF Serving ignores non-numeric folders (an exporter's ``.tmp-*``), and so does this.
    """
    import tensorflow as tf

    path = path.rstrip("/") or "/"
    if not tf.io.gfile.isdir(path):
        raise ScoringError(f"--export {path}: no such directory")
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = sorted(
        (
            int(name.rstrip("/"))
            for name in tf.io.gfile.listdir(path)
            if re.fullmatch(r"\d+/?", name)
            and tf.io.gfile.exists(os.path.join(path, name.rstrip("/"), "saved_model.pb"))
        ),
        reverse=True,
    )
    if not versions:
        raise ScoringError(
            f"--export {path}: neither a SavedModel (no saved_model.pb) nor a model base with "
            "numeric version folders holding one"
        )
    return os.path.join(path, str(versions[0]))


def export_max_k(version_dir: str) -> int | None:
    """The export's largest allowed ``k``, from the exporter's metadata when it wrote one."""
    import tensorflow as tf

    path = os.path.join(version_dir, "assets.extra", contract.RECALL_FILE)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            return int(json.load(f)["index"]["max_k"])
    except (KeyError, TypeError, ValueError):
        return None


def load_custom_ops() -> None:
    """Registers the TF Text and ScaNN ops an export uses; loading fails without them."""
    import tensorflow_text  # noqa: F401

    # A brute-force export needs no ScaNN; a ScaNN one then fails loudly on load.
    with contextlib.suppress(ImportError):
        from scann.scann_ops.py import scann_ops  # noqa: F401


def _retrieve_inputs(
    features: dict[str, np.ndarray], k: int, exclude_item_ids: np.ndarray, diversity: float
) -> dict[str, np.ndarray]:
    """The retrieve signature's inputs for ``B`` queries (every input has a batch dim)."""
    batch = len(features["user_id"])
    return {
        **{n: encode(features[n]) for n in QUERY_INPUTS},
        "k": np.full([batch], k, np.int32),
        "exclude_item_ids": encode(exclude_item_ids),
        "diversity": np.full([batch], diversity, np.float32),
    }


def _embed_catalog(
    call: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    catalog: dict[str, np.ndarray],
    batch_size: int,
) -> np.ndarray:
    """Runs the ``candidate_embedding`` signature over the catalog in batches -> the unit
    vectors ``[N, D]`` item-item similarity compares (:func:`common.contract.similarity_vectors`:
    without a popularity-prior column)."""
    size = len(catalog["item_id"])
    parts = []
    for block in ranking.iter_blocks(size, batch_size):
        inputs = {n: encode(catalog[n][block]) for n in contract.CANDIDATE_FEATURES}
        parts.append(np.asarray(call(inputs)["embeddings"], dtype=np.float32))
    if not parts:
        return np.zeros((0, 0), np.float32)
    return contract.similarity_vectors(np.concatenate(parts))


class ExportScorer:
    """An export loaded in this process; calls its signatures directly.

    Args:
      path: a version dir (``.../movielens/3``) or a model base (``.../movielens``).
      signature: the retrieve signature's name.
    """

    def __init__(self, path: str, signature: str = contract.RETRIEVE):
        import tensorflow as tf

        self._tf = tf
        self.path = resolve_export_dir(path)
        load_custom_ops()
        try:
            self.model = tf.saved_model.load(self.path)
        except (OSError, ValueError, tf.errors.OpError) as e:
            raise ScoringError(f"cannot load the SavedModel at {self.path}: {e}") from e
        if signature not in self.model.signatures:
            raise ScoringError(
                f"{self.path} has no signature {signature!r}; it has "
                f"{sorted(self.model.signatures)}"
            )
        self.signature = signature
        self.max_k = export_max_k(self.path)

    def _call(self, signature: str, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        fn = self.model.signatures[signature]
        declared = fn.structured_input_signature[1]
        missing = sorted(set(declared) - set(inputs))
        if missing:
            raise ScoringError(
                f"signature {signature!r} needs inputs {missing} this tool does not provide"
            )
        tensors = {
            name: self._tf.constant(inputs[name], dtype=spec.dtype)
            for name, spec in declared.items()
        }
        try:
            outputs = fn(**tensors)
        except self._tf.errors.OpError as e:
            raise ScoringError(
                f"the model rejected the request: {e.message.splitlines()[0]}"
            ) from e
        return {name: decode(value.numpy()) for name, value in outputs.items()}

    def retrieve(self, features, k, exclude_item_ids, diversity):
        inputs = _retrieve_inputs(features, k, exclude_item_ids, diversity)
        return self._call(self.signature, inputs)

    def query_embeddings(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """``[B, D]`` query embeddings (``query_embedding`` signature)."""
        inputs = {n: encode(features[n]) for n in QUERY_INPUTS}
        return self._call(contract.QUERY_EMBEDDING, inputs)["embeddings"]

    def candidate_embeddings(self, catalog, batch_size=512):
        name = contract.CANDIDATE_EMBEDDING
        if name not in self.model.signatures:
            raise ScoringError(f"{self.path} has no {name!r} signature")
        return _embed_catalog(lambda inputs: self._call(name, inputs), catalog, batch_size)

    def describe(self):
        return {"export": absolute(self.path), "signature": self.signature}


class ServerScorer:
    """A model behind TF Serving (or ``serving.server``), through ``serving.client``.

    Checks at construction that the server answers and the model has the signature, so an
    unreachable server is a clear :class:`ScoringError`, not a traceback mid-run.
    """

    def __init__(
        self,
        target: str,
        model_name: str = "movielens",
        signature: str = contract.RETRIEVE,
        timeout_s: float = 60.0,
    ):
        import grpc

        from serving.client import ServingClient

        if not re.fullmatch(r"[^\s:]+:\d{1,5}", target):
            raise ScoringError(f"--server must be HOST:PORT, got {target!r}")
        self._grpc = grpc
        self.target, self.model_name, self.signature = target, model_name, signature
        self.client = ServingClient(target, model_name, timeout_s=timeout_s, retries=2)
        try:
            signatures = self.client.metadata()
        except grpc.RpcError as e:
            self.client.close()
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            details = e.details() if hasattr(e, "details") else str(e)
            if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                raise ScoringError(
                    f"cannot reach a model server at {target} ({code}); is it "
                    "running and is the port its gRPC port?"
                ) from e
            raise ScoringError(f"server {target}, model {model_name!r}: {code}: {details}") from e
        if signature not in signatures:
            self.client.close()
            raise ScoringError(
                f"model {model_name!r} at {target} has no signature {signature!r}; "
                f"it has {sorted(signatures)}"
            )
        self.signatures = signatures
        self.max_k = None

    def _rpc(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._grpc.RpcError as e:
            raise ScoringError(f"server {self.target}: {e.code().name}: {e.details()}") from e

    def retrieve(self, features, k, exclude_item_ids, diversity):
        columns = {n: encode(features[n]) for n in QUERY_INPUTS}
        out = self._rpc(
            self.client.retrieve,
            columns,
            k=int(k),
            exclude_item_ids=list(encode(exclude_item_ids)),
            diversity=float(diversity),
            signature_name=self.signature,
        )
        return {name: decode(value) for name, value in out.items()}

    def candidate_embeddings(self, catalog, batch_size=512):
        name = contract.CANDIDATE_EMBEDDING
        if name not in self.signatures:
            raise ScoringError(f"model {self.model_name!r} has no {name!r} signature")
        return _embed_catalog(
            lambda inputs: self._rpc(self.client.predict, inputs, name), catalog, batch_size
        )

    def describe(self):
        identity = {
            "server": self.target,
            "model_name": self.model_name,
            "signature": self.signature,
        }
        # A new version on the server is a different model: resuming must not mix the two.
        with contextlib.suppress(self._grpc.RpcError):  # no ModelService: identity by name
            identity["versions"] = sorted(
                s["version"] for s in self.client.status() if s["state"] == "AVAILABLE"
            )
        return identity

    def close(self) -> None:
        self.client.close()
