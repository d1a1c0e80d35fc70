"""Transport-independent Predict: resolve the servable and signature, validate, run.

Both the gRPC and the REST front end call this, so they answer the same errors. Messages
follow TF Serving's (servables/tensorflow/predict_util.cc) where TF Serving has one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from common.contract import RETRIEVE
from serving.batching import Batcher, batch_key_and_size
from serving.errors import Code, ServingError, from_exception
from serving.metrics import Metrics
from serving.model_manager import ServableManager
from serving.servable import Servable, SignatureInfo


@dataclasses.dataclass
class PredictResult:
    """Outputs of one Predict plus what the response's model_spec reports."""

    model_name: str
    version: int
    signature_name: str
    outputs: dict[str, np.ndarray]


class Predictor:
    """Runs Predict requests against a ServableManager, optionally through a Batcher."""

    def __init__(
        self,
        manager: ServableManager,
        batcher: Batcher | None = None,
        max_batch_size: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self.manager = manager
        self.batcher = batcher
        self.metrics = metrics if metrics is not None else Metrics()
        self.max_batch_size = max_batch_size  # rows along dim 0 per request; 0: unbounded

    def resolve(
        self,
        model_name: str,
        version: int | None = None,
        version_label: str | None = None,
        signature_name: str = "",
    ) -> tuple[Servable, SignatureInfo]:
        """Finds the servable and the signature a request names."""
        servable = self.manager.get(model_name, version, version_label)
        name = signature_name or RETRIEVE  # TF Serving's default key
        sig = servable.signatures.get(name)
        if sig is None:
            # TF Serving answers FAILED_PRECONDITION here (REST maps it to 400 like
            # INVALID_ARGUMENT).
            raise ServingError(
                Code.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.'
            )
        return servable, sig

    def predict(
        self,
        model_name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: int | None = None,
        version_label: str | None = None,
        signature_name: str = "",
        output_filter: Sequence[str] = (),
    ) -> PredictResult:
        """Validates numpy inputs against the signature and runs it."""
        servable, sig = self.resolve(model_name, version, version_label, signature_name)
        check_input_names(sig, inputs.keys())
        arrays = {}
        for name, value in inputs.items():
            arr = np.asarray(value)
            check_input(sig, name, _tf_dtype_of(arr, sig.inputs[name].dtype), arr.shape)
            arrays[name] = arr
        return self.run(servable, sig, arrays, output_filter)

    def run(
        self,
        servable: Servable,
        sig: SignatureInfo,
        arrays: dict[str, np.ndarray],
        output_filter: Sequence[str] = (),
    ) -> PredictResult:
        """Runs validated inputs, batched when a Batcher is set."""
        wanted = check_output_filter(sig, output_filter)
        if self.max_batch_size:
            check_batch_size(arrays, self.max_batch_size)

        def call(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return call_signature(sig, batch)

        outputs: Mapping[str, np.ndarray] | None = None
        if self.batcher is not None:
            # TF Serving's BatchingSession: every input needs the same dim 0; no rank-0 inputs.
            key, size = batch_key_and_size((id(servable), sig.name), arrays)
            if size:
                outputs = self.batcher.submit(key, arrays, size, call)
        if outputs is None:
            outputs = call(arrays)
        return PredictResult(
            model_name=servable.name,
            version=servable.version,
            signature_name=sig.name,
            outputs={name: outputs[name] for name in wanted},
        )


def check_input_names(sig: SignatureInfo, names: Iterable[str]) -> None:
    """Raises INVALID_ARGUMENT for missing or unknown input names (TF Serving's messages)."""
    sent = set(names)
    expected = set(sig.inputs)
    if sent == expected:
        return
    if len(sent) != len(expected):
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
            f"Missing but required: {{{','.join(sorted(expected - sent))}}}.",
        )
    alias = sorted(sent - expected)[0]
    raise ServingError(
        Code.INVALID_ARGUMENT,
        f"input tensor alias not found in signature: {alias}. "
        f"Inputs expected to be in the set {{{','.join(sorted(expected))}}}.",
    )


def check_input(sig: SignatureInfo, name: str, dtype: tf.DType | int, shape: Sequence[int]) -> None:
    """Raises INVALID_ARGUMENT when an input's dtype or shape does not fit the TensorSpec.

    ``dtype``: a DType or its DataType enum (what a TensorProto carries).
    """
    code = dtype if isinstance(dtype, int) else dtype.as_datatype_enum
    if code != sig.input_codes[name]:
        spec = sig.inputs[name]
        try:
            dtype = tf.dtypes.as_dtype(code)
        except TypeError as exc:  # an enum value no DataType has
            raise ServingError(Code.INVALID_ARGUMENT, f"tensor parsing error: {name}") from exc
        index = sorted(sig.inputs).index(name)
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"Expects arg[{index}] to be {spec.dtype.name} but {dtype.name} is provided "
            f"(input '{name}')",
        )
    dims = sig.input_dims[name]
    if dims is not None and (
        len(dims) != len(shape)
        or any(d is not None and d != n for d, n in zip(dims, shape, strict=True))
    ):
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"input '{name}' has shape {list(shape)}, incompatible with the signature's "
            f"{_shape_str(sig.inputs[name].shape)} (rank {len(dims)})",
        )


def check_batch_size(arrays: Mapping[str, np.ndarray], limit: int) -> None:
    """RESOURCE_EXHAUSTED when a request carries more rows than the server allows.

    One huge request would otherwise hold a worker (and its memory) for as long as it takes.
    """
    for name, arr in arrays.items():
        if np.ndim(arr) and arr.shape[0] > limit:
            raise ServingError(
                Code.RESOURCE_EXHAUSTED,
                f"input '{name}' has {arr.shape[0]} rows, more than the server's limit of "
                f"{limit} per request (--max_batch_size_per_request)",
            )


def check_output_filter(sig: SignatureInfo, output_filter: Sequence[str]) -> list[str]:
    """Returns the output names to send back (all when the filter is empty)."""
    if not output_filter:
        return sorted(sig.outputs)
    seen: set[str] = set()
    for alias in output_filter:
        if alias not in sig.outputs:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"output tensor alias not found in signature: {alias} Outputs expected to be "
                f"in the set {{{','.join(sorted(sig.outputs))}}}.",
            )
        if alias in seen:
            raise ServingError(Code.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    return list(output_filter)


def call_signature(sig: SignatureInfo, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs the signature (a Session callable on its tensor names, which converts each input to
    its dtype: :meth:`serving.session_runner.SessionModel.run`); TF errors keep their code."""
    try:
        return dict(sig.fn(arrays))
    except ServingError:
        raise
    except Exception as exc:
        err = from_exception(exc)
        # Python's Session.run prefixes this; TF Serving's Session::Run status does not.
        message = err.message.removeprefix("Graph execution error:").strip()
        raise ServingError(err.code, message) from exc


def _tf_dtype_of(arr: np.ndarray, wanted: tf.DType) -> tf.DType:
    if arr.dtype.kind in ("O", "S", "U"):
        return tf.string
    try:
        return tf.as_dtype(arr.dtype)
    except TypeError:
        return wanted if arr.size == 0 else tf.string


def _shape_str(shape: tf.TensorShape) -> str:
    if shape.rank is None:
        return "<unknown>"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape.as_list()) + "]"
