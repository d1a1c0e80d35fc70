"""A local model server that speaks TF Serving's gRPC and REST APIs.

    python -m serving.server --model_name NAME --model_base_path DIR \
        --port 8500 --rest_api_port 8501

or `--model_config_file models.config` (ModelServerConfig text proto). Flags keep the names,
spelling and meanings of `tensorflow_model_server` where they overlap. Supported:
PredictionService/Predict, PredictionService/GetModelMetadata (signature_def),
ModelService/GetModelStatus, the REST endpoints over them and, with `--monitoring_config_file`,
Prometheus metrics at /monitoring/prometheus/metrics; everything else answers UNIMPLEMENTED.
Versions run through the session-based SavedModel loader, as in TF Serving
(serving/session_runner.py). Unlike TF Serving, request size and rows per request are bounded by
default (`--max_request_bytes`, `--max_batch_size_per_request`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from serving.batching import Batcher, BatchingOptions, parse_batching_parameters
from serving.errors import Code, JsonFormatter, ServingError, from_exception, log_event
from serving.model_manager import (
    LoaderOptions,
    ModelConfig,
    ServableManager,
    VersionPolicy,
    parse_model_config_text,
)

logger = logging.getLogger("serving.server")

_INT32_MAX = 2**31 - 1
# Bounded by default, unlike TF Serving (2 GiB gRPC messages, unbounded REST bodies and rows):
# one oversized request must not be able to take the server's memory or a worker for minutes.
DEFAULT_MAX_REQUEST_BYTES = 16 << 20
DEFAULT_MAX_BATCH_SIZE_PER_REQUEST = 1024


@dataclasses.dataclass
class ServerConfig:
    """Everything the server needs; built from flags or directly in tests."""

    models: list[ModelConfig]
    port: int = 8500
    rest_api_port: int = 0
    bind_address: str = "127.0.0.1"
    file_system_poll_wait_seconds: float = 1.0
    grpc_max_threads: int = dataclasses.field(default_factory=lambda: 4 * (os.cpu_count() or 1))
    rest_api_num_threads: int = dataclasses.field(default_factory=lambda: 4 * (os.cpu_count() or 1))
    grpc_channel_arguments: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_message_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_batch_size_per_request: int = DEFAULT_MAX_BATCH_SIZE_PER_REQUEST
    rest_api_timeout_in_ms: int = 30_000
    rest_header_timeout_seconds: float = 30.0
    rest_body_timeout_seconds: float = 60.0
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: float = 0.0
    prometheus_path: str | None = None
    batching: BatchingOptions | None = None
    loader: LoaderOptions = dataclasses.field(default_factory=LoaderOptions)
    shutdown_grace_seconds: float = 30.0
    intra_op_parallelism: int = 0  # 0: TensorFlow's default
    inter_op_parallelism: int = 0


class ModelServer:
    """Owns the ServableManager, the gRPC server and the REST server; start()/stop()."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.manager = ServableManager(config.models, options=config.loader)
        self.batcher = Batcher(config.batching) if config.batching else None
        self._grpc: grpc.Server | None = None
        self._rest: Any = None
        self.grpc_port = 0
        self.rest_port = 0
        self._stopped = threading.Event()
        self._config_thread: threading.Thread | None = None

    def _poll_model_config(self) -> None:
        """Re-reads --model_config_file every --model_config_file_poll_wait_seconds."""
        interval = self.config.model_config_file_poll_wait_seconds
        last = None
        while not self._stopped.wait(interval):
            try:
                text = _read_text(self.config.model_config_file)
                if text == last:
                    continue
                models = parse_model_config_text(text)
                if not models:
                    raise ValueError("the model config lists no models")
            except (OSError, ValueError) as exc:
                log_event(logger, logging.ERROR, "model_config_reload_failure", error=str(exc))
                continue
            if last is not None:
                self.manager.update_configs(models)
                self.manager.poll_once()
                log_event(logger, logging.INFO, "model_config_reloaded",
                          models=[m.name for m in models])  # fmt: skip
            last = text

    def start(self) -> None:
        """Loads the initial versions, then serves (TF Serving waits for its models too)."""
        from serving.predictor import Predictor
        from serving.rest import RestApi, RestServer

        self.manager.poll_once()
        if self.config.file_system_poll_wait_seconds > 0:
            self.manager.start_polling(self.config.file_system_poll_wait_seconds)
        predictor = Predictor(
            self.manager, self.batcher, max_batch_size=self.config.max_batch_size_per_request
        )
        if self.config.model_config_file and self.config.model_config_file_poll_wait_seconds > 0:
            self._config_thread = threading.Thread(
                target=self._poll_model_config, name="model-config-poller", daemon=True
            )
            self._config_thread.start()

        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *self.config.grpc_channel_arguments.items(),
        ]
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self.config.grpc_max_threads, thread_name_prefix="grpc"
            ),
            options=options,
        )
        _add_servicers(self._grpc, predictor)
        self.grpc_port = self._grpc.add_insecure_port(
            f"{self.config.bind_address}:{self.config.port}"
        )
        if self.grpc_port == 0:
            raise OSError(f"could not bind gRPC port {self.config.port}")
        self._grpc.start()
        if self.config.rest_api_port > 0:
            api = RestApi(predictor, max_body_bytes=self.config.max_message_bytes)
            self._rest = RestServer(
                api,
                self.config.bind_address,
                self.config.rest_api_port,
                self.config.rest_api_num_threads,
                request_timeout_s=self.config.rest_api_timeout_in_ms / 1000,
                header_timeout_s=self.config.rest_header_timeout_seconds,
                body_timeout_s=self.config.rest_body_timeout_seconds,
                metrics=predictor.metrics,
                metrics_path=self.config.prometheus_path,
            )
            self._rest.start()
            self.rest_port = self._rest.port
        log_event(
            logger,
            logging.INFO,
            "server_start",
            grpc_port=self.grpc_port,
            rest_port=self.rest_port,
            models={m.name: self.manager.served_versions(m.name) for m in self.config.models},
            batching=self.batcher is not None,
            pid=os.getpid(),
        )

    def stop(self, grace_s: float | None = None) -> None:
        """Stops accepting, lets in-flight requests finish within the grace, unloads."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.shutdown_grace_seconds if grace_s is None else grace_s
        log_event(logger, logging.INFO, "server_stopping", grace_s=grace)
        done = self._grpc.stop(grace) if self._grpc else None  # refuses new RPCs at once
        if self.batcher is not None:
            self.batcher.drain()  # queued requests need not wait out batch_timeout_micros
        if self._rest is not None:
            self._rest.stop(grace)
        if done is not None:
            done.wait(grace)
        if self.batcher is not None:
            self.batcher.stop()
            log_event(
                logger,
                logging.INFO,
                "batching_stats",
                batches=self.batcher.num_batches,
                rows=self.batcher.num_rows,
                max_rows=self.batcher.max_rows,
            )
        self.manager.stop()
        log_event(logger, logging.INFO, "server_stopped")


# -- gRPC servicers ---------------------------------------------------------------------------


def _add_servicers(server: grpc.Server, predictor: Any) -> None:
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _PredictionServicer(predictor), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        _ModelServicer(predictor.manager), server
    )


def _abort(context: grpc.ServicerContext, method: str, exc: BaseException, model: str) -> None:
    err = from_exception(exc)
    log_event(
        logger,
        logging.WARNING,
        "request_error",
        api="grpc",
        method=method,
        model=model,
        code=err.code.name,
        error=err.message[:1000],
    )
    context.abort(grpc.StatusCode[err.code.name], err.message)


# TensorProto <-> numpy for what the exports exchange (strings, float32, int32, int64), without
# tf.make_ndarray / tf.make_tensor_proto's per-element checks: about 0.7 ms of a known-text
# request on 2 cores went there. Anything else takes TensorFlow's own converters.
_FAST_DTYPES = {1: np.dtype("<f4"), 3: np.dtype("<i4"), 9: np.dtype("<i8")}  # DT_FLOAT, ...
_DT_STRING = 7


def tensor_to_array(proto: Any) -> np.ndarray:
    """A request's TensorProto -> numpy (bytes objects for strings), as tf.make_ndarray."""
    shape = [d.size for d in proto.tensor_shape.dim]
    count = int(np.prod(shape)) if shape else 1
    if proto.dtype == _DT_STRING and len(proto.string_val) == count:
        return np.array(list(proto.string_val), dtype=object).reshape(shape)
    dtype = _FAST_DTYPES.get(proto.dtype)
    if dtype is not None and len(proto.tensor_content) == count * dtype.itemsize and count:
        array = np.frombuffer(proto.tensor_content, dtype)
        return array.astype(dtype.newbyteorder("=")).reshape(shape)
    import tensorflow as tf

    return tf.make_ndarray(proto)


