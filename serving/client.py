"""A small typed gRPC client for TF Serving and the local server alike.

    client = ServingClient("localhost:8500", "recs")
    client.retrieve({"user_id": ["42"], "query_text": ["space opera"]}, k=5)

Inputs are read from the model's metadata once, so `retrieve`/`rank` fill exactly the inputs
the signature declares (with neutral defaults for optional context such as `history`) and
cast values to the declared dtypes. Deadlines on every call; retries with exponential backoff
on UNAVAILABLE only (the server restarting or a version swap on a proxy), never on errors
that would fail again.

CLI: python -m serving.client --server HOST:PORT --model-name NAME --input user_id=42 ...
or --query-json FILE (one query object or a list; a row's ``exclude_item_ids`` is excluded from
that row's top-k, as ``python -m trainer.queries`` writes them for users of prepared data).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from common import contract
from common.cli import UsageError, run

T = TypeVar("T")

_NUMPY_DTYPES: dict[str, Any] = {
    "DT_FLOAT": np.float32,
    "DT_DOUBLE": np.float64,
    "DT_INT32": np.int32,
    "DT_INT64": np.int64,
    "DT_INT16": np.int16,
    "DT_INT8": np.int8,
    "DT_UINT8": np.uint8,
    "DT_BOOL": np.bool_,
    "DT_STRING": object,
    "DT_HALF": np.float16,
}


class ServingClient:
    """Typed wrapper over TF Serving's PredictionService and ModelService stubs."""

    def __init__(
        self,
        target: str,
        model_name: str,
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.target = target
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._metadata: dict[str, dict[str, Any]] | None = None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw calls ----------------------------------------------------------------------------

    def predict(
        self,
        inputs: Mapping[str, Any],
        signature_name: str = contract.RETRIEVE,
        version: int | None = None,
        version_label: str | None = None,
        output_filter: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """Calls Predict and returns the outputs as numpy arrays (strings stay bytes)."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._fill_spec(request.model_spec, version, version_label)
        request.model_spec.signature_name = signature_name
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        request.output_filter.extend(output_filter)
        response = self._call(self._predict_stub.Predict, request)
        return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}

    def metadata(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """Signature name -> {"inputs"/"outputs": {name: {"dtype", "shape"}}, "method_name"}.

        Shapes use -1 for unknown dimensions, None for unknown rank; internal signatures
        (`__saved_model_init_op`) are left out. Cached after the first call.
        """
        if self._metadata is not None and not refresh:
            return self._metadata
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = self.model_name
        request.metadata_field.append("signature_def")
        response = self._call(self._predict_stub.GetModelMetadata, request)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig_map)
        result: dict[str, dict[str, Any]] = {}
        for name, sig in sig_map.signature_def.items():
            if name.startswith("__"):
                continue
            result[name] = {
                "inputs": {k: _tensor_info(v) for k, v in sig.inputs.items()},
                "outputs": {k: _tensor_info(v) for k, v in sig.outputs.items()},
                "method_name": sig.method_name,
            }
        self._metadata = result
        return result

    def status(self) -> list[dict[str, Any]]:
        """[{version, state, error_code, error_message}] for every version the server knows."""
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        response = self._call(self._model_stub.GetModelStatus, request)
        states = get_model_status_pb2.ModelVersionStatus.State
        return [
            {
                "version": s.version,
                "state": states.Name(s.state),
                "error_code": s.status.error_code,
                "error_message": s.status.error_message,
            }
            for s in response.model_version_status
        ]

    # -- recommender helpers ------------------------------------------------------------------

    def retrieve(
        self,
        queries: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        k: int | Sequence[int] = 10,
        exclude_item_ids: Sequence[Sequence[str]] | None = None,
        diversity: float | Sequence[float] | None = None,
        *,
        signature_name: str = contract.RETRIEVE,
        version: int | None = None,
        version_label: str | None = None,
    ) -> dict[str, Any]:
        """Top-k items per query: {"item_ids", "scores", "titles", ...} with str, not bytes.

        ``k`` and ``diversity`` are one value for every query or one per query. Outputs are
        ``[B, max(k)]``; a row with a smaller ``k`` is padded with ``""`` / ``-inf``.
        """
        columns = _to_columns(queries)
        batch = _batch_size(columns)
        ks = np.broadcast_to(np.asarray(k, dtype=np.int32), [batch])
        extras: dict[str, Any] = {contract.K: ks}
        if exclude_item_ids is not None:
            if len(exclude_item_ids) != batch:
                raise ValueError(f"exclude_item_ids has {len(exclude_item_ids)} rows, not {batch}")
            extras[contract.EXCLUDE_ITEM_IDS] = _pad_strings(exclude_item_ids)
        if diversity is not None:
            extras[contract.DIVERSITY] = np.broadcast_to(np.asarray(diversity, np.float32), [batch])
        inputs = self.build_inputs(signature_name, columns, extras, batch)
        outputs = self.predict(inputs, signature_name, version, version_label)
        # Server-side batching may merge this request with one asking a larger k; the extra
        # columns are padding for these rows.
        width = int(ks.max()) if batch else 0
        return {
            name: _decode(value[:, :width] if name in _TOP_K_OUTPUTS else value)
            for name, value in outputs.items()
        }

    def rank(
        self,
        queries: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        candidate_item_ids: Sequence[Sequence[str]],
        *,
        signature_name: str = contract.RANK,
        version: int | None = None,
        version_label: str | None = None,
    ) -> np.ndarray:
        """Scores [B, M] of each query's candidates (the signature's float output)."""
        columns = _to_columns(queries)
        batch = _batch_size(columns)
        if len(candidate_item_ids) != batch:
            raise ValueError(f"candidate_item_ids has {len(candidate_item_ids)} rows, not {batch}")
        extras = {contract.CANDIDATE_ITEM_IDS: _pad_strings(candidate_item_ids)}
        inputs = self.build_inputs(signature_name, columns, extras, batch)
        outputs = self.predict(inputs, signature_name, version, version_label)
        if _RATINGS in outputs:
            return outputs[_RATINGS]
        floats = [v for v in outputs.values() if np.issubdtype(v.dtype, np.floating)]
        if len(floats) != 1:
            raise ValueError(f"cannot tell the score output among {sorted(outputs)}")
        return floats[0]

    # -- internals ----------------------------------------------------------------------------

    def build_inputs(
        self, signature_name: str, columns: dict[str, Any], extras: dict[str, Any], batch: int
    ) -> dict[str, np.ndarray]:
        """Fills exactly the inputs the signature declares, cast to their dtypes."""
        signatures = self.metadata()
        if signature_name not in signatures:
            raise ValueError(
                f"model {self.model_name} has no signature {signature_name!r}; "
                f"it has {sorted(signatures)}"
            )
        declared = signatures[signature_name]["inputs"]
        inputs: dict[str, np.ndarray] = {}
        for name, info in declared.items():
            if name in columns:
                value = columns[name]
            elif name in extras:
                value = extras[name]
            else:
                value = _default_value(info, batch)
            if info["shape"] is not None and not info["shape"] and np.ndim(value) == 1:
                # An export from before per-query k/diversity: one value for the request.
                distinct = np.unique(np.asarray(value))
                if len(distinct) != 1:
                    raise ValueError(f"model {self.model_name}: input {name!r} is one value "
                                     f"for the whole request, got {distinct.tolist()}")  # fmt: skip
                value = distinct[0]
            inputs[name] = _cast(value, info, name)
        return inputs

    def _fill_spec(self, spec: Any, version: int | None, version_label: str | None) -> None:
        spec.name = self.model_name
        if version is not None and version_label is not None:
            raise ValueError("pass version or version_label, not both")
        if version is not None:
            spec.version.value = version
        elif version_label is not None:
            spec.version_label = version_label

    def _call(self, method: Callable[..., T], request: Any) -> T:
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
                    raise
                time.sleep(self.backoff_s * (2**attempt))
                attempt += 1


def _tensor_info(info: Any) -> dict[str, Any]:
    from tensorflow.core.framework import types_pb2

    shape = None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
    return {"dtype": types_pb2.DataType.Name(info.dtype), "shape": shape, "name": info.name}


def _to_columns(queries: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if isinstance(queries, Mapping):
        if any(np.ndim(v) == 0 for v in queries.values()):
            return _to_columns([queries])  # one query given as {name: scalar or id list}
        return dict(queries)
    rows = list(queries)
    if not rows:
        raise ValueError("no queries")
    names = set().union(*(r.keys() for r in rows))
    columns: dict[str, Any] = {}
    for name in names:
        values = [r.get(name) for r in rows]
        if any(isinstance(v, (list, tuple, np.ndarray)) for v in values):
            columns[name] = _pad_strings([[] if v is None else list(v) for v in values])
        else:
            columns[name] = ["" if v is None else v for v in values]
    return columns


def _batch_size(columns: Mapping[str, Any]) -> int:
    sizes = {len(v) for v in columns.values() if np.ndim(v) >= 1}
    if len(sizes) != 1:
        raise ValueError(f"query columns must all have the same length, got {sorted(sizes)}")
    return sizes.pop()


def _pad_strings(rows: Sequence[Sequence[Any]]) -> np.ndarray:
    """Ragged id lists -> [B, max(len, 1)] padded with "" (the export's padding id)."""
    width = max([len(r) for r in rows] + [1])
    out = np.full((len(rows), width), b"", dtype=object)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            out[i, j] = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return out


_TOP_K_OUTPUTS = tuple(contract.SIGNATURES[contract.RETRIEVE].outputs)
_RATINGS = next(iter(contract.SIGNATURES[contract.RANK].outputs))


def _default_value(info: Mapping[str, Any], batch: int) -> Any:
    shape = info["shape"]
    rank = 1 if shape is None else len(shape)
    is_string = info["dtype"] == "DT_STRING"
    fill: Any = b"" if is_string else 0
    if rank == 0:
        return fill
    dims = [batch] + [1] * (rank - 1)
    return np.full(dims, fill, dtype=object if is_string else np.float64)


def _cast(value: Any, info: Mapping[str, Any], name: str) -> np.ndarray:
    dtype = _NUMPY_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"input {name!r}: unsupported dtype {info['dtype']}")
    if dtype is object:
        arr = np.asarray(value, dtype=object)
        flat = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in arr.reshape(-1)]
        out = np.empty(arr.shape, dtype=object)
        out.reshape(-1)[:] = flat if flat else []
        return out
    return np.asarray(value).astype(dtype)


