"""A PredictionService that answers every Predict with one fixed response and runs no model.

    python benchmarks/grpc_echo.py --port 8500 --response response.pb

``serving_latency.py`` sends it the requests of the server's rows from the same client. Its
latency is what Python gRPC itself costs on this machine (transport, protobuf parsing and
serialising, the hand-off to a worker thread), so the server's time over the in-process floor
splits into that and what our handler adds. The server is built as ``serving.server`` builds
its own (a thread pool of ``--threads`` workers) and parses each request the same way.
"""

from __future__ import annotations

import argparse
import sys
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError
from tensorflow_serving.apis import predict_pb2

PREDICT = "tensorflow.serving.PredictionService"


def serve(port: int, response: bytes, threads: int) -> None:
    """Serves until killed; prints ``ready <port>`` to stderr once it accepts calls."""
    fixed = predict_pb2.PredictResponse.FromString(response)

    def predict(request: predict_pb2.PredictRequest, context: grpc.ServicerContext):
        return fixed

    handler = grpc.method_handlers_generic_handler(
        PREDICT,
        {
            "Predict": grpc.unary_unary_rpc_method_handler(
                predict,
                request_deserializer=predict_pb2.PredictRequest.FromString,
                response_serializer=predict_pb2.PredictResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise OSError(f"could not bind port {port}")
    server.start()
    print(f"ready {bound}", file=sys.stderr, flush=True)
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--response", required=True, help="a serialised PredictResponse")
    p.add_argument("--threads", type=int, default=64, help="worker threads (the server's)")
    args = p.parse_args(argv)
    try:
        with open(args.response, "rb") as f:
            response = f.read()
        serve(args.port, response, args.threads)
    except (OSError, DecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