def array_to_tensor(value: Any) -> Any:
    """numpy -> TensorProto, the same message tf.make_tensor_proto builds for these dtypes."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    array = np.asarray(value)
    proto = tensor_pb2.TensorProto()
    try:
        if array.dtype == object and all(isinstance(v, bytes) for v in array.flat):
            proto.dtype = _DT_STRING
            proto.string_val.extend(array.ravel().tolist())
        else:
            code = next(
                (c for c, d in _FAST_DTYPES.items() if array.dtype == d.newbyteorder("=")), None
            )
            if code is None or array.dtype.byteorder == ">" or array.size < 2:
                return tf.make_tensor_proto(array)
            proto.dtype = code
            proto.tensor_content = np.ascontiguousarray(array).astype(_FAST_DTYPES[code]).tobytes()
    except TypeError:
        return tf.make_tensor_proto(array)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def _spec_version(spec: Any) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


def _unimplemented(name: str) -> Any:
    def method(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not supported by this server")

    method.__name__ = name
    return method


class _PredictionServicer:
    """tensorflow.serving.PredictionService."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        from serving.predictor import check_input, check_input_names

        spec = request.model_spec
        start = time.monotonic()
        code = Code.OK
        try:
            version, label = _spec_version(spec)
            servable, sig = self.predictor.resolve(spec.name, version, label, spec.signature_name)
            check_input_names(sig, request.inputs.keys())
            arrays = {}
            for name, proto in request.inputs.items():
                if not proto.dtype:
                    raise ServingError(Code.INVALID_ARGUMENT, f"tensor parsing error: {name}")
                dtype = tf.dtypes.as_dtype(proto.dtype)
                shape = [d.size for d in proto.tensor_shape.dim]
                check_input(sig, name, dtype, shape)
                try:
                    arrays[name] = tensor_to_array(proto)
                except Exception as exc:
                    raise ServingError(
                        Code.INVALID_ARGUMENT, f"tensor parsing error: {name}"
                    ) from exc
            result = self.predictor.run(servable, sig, arrays, list(request.output_filter))
            response = predict_pb2.PredictResponse()
            response.model_spec.name = result.model_name
            response.model_spec.version.value = result.version
            response.model_spec.signature_name = result.signature_name
            for name, value in result.outputs.items():
                response.outputs[name].CopyFrom(array_to_tensor(value))
            return response
        except Exception as exc:
            code = from_exception(exc).code
            _abort(context, "Predict", exc, spec.name)
        finally:
            self.predictor.metrics.observe(
                "GRPC", spec.name, spec.signature_name[:100], code.name, time.monotonic() - start
            )

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        from tensorflow_serving.apis import get_model_metadata_pb2

        try:
            if not request.HasField("model_spec"):
                raise ServingError(Code.INVALID_ARGUMENT, "Missing ModelSpec")
            if not request.metadata_field:
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    "GetModelMetadataRequest must specify at least one metadata_field",
                )
            for field in request.metadata_field:
                if field != "signature_def":
                    raise ServingError(
                        Code.INVALID_ARGUMENT, f"Metadata field {field} is not supported"
                    )
            version, label = _spec_version(request.model_spec)
            servable = self.predictor.manager.get(request.model_spec.name, version, label)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].Pack(servable.signature_def_map)
            return response
        except Exception as exc:
            _abort(context, "GetModelMetadata", exc, request.model_spec.name)

    Classify = _unimplemented("Classify")
    Regress = _unimplemented("Regress")
    MultiInference = _unimplemented("MultiInference")


