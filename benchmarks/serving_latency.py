"""Serving latency benchmark: the local TF Serving-compatible server over gRPC.

Starts `python -m serving.server` on 127.0.0.1 for an export base path, with and without
server-side batching, and reports p50/p95/p99 latency and QPS at concurrency 1, 8 and 32
(one gRPC channel per client thread), plus the in-process signature call as the floor.
Inputs are built from the model's metadata (ServingClient), `--batch` queries per request.

    python benchmarks/serving_latency.py --base_path EXPORT_BASE [--requests 200]
        [--concurrency 1 8 32] [--batch 2] [--k 10]

Writes ``benchmarks/results/serving_latency.{json,md}`` (or --out_dir).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from serving.client import ServingClient  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
DEFAULT_BATCHING = (
    "max_batch_size { value: 64 }\n"
    "batch_timeout_micros { value: 2000 }\n"
    "num_batch_threads { value: 2 }\n"
    "max_enqueued_batches { value: 1000 }\n"
)


def start_server(base_path: str, model: str, batching_file: str | None) -> tuple[Any, int]:
    """Starts the server subprocess; returns (process, grpc port) once it serves."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "serving.server", "--model_name", model]
    cmd += ["--model_base_path", base_path, "--port", str(port)]
    cmd += ["--file_system_poll_wait_seconds", "0", "--grpc_max_threads", "64"]
    if batching_file:
        cmd += ["--enable_batching", "--batching_parameters_file", batching_file]
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    started = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if '"server_start"' in line:
                started.set()

    threading.Thread(target=read, daemon=True).start()
    if not started.wait(300):
        proc.kill()
        raise RuntimeError("server did not start")
    return proc, port


def stop_server(proc: Any) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def summarize(latencies_s: list[float], wall_s: float, errors: int) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1e3
    return {
        "requests": len(latencies_s),
        "errors": errors,
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "qps": round(len(latencies_s) / wall_s, 1),
    }


def load(
    target: str, model: str, inputs: dict[str, Any], signature: str, concurrency: int, total: int
) -> dict[str, float]:
    """`total` requests spread over `concurrency` threads, each with its own channel."""
    per_thread = max(1, total // concurrency)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)

    def worker() -> None:
        with ServingClient(target, model, timeout_s=60, retries=0) as client:
            client.predict(inputs, signature)  # warm the channel
            barrier.wait()
            mine = []
            for _ in range(per_thread):
                start = time.perf_counter()
                try:
                    client.predict(inputs, signature)
                    mine.append(time.perf_counter() - start)
                except Exception:
                    with lock:
                        errors[0] += 1
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return summarize(latencies, time.perf_counter() - start, errors[0])


def floor(base_path: str, model: str, inputs: dict[str, Any], signature: str, n: int) -> dict:
    """The signature called in-process: what the server adds is the rest."""
    from serving.model_manager import LoaderOptions, list_versions, load_servable
    from serving.predictor import call_signature

    version = max(list_versions(base_path))
    servable = load_servable(model, version, list_versions(base_path)[version], LoaderOptions())
    sig = servable.signatures[signature]
    call_signature(sig, inputs)
    latencies = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        call_signature(sig, inputs)
        latencies.append(time.perf_counter() - t0)
    return summarize(latencies, time.perf_counter() - start, 0)


def build_inputs(target: str, model: str, signature: str, batch: int, k: int) -> dict[str, Any]:
    """Contract-shaped queries, filled to whatever the signature declares."""
    rng = np.random.default_rng(0)
    columns = {
        "user_id": [str(u) for u in rng.integers(1, 900, size=batch)],
        "user_age": ["25"] * batch,
        "user_gender": ["F"] * batch,
        "user_occupation": ["engineer"] * batch,
        "query_text": ["space adventure with robots"] * batch,
    }
    with ServingClient(target, model, timeout_s=60) as client:
        extras = {"k": np.full([batch], k, np.int32), "diversity": np.zeros([batch], np.float32)}
        return client.build_inputs(signature, columns, extras, batch)


def to_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# Serving latency (local gRPC server)",
        "",
        f"Export `{cfg['base_path']}`, signature `{cfg['signature']}`, {cfg['batch']} queries per "
        f"request, k={cfg['k']}, {cfg['requests']} requests per row; {cfg['host']}.",
        "",
        "| mode | concurrency | p50 ms | p95 ms | p99 ms | QPS | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    f = result["floor"]
    lines.append(
        f"| in-process signature call (floor) | 1 | {f['p50_ms']} | {f['p95_ms']} | "
        f"{f['p99_ms']} | {f['qps']} | 0 |"
    )
    for run in result["runs"]:
        mode = "gRPC, batching" if run["batching"] else "gRPC, no batching"
        lines.append(
            f"| {mode} | {run['concurrency']} | {run['p50_ms']} | {run['p95_ms']} | "
            f"{run['p99_ms']} | {run['qps']} | {run['errors']} |"
        )
    lines += ["", f"Batching parameters: `{cfg['batching'].strip().replace(chr(10), ' ')}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base_path", required=True, help="export base path (<base>/<version>/)")
    p.add_argument("--model_name", default="recs")
    p.add_argument("--signature", default="serving_default")
    p.add_argument("--requests", type=int, default=200, help="requests per measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batch", type=int, default=2, help="queries per request")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batching_parameters", default=DEFAULT_BATCHING)
    p.add_argument("--out_dir", default=RESULTS)
    args = p.parse_args(argv)
    base_path = os.path.abspath(args.base_path)

    runs: list[dict] = []
    inputs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        batching_file = os.path.join(tmp, "batching.config")
        with open(batching_file, "w") as f:
            f.write(args.batching_parameters)
        for batching in (False, True):
            proc, port = start_server(
                base_path, args.model_name, batching_file if batching else None
            )
            target = f"127.0.0.1:{port}"
            try:
                if not inputs:
                    inputs = build_inputs(
                        target, args.model_name, args.signature, args.batch, args.k
                    )
                for c in args.concurrency:
                    stats = load(target, args.model_name, inputs, args.signature, c, args.requests)
                    runs.append({"batching": batching, "concurrency": c, **stats})
                    print(json.dumps(runs[-1]), flush=True)
            finally:
                stop_server(proc)
    result = {
        "config": {
            "base_path": base_path,
            "signature": args.signature,
            "batch": args.batch,
            "k": args.k,
            "requests": args.requests,
            "batching": args.batching_parameters,
            "host": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}",
        },
        "floor": floor(base_path, args.model_name, inputs, args.signature, args.requests),
        "runs": runs,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "serving_latency.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out_dir, "serving_latency.md"), "w") as f:
        f.write(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
