"""TF Serving's REST JSON <-> numpy, as tensorflow_serving/util/json_tensor.cc converts them.

Requests: row format (``instances``: one object per row) or columnar (``inputs``), values cast
to the signature's dtypes with TF Serving's checks (rectangular lists, integral integers,
``{"b64": ...}`` strings) and its messages. Responses: ``predictions`` rows or ``outputs``
columns; string outputs as UTF-8 text except names ending in ``_bytes`` (``{"b64": ...}``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from serving.errors import Code, ServingError

# No signature input has more than a few dimensions; anything deeper is refused before the
# recursive converters below could overflow Python's stack.
MAX_JSON_DEPTH = 32


def check_json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """INVALID_ARGUMENT when lists/objects nest deeper than ``limit`` (checked iteratively)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                raise ServingError(
                    Code.INVALID_ARGUMENT, f"JSON Parse error: nested deeper than {limit} levels"
                )
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def json_to_array(value: Any, dtype: tf.DType, name: str) -> np.ndarray:
    """Converts a JSON value to an array of the signature's dtype, as TF Serving does."""
    if dtype == tf.string:
        leaves: list[bytes] = []
        structure = _strings_to_bytes(value, name, leaves)
        arr = np.empty(_nested_shape(structure, name), dtype=object)
        flat = arr.reshape(-1)
        if flat.size != len(leaves):
            raise ServingError(Code.INVALID_ARGUMENT, f"Tensor name: {name} is not rectangular")
        flat[:] = leaves
        return arr
    if _contains_dict(value):
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"Tensor name: {name} has an object where a {dtype.name} number is expected",
        )
    if dtype.is_integer or dtype.is_bool:
        _check_integral(value, dtype, name)
    try:
        arr = np.asarray(value, dtype=dtype.as_numpy_dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ServingError(
            Code.INVALID_ARGUMENT,
            f"Tensor name: {name} has values that do not convert to {dtype.name}: {exc}",
        ) from exc
    return arr


def _check_integral(value: Any, dtype: tf.DType, name: str) -> None:
    """Integer inputs take JSON integers only (numpy would truncate 10.7 to 10 silently)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if dtype.is_bool:
            ok = isinstance(item, bool)
        else:
            # 10.0 is an integer written as a float; TF Serving accepts it, but not 10.7.
            ok = (isinstance(item, int) and not isinstance(item, bool)) or (
                isinstance(item, float) and item.is_integer()
            )
        if not ok:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"Tensor name: {name} has a value {json.dumps(item)[:50]} that is not "
                f"{'a boolean' if dtype.is_bool else 'an integer'} ({dtype.name} expected)",
            )


def _strings_to_bytes(value: Any, name: str, leaves: list[bytes]) -> Any:
    if isinstance(value, list):
        return [_strings_to_bytes(v, name, leaves) for v in value]
    if isinstance(value, str):
        leaves.append(value.encode("utf-8"))
        return None
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        try:
            leaves.append(base64.b64decode(value["b64"], validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ServingError(
                Code.INVALID_ARGUMENT, f"Unable to base64 decode (tensor name: {name})"
            ) from exc
        return None
    raise ServingError(
        Code.INVALID_ARGUMENT,
        f"Tensor name: {name} has a {type(value).__name__} value where a string (or "
        '{"b64": ...}) is expected',
    )


def _nested_shape(structure: Any, name: str) -> tuple[int, ...]:
    if not isinstance(structure, list):
        return ()
    if not structure:
        return (0,)
    inner = {_nested_shape(s, name) for s in structure}
    if len(inner) != 1:
        raise ServingError(Code.INVALID_ARGUMENT, f"Tensor name: {name} is not rectangular")
    return (len(structure), *inner.pop())


def _contains_dict(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    if isinstance(value, list):
        return any(_contains_dict(v) for v in value)
    return False


def rows_to_arrays(instances: Any, specs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Row format: stacks per-instance values along a new dim 0, one array per input.

    Inputs the signature declares as scalars (rank 0, e.g. `k`) cannot be stacked; TF Serving
    would feed them as [N] and fail inside the graph. Here every instance must then carry the
    same value and it is passed once as a scalar.
    """
    if not isinstance(instances, list):
        raise ServingError(Code.INVALID_ARGUMENT, "Expecting 'instances' to be an list/array")
    if not instances:
        raise ServingError(Code.INVALID_ARGUMENT, "'instances' is an empty list")
    names = sorted(specs)
    named = all(isinstance(i, dict) and not _is_b64(i) for i in instances)
    if not named:
        if len(names) != 1:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                "Expecting object but got list at item 0 of input list",
            )
        instances = [{names[0]: i} for i in instances]
    keys = set(instances[0])
    for idx, inst in enumerate(instances):
        if set(inst) != keys:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"Failed to process element: {idx} of 'instances' list. JSON object: "
                f"{json.dumps(inst)[:200]} keys do not match the first element's keys "
                f"{sorted(keys)}",
            )
    arrays: dict[str, np.ndarray] = {}
    for key in sorted(keys):
        spec = specs.get(key)
        dtype = spec.dtype if spec is not None else _guess_dtype(instances[0][key])
        values = [inst[key] for inst in instances]
        if spec is not None and spec.shape.rank == 0:
            first = json_to_array(values[0], dtype, key)
            for v in values[1:]:
                if not np.array_equal(json_to_array(v, dtype, key), first):
                    raise ServingError(
                        Code.INVALID_ARGUMENT,
                        f"Tensor name: {key} is a scalar in the signature; every instance "
                        "must carry the same value",
                    )
            arrays[key] = first
        else:
            arrays[key] = json_to_array(values, dtype, key)
    return arrays


