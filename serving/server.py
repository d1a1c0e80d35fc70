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

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc

from common.cli import run
from serving.batching import Batcher
from serving.errors import JsonFormatter, log_event
from serving.flags import ServerConfig, config_from_args, read_text
from serving.grpc_service import add_servicers
from serving.model_config import parse_model_config_text
from serving.model_manager import ServableManager

logger = logging.getLogger("serving.server")


class ModelServer:
    """Owns the ServableManager, the gRPC server and the REST server; start()/stop()."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.manager = ServableManager(config.models, options=config.loader, freeze_heap=True)
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
                text = read_text(self.config.model_config_file)
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
        add_servicers(self._grpc, predictor)
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


def configure_logging(level: int = logging.INFO) -> None:
    """One JSON object per line on stderr for everything under the `serving` logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("serving")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the server until SIGTERM/SIGINT, then drains and exits 0 (2: bad flags)."""
    return run(lambda: serve(config_from_args(argv)))


def serve(config: ServerConfig) -> int:
    """Serves ``config`` until SIGTERM/SIGINT; 0 after a clean drain, 1 if it cannot start."""
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
