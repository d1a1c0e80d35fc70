"""Fault and load suite for the local TF Serving-compatible server (localhost only).

    python -m benchmarks.serving_faults [--model-base DIR] [--requests 10000] [--half-sent 200]

Starts ``python -m serving.server`` on 127.0.0.1 over a copy of a model base (default: a tiny
brute-force export of synthetic data, built in a few seconds) and measures:

1. ``load``: N gRPC Predict calls at concurrency C: errors, p50/p99, server RSS before/after.
2. ``hot_swap``: a new version appears under load: failed requests, the slowest request answered
   by the new version against the steady p99 (warm-up replay is what keeps it close).
3. ``corrupt_version``: a version with a garbage ``saved_model.pb``: time until GetModelStatus
   shows its error, whether the old version keeps answering, time until a newer good one serves.
4. ``half_sent``: H connections that send half a REST request, next to good REST requests:
   good p99 against the idle REST p99.
5. ``oversized``: a body over the request limit (REST and gRPC) and a request with too many rows:
   the answer codes and the server's RSS afterwards.

Every count and wait is bounded; the defaults finish in a few minutes on 2 cores, the issue's
full sizes are ``--requests 10000 --half-sent 200``. Prints a table and writes
``benchmarks/results/serving_faults.{json,md}`` (through temp files and a rename).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODEL = "movielens"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def tiny_model_base(work: Path) -> Path:
    """A brute-force export of synthetic data (the tests' hash-tower recommender)."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import build_fake_export
    from trainer.data.prepare import prepare_synthetic

    data = work / "data"
    prepare_synthetic(str(data), num_users=40, num_items=60, num_ratings=1500, seed=0)
    build_fake_export(str(data), str(work / "export"), model_name=MODEL)
    return work / "export" / MODEL


def warmup_request(version_dir: Path) -> Any:
    """The export's own serving_default warm-up request (any export has one)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = version_dir / "assets.extra" / "tf_serving_warmup_requests"
    for raw in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        request = log.predict_log.request
        if request.model_spec.signature_name in ("", "serving_default"):
            request.model_spec.name = MODEL
            return request
    raise SystemExit(f"{path} has no serving_default request")


def rest_body(request: Any) -> bytes:
    import tensorflow as tf

    inputs = {}
    for name, proto in request.inputs.items():
        arr = tf.make_ndarray(proto)
        if arr.dtype == object:
            arr = np.vectorize(lambda b: b.decode(), otypes=[object])(arr)
        inputs[name] = arr.tolist()
    return json.dumps({"inputs": inputs}).encode()


class Server:
    def __init__(self, base: Path, extra: list[str]) -> None:
        self.rest_port = free_port()
        self.grpc_port = free_port()
        cmd = [
            sys.executable, "-m", "serving.server", "--model_name", MODEL,
            "--model_base_path", str(base), "--port", str(self.grpc_port),
            "--rest_api_port", str(self.rest_port), "--file_system_poll_wait_seconds", "0.5",
            "--max_num_load_retries", "0", *extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (lives with the process)
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=self.log, stdout=self.log)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit("server exited:\n" + self.log.read()[-3000:])
            try:
                with urllib.request.urlopen(self.url(f"/v1/models/{MODEL}"), timeout=2) as r:
                    if b"AVAILABLE" in r.read():
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise SystemExit("server did not start in 180 s")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.rest_port}{path}"

    def status(self) -> list[dict]:
        try:
            with urllib.request.urlopen(self.url(f"/v1/models/{MODEL}"), timeout=10) as r:
                return json.loads(r.read())["model_version_status"]
        except urllib.error.HTTPError as err:
            return [{"error": err.read().decode()[:200]}]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def grpc_load(target: str, request: Any, count: int, concurrency: int, stop=None) -> list:
    """(start, latency_s, version or None, error) per call."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    results: list = []
    lock = threading.Lock()
    remaining = [count]

    def worker() -> None:
        with grpc.insecure_channel(target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while stop is None or not stop.is_set():
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                start = time.monotonic()
                try:
                    response = stub.Predict(request, timeout=60)
                    item = (start, time.monotonic() - start, response.model_spec.version.value, "")
                except grpc.RpcError as err:
                    item = (start, time.monotonic() - start, None, err.code().name)
                with lock:
                    results.append(item)

    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    return results


def rest_post(server: Server, body: bytes, timeout: float = 60) -> tuple[int, float]:
    start = time.monotonic()
    req = urllib.request.Request(server.url(f"/v1/models/{MODEL}:predict"), data=body)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as err:
        err.read()
        code = err.code
    except OSError:
        code = -1
    return code, time.monotonic() - start


def add_version(base: Path, source: int, version: int, corrupt: bool = False) -> None:
    tmp = base / f".tmp-{version}"
    shutil.copytree(base / str(source), tmp)
    if corrupt:
        (tmp / "saved_model.pb").write_bytes(b"not a saved model" * 100)
    os.rename(tmp, base / str(version))


def wait_for(predicate, timeout_s: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="serving_faults-"))
    try:
        source = Path(args.model_base) if args.model_base else tiny_model_base(work / "tiny")
        versions = sorted(int(p.name) for p in source.iterdir() if p.name.isdigit())
        if not versions:
            raise SystemExit(f"{source} holds no numeric version folder")
        base = work / "base" / MODEL
        base.mkdir(parents=True)
        shutil.copytree(source / str(versions[-1]), base / "1")
        request = warmup_request(base / "1")
        body = rest_body(request)
        server = Server(base, ["--rest_api_num_threads", "4", "--grpc_max_threads", "64"])
        target = f"127.0.0.1:{server.grpc_port}"
        out: dict[str, Any] = {"config": vars(args) | {"cpus": os.cpu_count()}}
        try:
            grpc_load(target, request, 50, 4)  # warm the client side too
            rss_before = rss_mb(server.proc.pid)
            start = time.monotonic()
            res = grpc_load(target, request, args.requests, args.concurrency)
            wall = time.monotonic() - start
            lat = [r[1] for r in res if not r[3]]
            out["load"] = {
                "requests": len(res), "concurrency": args.concurrency,
                "errors": sum(1 for r in res if r[3]), "qps": round(len(res) / wall, 1),
                "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2),
                "rss_before_mb": round(rss_before, 1),
                "rss_after_mb": round(rss_mb(server.proc.pid), 1),
            }  # fmt: skip

            # Hot swap under load.
            stop = threading.Event()
            swap: list = []
            loader = threading.Thread(
                target=lambda: swap.extend(grpc_load(target, request, 10**9, 8, stop))
            )
            loader.start()
            time.sleep(2)
            add_version(base, 1, 2)
            seen = wait_for(
                lambda: any(s.get("version") == "2" and s.get("state") == "AVAILABLE"
                            for s in server.status()), args.swap_timeout_s)  # fmt: skip
            time.sleep(2)
            stop.set()
            loader.join(120)
            new = [r[1] for r in swap if r[2] == 2]
            # Steady state at the same concurrency: the old version's answers in this run.
            steady_p99 = pct([r[1] for r in swap if r[2] == 1], 99)
            out["hot_swap"] = {
                "requests": len(swap), "failed": sum(1 for r in swap if r[3]),
                "available_after_s": None if seen is None else round(seen, 2),
                "answered_by_new": len(new),
                "slowest_new_ms": round(max(new) * 1000, 2) if new else None,
                "steady_p99_ms": round(steady_p99, 2),
                "slowest_new_vs_steady_p99": round(max(new) * 1000 / steady_p99, 2)
                if new else None,
            }  # fmt: skip

            # A corrupt version, then a newer good one.
            add_version(base, 2, 3, corrupt=True)
            error_after = wait_for(
                lambda: any(s.get("version") == "3" and s["status"].get("error_message")
                            for s in server.status()), 60)  # fmt: skip
            still = grpc_load(target, request, 20, 2)
            add_version(base, 2, 4)
            newer_after = wait_for(
                lambda: any(s.get("version") == "4" and s.get("state") == "AVAILABLE"
                            for s in server.status()), 120)  # fmt: skip
            msg = next((s["status"]["error_message"] for s in server.status()
                        if s.get("version") == "3"), "")  # fmt: skip
            out["corrupt_version"] = {
                "error_in_status_after_s": None if error_after is None else round(error_after, 2),
                "error_message": msg[:160],
                "old_version_errors": sum(1 for r in still if r[3]),
                "newer_version_available_after_s": None
                if newer_after is None else round(newer_after, 2),
            }  # fmt: skip

            # Half-sent REST requests next to good ones.
            idle = [rest_post(server, body) for _ in range(args.rest_requests)]
            stalled = []
            for i in range(args.half_sent):
                sock = socket.create_connection(("127.0.0.1", server.rest_port), timeout=30)
                head = f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\n"
                sock.sendall((head + "Content-Length: 100000\r\n\r\n{").encode() if i % 2
                             else head[:30].encode())  # fmt: skip
                stalled.append(sock)
            busy = [rest_post(server, body) for _ in range(args.rest_requests)]
            for sock in stalled:
                sock.close()
            # Idle measured on both sides of the stalled phase, so a burst of CPU from
            # something else on the machine does not land on one side only.
            idle += [rest_post(server, body) for _ in range(args.rest_requests)]
            idle_p99 = pct([t for c, t in idle if c == 200], 99)
            busy_p99 = pct([t for c, t in busy if c == 200], 99)
            out["half_sent"] = {
                "stalled_connections": args.half_sent, "good_requests": len(busy),
                "good_failed": sum(1 for c, _ in busy if c != 200),
                "idle_p99_ms": round(idle_p99, 2), "with_stalled_p99_ms": round(busy_p99, 2),
                "ratio": round(busy_p99 / idle_p99, 2),
            }  # fmt: skip

            # Oversized requests.
            import grpc

            big = b'{"inputs": {"query_text": ["' + b"x" * (32 << 20) + b'"]}}'
            code, seconds = rest_post(server, big, timeout=120)
            grpc_big = type(request)()
            grpc_big.CopyFrom(request)
            grpc_big.inputs["query_text"].string_val[0] = b"x" * (32 << 20)
            rows = type(request)()
            rows.CopyFrom(request)
            import tensorflow as tf

            for name, proto in request.inputs.items():
                arr = tf.make_ndarray(proto)
                rows.inputs[name].CopyFrom(tf.make_tensor_proto(np.repeat(arr[:1], 10_000, 0)))
            from tensorflow_serving.apis import prediction_service_pb2_grpc

            codes = {}
            with grpc.insecure_channel(
                target, options=[("grpc.max_send_message_length", 64 << 20)]
            ) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                for name, req in (("grpc_32mib", grpc_big), ("grpc_10000_rows", rows)):
                    start = time.monotonic()
                    try:
                        stub.Predict(req, timeout=120)
                        codes[name] = ("OK", time.monotonic() - start)
                    except grpc.RpcError as err:
                        codes[name] = (err.code().name, time.monotonic() - start)
            out["oversized"] = {
                "rest_32mib": {"http": code, "seconds": round(seconds, 2)},
                **{k: {"code": c, "seconds": round(s, 2)} for k, (c, s) in codes.items()},
                "rss_after_mb": round(rss_mb(server.proc.pid), 1),
            }
        finally:
            server.stop()
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def to_markdown(result: dict) -> str:
    lines = [
        "# Serving faults (local server, localhost)",
        "",
        f"`python -m benchmarks.serving_faults` — {result['config']['cpus']} CPUs; config "
        f"`{json.dumps({k: v for k, v in result['config'].items() if k != 'cpus'})}`",
        "",
        "| scenario | measure | value |",
        "| --- | --- | --- |",
    ]
    for scenario, values in result.items():
        if scenario == "config":
            continue
        for key, value in values.items():
            lines.append(f"| {scenario} | {key} | {json.dumps(value)} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    sys.path.insert(0, str(REPO))
    from common import staging

    staging.write_text(str(path), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-base", help="model base with numeric versions (default: tiny export)")
    p.add_argument("--requests", type=int, default=2000, help="load requests (issue: 10000)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--half-sent", type=int, default=50, help="stalled REST connections (200)")
    p.add_argument("--rest-requests", type=int, default=100, help="good REST requests per phase")
    p.add_argument("--swap-timeout-s", type=float, default=120)
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    for name in ("requests", "concurrency", "rest_requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.half_sent < 0 or args.half_sent > 1000:
        p.error("--half-sent must be in [0, 1000]")
    result = run(args)
    markdown = to_markdown(result)
    print(markdown)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "serving_faults.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / "serving_faults.md", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