def columns_to_arrays(inputs: Any, specs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Columnar format: `{"inputs": {name: value}}`, or a bare value for a single input."""
    names = sorted(specs)
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(names) != 1:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                "'inputs' must be a JSON object keyed by input name for a signature with "
                f"{len(names)} inputs",
            )
        inputs = {names[0]: inputs}
    arrays = {}
    for key, value in inputs.items():
        spec = specs.get(key)
        dtype = spec.dtype if spec is not None else _guess_dtype(value)
        arrays[key] = json_to_array(value, dtype, key)
    return arrays


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _guess_dtype(value: Any) -> tf.DType:
    # Only used for names the signature lacks, which fail validation right after.
    while isinstance(value, list) and value:
        value = value[0]
    return tf.string if isinstance(value, (str, dict)) else tf.float32


def array_to_json(name: str, arr: np.ndarray) -> Any:
    """Converts an output array to JSON values the way TF Serving writes them."""
    if arr.dtype.kind in ("O", "S", "U"):
        as_b64 = name.endswith("_bytes")
        return _map_nested(arr.tolist(), lambda v: _string_to_json(v, as_b64))
    if arr.dtype.kind == "f" and arr.dtype.itemsize <= 4:
        # float32 printed with its shortest round-trip repr (0.3, not 0.30000001192092896).
        return _map_nested(arr.tolist(), lambda v: float(str(np.float32(v))))
    if arr.dtype.kind == "c":
        raise ServingError(Code.UNIMPLEMENTED, f"Tensor {name}: complex outputs not supported")
    return arr.tolist()


def _string_to_json(value: Any, as_b64: bool) -> Any:
    if isinstance(value, str):
        value = value.encode("utf-8")
    if as_b64:
        return {"b64": base64.b64encode(value).decode("ascii")}
    return value.decode("utf-8", errors="replace")


def _map_nested(value: Any, fn: Any) -> Any:
    if isinstance(value, list):
        return [_map_nested(v, fn) for v in value]
    return fn(value)


def outputs_to_rows(outputs: Mapping[str, np.ndarray]) -> Any:
    """`predictions`: one entry per row; a bare value per row when there is one output."""
    batch: int | None = None
    for name, arr in outputs.items():
        if np.ndim(arr) == 0:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"Tensor name: {name} has no shape information; row format needs a batch "
                "dimension (use the columnar 'inputs' format)",
            )
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"Tensor name: {name} has inconsistent batch size: {arr.shape[0]} "
                f"expecting: {batch}",
            )
    columns = {name: array_to_json(name, np.asarray(arr)) for name, arr in outputs.items()}
    if len(columns) == 1:
        return next(iter(columns.values()))
    return [{name: col[i] for name, col in columns.items()} for i in range(batch or 0)]


def outputs_to_columns(outputs: Mapping[str, np.ndarray]) -> Any:
    """`outputs`: a bare value for one output, else an object keyed by output name."""
    columns = {name: array_to_json(name, np.asarray(arr)) for name, arr in outputs.items()}
    if len(columns) == 1:
        return next(iter(columns.values()))
    return columns
