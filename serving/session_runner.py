"""Running an export the way TF Serving does: the session-based SavedModel loader.

TF Serving restores a SavedModel through its MetaGraph (the saver's restore op, the init op)
and runs ``Session::Run`` fed and fetched by the SignatureDef's tensor names; it never builds
the TF2 object graph that ``tf.saved_model.load`` restores. A variable the object graph knows
but the MetaGraph's saver does not (Keras 3 variables on a bare ``tf.Module``) therefore loads
fine in TF2 and fails in TF Serving. Everything here takes TF Serving's path, so the local
server, the tests and batch scoring accept only what TF Serving accepts.

    model = SessionModel("/models/movielens/3")
    outputs = model.run("serving_default", {"user_id": np.array([b"42"], object), ...})
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger("serving.session_runner")

_CUSTOM_OPS_LOCK = threading.Lock()
_custom_ops_registered = False


def register_custom_ops() -> None:
    """Imports the op libraries our exports embed (TF Text tokenizers, ScaNN) once.

    Without them loading fails with ``Op type not registered``. A missing package is only
    logged: models that do not use its ops still load.
    """
    global _custom_ops_registered
    with _CUSTOM_OPS_LOCK:
        if _custom_ops_registered:
            return
        from serving.errors import log_event

        try:
            import tensorflow_text  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the install
            log_event(
                logger, logging.WARNING, "custom_ops_missing", package="tensorflow_text",
                error=str(exc),
            )  # fmt: skip
        try:
            from scann.scann_ops.py import scann_ops  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the install
            log_event(
                logger, logging.WARNING, "custom_ops_missing", package="scann", error=str(exc)
            )
        _custom_ops_registered = True


class SessionModel:
    """One SavedModel loaded into its own graph and session, run by signature tensor names.

    ``run`` may be called from many threads at once (``Session.run`` is thread-safe).
    """

    def __init__(
        self,
        path: str,
        tags: Iterable[str] = ("serve",),
        intra_op_parallelism: int = 0,
        inter_op_parallelism: int = 0,
    ) -> None:
        register_custom_ops()
        import tensorflow as tf

        self.path = path
        self.graph = tf.Graph()
        config = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=intra_op_parallelism,
            inter_op_parallelism_threads=inter_op_parallelism,
        )
        self.session = tf.compat.v1.Session(graph=self.graph, config=config)
        try:
            with self.graph.as_default():
                self.meta_graph = tf.compat.v1.saved_model.load(self.session, list(tags), path)
        except BaseException:
            self.session.close()
            raise
        self.signature_defs = dict(self.meta_graph.signature_def)
        self._outputs = {name: tuple(sorted(s.outputs)) for name, s in self.signature_defs.items()}
        # Per signature and input: (numpy dtype, dims with -1 unknown; None: unknown rank).
        self._inputs = {
            name: {
                alias: (
                    tf.as_dtype(info.dtype).as_numpy_dtype,
                    None
                    if info.tensor_shape.unknown_rank
                    else tuple(d.size for d in info.tensor_shape.dim),
                )
                for alias, info in s.inputs.items()
            }
            for name, s in self.signature_defs.items()
        }
        self._callables: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def run(
        self,
        signature: str,
        inputs: Mapping[str, Any],
        output_filter: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """Feeds ``inputs`` (by alias) and fetches the named outputs (all when no filter).

        Each value is converted to its input's dtype and its shape checked against the
        signature's, as ``Session.run`` does; a value that does not fit raises ValueError.
        """
        sig = self.signature_defs[signature]
        unknown = sorted(set(inputs) - set(sig.inputs))
        missing = sorted(set(sig.inputs) - set(inputs))
        if unknown or missing:
            raise KeyError(f"signature {signature!r}: unknown inputs {unknown}, missing {missing}")
        names = tuple(output_filter) or self._outputs[signature]
        order = tuple(inputs)
        feeds = [self._feed_value(signature, name, inputs[name]) for name in order]
        fetched = self._callable(signature, order, names)(*feeds)
        return dict(zip(names, fetched, strict=True))

    def _feed_value(self, signature: str, name: str, value: Any) -> np.ndarray:
        dtype, dims = self._inputs[signature][name]
        arr = np.asarray(value, dtype=dtype)
        if dims is not None and (
            len(dims) != arr.ndim
            or any(d >= 0 and d != n for d, n in zip(dims, arr.shape, strict=True))
        ):
            shape = ", ".join("?" if d < 0 else str(d) for d in dims)
            raise ValueError(
                f"Cannot feed value of shape {arr.shape} for input {name!r}, which has shape "
                f"[{shape}]"
            )
        return arr

    def _callable(self, signature: str, feeds: tuple[str, ...], fetches: tuple[str, ...]) -> Any:
        """A ``Session::MakeCallable`` handle for these feeds and fetches, made once.

        ``Session.run`` spends about 0.27 ms of Python per call resolving names and building
        its fetch handler (measured on this machine; a callable costs 0.02-0.04 ms), which
        is most of what a known-text request costs outside the graph. TF Serving's C++
        ``Session::Run`` has no such cost; the callable comes closest.
        """
        key = (signature, feeds, fetches)
        fn = self._callables.get(key)
        if fn is not None:
            return fn
        from tensorflow.core.protobuf import config_pb2

        sig = self.signature_defs[signature]
        options = config_pb2.CallableOptions(
            feed=[sig.inputs[name].name for name in feeds],
            fetch=[sig.outputs[name].name for name in fetches],
        )
        with self._lock:
            fn = self._callables.get(key)
            if fn is None:
                fn = self.session._make_callable_from_options(options)
                self._callables[key] = fn
        return fn

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> SessionModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_signature(
    path: str, signature: str, inputs: Mapping[str, Any], tags: Iterable[str] = ("serve",)
) -> dict[str, np.ndarray]:
    """Loads ``path`` the TF Serving way, runs one signature once and closes the session."""
    with SessionModel(path, tags) as model:
        return model.run(signature, inputs)