class _ModelServicer:
    """tensorflow.serving.ModelService."""

    def __init__(self, manager: ServableManager) -> None:
        self.manager = manager

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        from tensorflow_serving.apis import get_model_status_pb2

        try:
            if not request.HasField("model_spec"):
                raise ServingError(Code.INVALID_ARGUMENT, "Missing ModelSpec")
            version, label = _spec_version(request.model_spec)
            response = get_model_status_pb2.GetModelStatusResponse()
            for ver, state in self.manager.status(request.model_spec.name, version, label):
                entry = response.model_version_status.add()
                entry.version = ver
                entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state.state)
                entry.status.error_code = int(state.error_code)
                entry.status.error_message = state.error_message
            return response
        except Exception as exc:
            _abort(context, "GetModelStatus", exc, request.model_spec.name)

    HandleReloadConfigRequest = _unimplemented("HandleReloadConfigRequest")


# -- flags ------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    """tensorflow_model_server's flags (the subset this server implements)."""
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(
        prog="python -m serving.server",
        description="Local TF Serving-compatible model server (gRPC + REST).",
    )
    p.add_argument("--port", type=int, default=8500, help="gRPC port (0: pick a free one)")
    p.add_argument(
        "--rest_api_port", type=int, default=0, help="REST port (0: REST disabled, as TF Serving)"
    )
    p.add_argument(
        "--bind_address",
        default="127.0.0.1",
        help="interface to bind (not a TF Serving flag; TF Serving binds all interfaces)",
    )
    p.add_argument("--model_name", default="default")
    p.add_argument("--model_base_path", default="")
    p.add_argument("--model_config_file", default="")
    p.add_argument(
        "--model_config_file_poll_wait_seconds",
        type=float,
        default=0.0,
        help="re-read --model_config_file this often (0: read once, as TF Serving)",
    )
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0)
    p.add_argument("--max_num_load_retries", type=int, default=5)
    p.add_argument("--load_retry_interval_micros", type=int, default=60_000_000)
    p.add_argument("--saved_model_tags", default="serve")
    p.add_argument(
        "--enable_batching", type=_parse_bool, nargs="?", const=True, default=False,
        metavar="true|false",
    )  # fmt: skip
    p.add_argument("--batching_parameters_file", default="")
    p.add_argument(
        "--monitoring_config_file",
        default="",
        help="MonitoringConfig text proto; prometheus_config { enable: true } serves "
        "/monitoring/prometheus/metrics on the REST port",
    )
    p.add_argument("--rest_api_num_threads", type=int, default=4 * cpus)
    p.add_argument("--rest_api_timeout_in_ms", type=int, default=30_000)
    p.add_argument("--grpc_max_threads", type=int, default=4 * cpus)
    p.add_argument(
        "--grpc_channel_arguments",
        default="",
        help="comma-separated key=value gRPC server args, e.g. "
        "grpc.max_receive_message_length=1048576 (also caps REST bodies)",
    )
    p.add_argument(
        "--max_request_bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest gRPC message / REST body (not a TF Serving flag; TF Serving allows 2 GiB)",
    )
    p.add_argument(
        "--max_batch_size_per_request",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE_PER_REQUEST,
        help="most rows (dim 0) one request may carry; 0: unbounded (not a TF Serving flag)",
    )
    p.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0)
    p.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0)
    p.add_argument(
        "--shutdown_grace_seconds",
        type=float,
        default=30.0,
        help="how long SIGTERM waits for in-flight requests (not a TF Serving flag)",
    )
    return p


