"""The server's flags: ``tensorflow_model_server``'s names and meanings, parsed into a ServerConfig.

Flags keep the names, spelling and meanings of ``tensorflow_model_server`` where they overlap;
a few are this server's own (``--bind_address``, ``--max_request_bytes``,
``--max_batch_size_per_request``, ``--shutdown_grace_seconds``), and their help says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Any, NoReturn

from common.cli import UsageError
from serving.batching import BatchingOptions, parse_batching_parameters
from serving.model_config import ModelConfig, VersionPolicy, parse_model_config_text
from serving.servable import LoaderOptions

_INT32_MAX = 2**31 - 1
# Bounded by default, unlike TF Serving (2 GiB gRPC messages, unbounded REST bodies and rows):
# one oversized request must not be able to take the server's memory or a worker for minutes.
DEFAULT_MAX_REQUEST_BYTES = 16 << 20
DEFAULT_MAX_BATCH_SIZE_PER_REQUEST = 1024


class FlagError(UsageError):
    """A flag value the server cannot start with."""


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
    """Parses and validates flags.

    Raises:
      FlagError: a flag value that cannot be used (``main`` prints it, exit status 2); flags
        argparse itself refuses (unknown ones, ``--enable_batching=maybe``) exit 2 there.
    """
    args = build_arg_parser().parse_args(argv)
    for flag in ("port", "rest_api_port"):
        value = getattr(args, flag)
        if not 0 <= value <= 65535:
            _fail(f"--{flag} must be in [0, 65535], got {value}")
    if args.port and args.port == args.rest_api_port:
        _fail("--port and --rest_api_port must differ")
    for flag in ("rest_api_num_threads", "grpc_max_threads"):
        if getattr(args, flag) < 1:
            _fail(f"--{flag} must be >= 1")
    if args.file_system_poll_wait_seconds < 0:
        _fail("--file_system_poll_wait_seconds must be >= 0 (0: poll once at startup)")
    if args.max_num_load_retries < 0 or args.load_retry_interval_micros < 0:
        _fail("--max_num_load_retries and --load_retry_interval_micros must be >= 0")
    if args.shutdown_grace_seconds < 0:
        _fail("--shutdown_grace_seconds must be >= 0")
    if args.model_config_file and args.model_base_path:
        _fail("use either --model_config_file or --model_name/--model_base_path, not both")
    if args.model_config_file_poll_wait_seconds < 0:
        _fail("--model_config_file_poll_wait_seconds must be >= 0")
    if args.rest_api_timeout_in_ms < 1:
        _fail("--rest_api_timeout_in_ms must be >= 1")
    if args.max_request_bytes < 1 or args.max_batch_size_per_request < 0:
        _fail("--max_request_bytes must be >= 1 and --max_batch_size_per_request >= 0")
    prometheus_path = None
    if args.monitoring_config_file:
        from serving.metrics import parse_monitoring_config

        try:
            prometheus_path = parse_monitoring_config(read_text(args.monitoring_config_file))
        except (OSError, ValueError) as exc:
            _fail(f"--monitoring_config_file: {exc}")
    if args.model_config_file:
        try:
            models = parse_model_config_text(read_text(args.model_config_file))
        except (OSError, ValueError) as exc:
            _fail(f"--model_config_file: {exc}")
        if not models:
            _fail("--model_config_file lists no models")
    elif args.model_base_path:
        if not args.model_name:
            _fail("--model_name must not be empty")
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
        _fail("one of --model_base_path or --model_config_file is required")
    batching = None
    if args.batching_parameters_file and not args.enable_batching:
        _fail("--batching_parameters_file needs --enable_batching")
    if args.enable_batching:
        batching = BatchingOptions()
        if args.batching_parameters_file:
            try:
                batching = parse_batching_parameters(read_text(args.batching_parameters_file))
            except (OSError, ValueError) as exc:
                _fail(f"--batching_parameters_file: {exc}")
    try:
        channel_args = _parse_channel_arguments(args.grpc_channel_arguments)
    except ValueError as exc:
        _fail(f"--grpc_channel_arguments: {exc}")
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


def read_text(path: str) -> str:
    """A config file's text through ``tf.io.gfile`` (``gs://`` works); ``OSError`` if unreadable."""
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


def _fail(message: str) -> NoReturn:
    raise FlagError(message)
