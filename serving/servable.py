"""One loaded model version: its signatures, run the way TF Serving runs them, and warm-up.

A version is loaded the way TF Serving loads it (the session-based SavedModel loader, run by
the SignatureDefs' tensor names; :mod:`serving.session_runner`), and the PredictionLogs of its
``assets.extra/tf_serving_warmup_requests`` are replayed before it turns AVAILABLE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from common.contract import RETRIEVE, WARMUP_FILE
from serving.model_config import join_path

MAX_WARMUP_RECORDS = 1000  # TF Serving's limit


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How versions are loaded and retried (tensorflow_model_server flags of the same names)."""

    saved_model_tags: tuple[str, ...] = ("serve",)
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    intra_op_parallelism: int = 0  # 0: TensorFlow's default
    inter_op_parallelism: int = 0


@dataclasses.dataclass
class SignatureInfo:
    """A callable signature plus the input/output specs requests are validated against.

    ``fn(arrays, output_filter)`` feeds numpy arrays by input alias and returns numpy outputs.
    """

    name: str
    fn: Callable[..., Any]
    inputs: dict[str, Any]  # name -> tf.TensorSpec
    outputs: dict[str, Any]  # name -> tf.TensorSpec
    #: name -> the input's dims (None: any rank; a None dim: any size), read once here so
    #: that checking a request does not build a TensorShape per input.
    input_dims: dict[str, tuple[int | None, ...] | None] = dataclasses.field(init=False)
    #: name -> the input's DataType enum: a gRPC request's dtype is compared as the int it is.
    input_codes: dict[str, int] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.input_codes = {name: spec.dtype.as_datatype_enum for name, spec in self.inputs.items()}
        self.input_dims = {
            name: None if spec.shape.rank is None else tuple(spec.shape.as_list())
            for name, spec in self.inputs.items()
        }


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


Loader = Callable[[str, int, str, LoaderOptions], Servable]


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

    path = join_path(join_path(servable.path, "assets.extra"), WARMUP_FILE)
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
        sig_name = request.model_spec.signature_name or RETRIEVE
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