def config_from_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """Parses and validates flags; invalid ones exit with status 2 and a clear message."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    for flag in ("port", "rest_api_port"):
        value = getattr(args, flag)
        if not 0 <= value <= 65535:
            parser.error(f"--{flag} must be in [0, 65535], got {value}")
    if args.port and args.port == args.rest_api_port:
        parser.error("--port and --rest_api_port must differ")
    for flag in ("rest_api_num_threads", "grpc_max_threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    if args.file_system_poll_wait_seconds < 0:
        parser.error("--file_system_poll_wait_seconds must be >= 0 (0: poll once at startup)")
    if args.max_num_load_retries < 0 or args.load_retry_interval_micros < 0:
        parser.error("--max_num_load_retries and --load_retry_interval_micros must be >= 0")
    if args.shutdown_grace_seconds < 0:
        parser.error("--shutdown_grace_seconds must be >= 0")
    if args.model_config_file and args.model_base_path:
        parser.error("use either --model_config_file or --model_name/--model_base_path, not both")
    if args.model_config_file_poll_wait_seconds < 0:
        parser.error("--model_config_file_poll_wait_seconds must be >= 0")
    if args.rest_api_timeout_in_ms < 1:
        parser.error("--rest_api_timeout_in_ms must be >= 1")
    if args.max_request_bytes < 1 or args.max_batch_size_per_request < 0:
        parser.error("--max_request_bytes must be >= 1 and --max_batch_size_per_request >= 0")
    prometheus_path = None
    if args.monitoring_config_file:
        from serving.metrics import parse_monitoring_config

        try:
            prometheus_path = parse_monitoring_config(_read_text(args.monitoring_config_file))
        except (OSError, ValueError) as exc:
            parser.error(f"--monitoring_config_file: {exc}")
    if args.model_config_file:
        try:
            models = parse_model_config_text(_read_text(args.model_config_file))
        except (OSError, ValueError) as exc:
            parser.error(f"--model_config_file: {exc}")
        if not models:
            parser.error("--model_config_file lists no models")
    elif args.model_base_path:
        if not args.model_name:
            parser.error("--model_name must not be empty")
        models = [
            ModelConfig(
                name=args.model_name,
                base_path=args.model_base_path
                if "://" in args.model_base_path
                else os.path.abspath(args.model_base_path),
                policy=VersionPolicy(),
            )
        ]
    else:
        parser.error("one of --model_base_path or --model_config_file is required")
    batching = None
    if args.batching_parameters_file and not args.enable_batching:
        parser.error("--batching_parameters_file needs --enable_batching")
    if args.enable_batching:
        batching = BatchingOptions()
        if args.batching_parameters_file:
            try:
                batching = parse_batching_parameters(_read_text(args.batching_parameters_file))
            except (OSError, ValueError) as exc:
                parser.error(f"--batching_parameters_file: {exc}")
    try:
        channel_args = _parse_channel_arguments(args.grpc_channel_arguments)
    except ValueError as exc:
        parser.error(f"--grpc_channel_arguments: {exc}")
    max_bytes = int(channel_args.get("grpc.max_receive_message_length", args.max_request_bytes))
    if max_bytes < 0:  # gRPC's "unlimited"
        max_bytes = _INT32_MAX
    tags = tuple(t.strip() for t in args.saved_model_tags.split(",") if t.strip())
    return ServerConfig(
        models=models,
        port=args.port,
        rest_api_port=args.rest_api_port,
        bind_address=args.bind_address,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        grpc_max_threads=args.grpc_max_threads,
        rest_api_num_threads=args.rest_api_num_threads,
        grpc_channel_arguments=channel_args,
        max_message_bytes=max_bytes,
        max_batch_size_per_request=args.max_batch_size_per_request,
        rest_api_timeout_in_ms=args.rest_api_timeout_in_ms,
        model_config_file=args.model_config_file,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        prometheus_path=prometheus_path,
        batching=batching,
        loader=LoaderOptions(
            saved_model_tags=tags or ("serve",),
            max_num_load_retries=args.max_num_load_retries,
            load_retry_interval_micros=args.load_retry_interval_micros,
            intra_op_parallelism=args.tensorflow_intra_op_parallelism,
            inter_op_parallelism=args.tensorflow_inter_op_parallelism,
        ),
        shutdown_grace_seconds=args.shutdown_grace_seconds,
        intra_op_parallelism=args.tensorflow_intra_op_parallelism,
        inter_op_parallelism=args.tensorflow_inter_op_parallelism,
    )


def _parse_bool(text: str) -> bool:
    """TF Serving's (absl) spelling of booleans: true/false, 1/0, yes/no."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "t", "y"):
        return True
    if value in ("false", "0", "no", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _read_text(path: str) -> str:
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path) as f:
            return f.read()
    except tf.errors.OpError as exc:
        raise OSError(exc.message) from exc


def _parse_channel_arguments(text: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            result[key.strip()] = int(value)
        except ValueError:
            result[key.strip()] = value.strip()
    return result


def configure_logging(level: int = logging.INFO) -> None:
    """One JSON object per line on stderr for everything under the `serving` logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("serving")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the server until SIGTERM/SIGINT, then drains and exits 0."""
    config = config_from_args(argv)
    configure_logging()
    if config.batching and (
        config.batching.allowed_batch_sizes or config.batching.pad_variable_length_inputs
    ):
        log_event(
            logger,
            logging.WARNING,
            "batching_option_ignored",
            detail="allowed_batch_sizes / pad_variable_length_inputs are not implemented; "
            "requests whose trailing shapes differ are batched separately",
        )
    import tensorflow as tf

    if config.intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(config.intra_op_parallelism)
    if config.inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(config.inter_op_parallelism)

    server = ModelServer(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log_event(logger, logging.INFO, "signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except (OSError, RuntimeError) as exc:  # grpc reports a taken port as RuntimeError
        log_event(logger, logging.ERROR, "startup_failure", error=str(exc))
        server.stop(0)
        return 1
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