def _decode(value: np.ndarray) -> np.ndarray:
    if value.dtype == object:
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(value)
    return value


# -- CLI --------------------------------------------------------------------------------------


def _parse_cli_inputs(items: Sequence[str]) -> dict[str, Any]:
    """`name=value` -> one query; a comma in value makes a list (history=a,b,c)."""
    query: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--input expects name=value, got {item!r}")
        query[name] = value.split(",") if "," in value else value
    return query


def format_table(result: Mapping[str, Any], max_rows: int | None = None) -> str:
    """Readable table: one block per query with rank, item_id, title, score."""
    ids = result.get("item_ids")
    scores = result.get("scores")
    titles = result.get("titles")
    if ids is None or scores is None:
        return json.dumps({k: np.asarray(v).tolist() for k, v in result.items()}, indent=2)
    lines: list[str] = []
    for q in range(len(ids)):
        if len(ids) > 1:
            lines.append(f"query {q}")
        lines.append(f"{'rank':>4}  {'item_id':<16} {'title':<48} {'score':>10}")
        count = len(ids[q]) if max_rows is None else min(max_rows, len(ids[q]))
        for r in range(count):
            title = str(titles[q][r]) if titles is not None else ""
            lines.append(f"{r + 1:>4}  {ids[q][r]!s:<16} {title[:48]:<48} {scores[q][r]:>10.4f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__.split("\n")[0])
    p.add_argument("--server", required=True, help="HOST:PORT of the gRPC endpoint")
    p.add_argument(
        "--model-name",
        "--model",
        dest="model",
        required=True,
        help="model name on the server (--model: the older spelling, still accepted)",
    )
    p.add_argument("--signature", default=contract.RETRIEVE)
    p.add_argument("--input", action="append", default=[], help="name=value (repeatable)")
    p.add_argument(
        "--query-json",
        help="file with one query object or a list of them; a row's exclude_item_ids (a list) "
        "is excluded from its top-k (python -m trainer.queries writes such rows)",
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--exclude", default="", help="comma-separated item ids to exclude (all rows)")
    p.add_argument("--diversity", type=float, default=None)
    p.add_argument("--candidates", default="", help="comma-separated ids (rank signature)")
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--version-label", default=None)
    p.add_argument("--timeout", type=float, default=10.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: query a server and print a table."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        queries = _read_queries(args)
        exclude_rows = _exclude_rows(queries, args.exclude)
        return _run(args, queries, exclude_rows)

    return run(body, expected=(OSError,))


def _read_queries(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.query_json:
        with open(args.query_json) as f:
            try:
                loaded = json.load(f)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{args.query_json}: not JSON ({exc})") from exc
        queries = loaded if isinstance(loaded, list) else [loaded]
    else:
        try:
            queries = [_parse_cli_inputs(args.input)]
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    if not queries or not all(isinstance(q, dict) for q in queries):
        raise UsageError("queries must be JSON objects")
    return queries


def _exclude_rows(queries: list[dict[str, Any]], exclude: str) -> list[list[str]] | None:
    """``--exclude`` for every row, else each row's own ``exclude_item_ids`` (taken out of it)."""
    own = [q.pop(contract.EXCLUDE_ITEM_IDS, None) for q in queries]
    if exclude:
        return [exclude.split(",")] * len(queries)
    if all(row is None for row in own):
        return None
    for row in own:
        if row is not None and not isinstance(row, list):
            raise UsageError(f"{contract.EXCLUDE_ITEM_IDS} must be a list of item ids, got {row!r}")
    return [row or [] for row in own]


def _run(
    args: argparse.Namespace, queries: list[dict[str, Any]], exclude: list[list[str]] | None
) -> int:
    with ServingClient(args.server, args.model, timeout_s=args.timeout) as client:
        try:
            if args.candidates:
                cands = [args.candidates.split(",")] * len(queries)
                ratings = client.rank(queries, cands, signature_name=args.signature)
                result = {
                    "item_ids": np.asarray(cands, dtype=object),
                    "scores": ratings,
                }
                order = np.argsort(-ratings, axis=1)
                result = {k: np.take_along_axis(v, order, axis=1) for k, v in result.items()}
            else:
                result = client.retrieve(
                    queries,
                    k=args.k,
                    exclude_item_ids=exclude,
                    diversity=args.diversity,
                    signature_name=args.signature,
                    version=args.version,
                    version_label=args.version_label,
                )
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
