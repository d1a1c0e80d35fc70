"""Serving latency benchmark: known text, free text and a 1M-item catalog behind the server.

    python benchmarks/serving_latency.py --model_dir runs/demo/model [--quick]

Everything in one run, so every ratio compares figures of the same run:

1. Exports of the trained model: over its own catalog (ScaNN), and over its catalog plus
   synthetic items (1,000,000 in all; ScaNN and brute force). The synthetic items sit near
   mixtures of real item embeddings, so real queries have real neighbours among them.
2. The 1M index searched in process (no server, no towers): single real query embeddings,
   the searches taking turns in blocks of 50 queries, ScaNN against brute force (the speed ratio of
   their search ops, and again through a ``tf.function`` next to an empty one's call cost),
   and ScaNN's recall@10 against brute force, on the last users (the export tuned ScaNN's
   leaf count on the first ones).
3. For every export and query kind, the in-process floor: ``serving_default`` run through the
   session loader TF Serving uses (``serving.session_runner``), one request after another.
4. gRPC: the local server (``python -m serving.server``) per setting, concurrency 1, 8 and 32,
   one channel per client thread. Query kinds: ``known`` (real users: profile, typed titles and
   history, all texts the model has encoded) and ``free`` (free text, no history: BERT runs).
5. Paired, at concurrency 1 with known text: the floor, the gRPC transport alone
   (``grpc_echo.py``: the same requests answered with one fixed response, no model), the own
   export behind the server with and without batching, and the 1M ScaNN export behind it, all
   up at once and called in turn in blocks of requests. A slow moment of the shared cores
   then falls on each alike, so the differences the issue's targets are about (what the
   server adds, how much of it is gRPC itself, 1M against the own catalog) are measured in
   the same moments, not in rows minutes apart.
6. Batching's scaling, paired: one batching server on the own export, known text, rounds of
   concurrency 1 then concurrency 32 (``scaling_requests`` each), so each round's QPS ratio
   compares two levels measured seconds apart; the median and the lowest round are reported.
7. The concurrency-1 tail: ``tail_requests`` (2,000) known-text requests to one server without
   and one with batching, for p99 / p50 (a 400-request row's p99 is its 4th-slowest request).
8. Sweeps on the model's own export: batching parameters and TensorFlow's intra/inter-op threads.

Requests carry ``--batch`` queries each (2), k = 10, no exclusions, no diversity; each row
cycles through distinct requests. Writes ``benchmarks/results/serving_latency.{json,md}``
(or ``--out_dir``). Exports go to ``--work`` (a temporary folder unless given; reused when
they are already there).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from collections.abc import Callable
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import contract, staging  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
KEYS = (*contract.QUERY_FEATURES, contract.HISTORY)

#: Chosen batching: no timeout (a lone request is never held back) and one batch thread, so a
#: batch forms from whatever queued while the previous one ran (it grows with the load).
BATCHING = (
    "max_batch_size { value: 64 }\n"
    "batch_timeout_micros { value: 0 }\n"
    "num_batch_threads { value: 1 }\n"
    "max_enqueued_batches { value: 1000 }\n"
)
#: The previous setting (README before issue 13), kept in the sweep for comparison.
OLD_BATCHING = BATCHING.replace("value: 0 }", "value: 2000 }").replace(
    "num_batch_threads { value: 1 }", "num_batch_threads { value: 2 }"
)
BATCHING_SWEEP = {
    "timeout 0, 1 thread (chosen)": BATCHING,
    "timeout 0, 2 threads": BATCHING.replace("num_batch_threads { value: 1 }",
                                             "num_batch_threads { value: 2 }"),
    "timeout 500 us, 1 thread": BATCHING.replace("value: 0 }", "value: 500 }"),
    "timeout 2000 us, 2 threads (before)": OLD_BATCHING,
    "max 16 rows, timeout 0, 1 thread": BATCHING.replace("value: 64 }", "value: 16 }"),
}  # fmt: skip
ECHO = "gRPC transport alone (echo)"
#: The servers of the paired comparison: (export, batching parameters).
PAIRED_SERVERS = {"own, no batching": ("own", None), "own, batching": ("own", BATCHING),
                  "1M ScaNN, batching": ("big_scann", BATCHING)}  # fmt: skip
THREAD_SWEEP = {"TF default": (0, 0), "intra 1, inter 1": (1, 1), "intra 2, inter 1": (2, 1),
                "intra 1, inter 2": (1, 2)}  # fmt: skip

FREE_TEXTS = (
    "space adventure with robots", "a quiet french love story", "funny animated film for kids",
    "dark crime thriller in a rainy city", "old western with a lone gunman",
    "documentary about the ocean", "romantic comedy set in new york", "war drama at sea",
    "a musical about dancers in paris", "horror in an abandoned house",
)  # fmt: skip


class BenchError(ValueError):
    """A flag or input the benchmark cannot run with."""


@dataclasses.dataclass
class BenchConfig:
    """What to run; ``--quick`` shrinks it to a few minutes."""

    model_dir: str = ""
    data: str = ""  # default: the data dir the model was trained on
    work: str = ""  # exports; default: a temporary folder
    out_dir: str = RESULTS
    synthetic_items: int = 1_000_000  # items of the big catalog, real ones included
    requests: int = 400  # per row
    concurrency: tuple[int, ...] = (1, 8, 32)
    batch: int = 2  # queries per request
    k: int = 10
    search_queries: int = 300  # real query embeddings for the in-process 1M search
    paired_blocks: int = 8  # rounds of the paired comparison, each target in turn
    paired_block_requests: int = 50
    scaling_rounds: int = 5  # rounds of concurrency 1 then the top level, one batching server
    scaling_requests: int = 800  # per level per round
    tail_requests: int = 2000  # concurrency-1 requests per server for the p99 / p50 ratio
    sweeps: bool = True
    seed: int = 0

    def validate(self) -> None:
        if not self.model_dir or not os.path.isfile(os.path.join(self.model_dir, "config.json")):
            raise BenchError(f"--model_dir {self.model_dir!r} is not a trained model dir")
        if self.data and not os.path.isdir(self.data):
            raise BenchError(f"--data {self.data!r} is not a directory")
        for name in ("synthetic_items", "requests", "batch", "k", "search_queries",
                     "paired_blocks", "paired_block_requests", "scaling_rounds",
                     "scaling_requests", "tail_requests"):  # fmt: skip
            if getattr(self, name) < 1:
                raise BenchError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise BenchError(f"--concurrency values must be at least 1, got {self.concurrency}")

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        base = {"synthetic_items": 200_000, "requests": 120, "concurrency": (1, 32),
                "search_queries": 100, "paired_blocks": 3, "scaling_rounds": 2,
                "scaling_requests": 320, "tail_requests": 400}  # fmt: skip
        return cls(**{**base, **overrides})


# ----------------------------------------------------------------------------- exports


def synthetic_catalog(num_items: int, seed: int):
    """``grow_catalog`` for :func:`trainer.export.build_module`: the real catalog first, then
    items near mixtures of two real items' embeddings, up to ``num_items`` in all."""

    def grow(catalog: dict, embeddings: np.ndarray) -> tuple[dict, np.ndarray]:
        rng = np.random.default_rng(seed)
        real = len(embeddings)
        extra = max(0, num_items - real)
        a = rng.integers(0, real, extra)
        b = rng.integers(0, real, extra)
        mix = rng.uniform(0.0, 0.5, (extra, 1)).astype(np.float32)
        noise = rng.normal(0.0, 0.3 / np.sqrt(embeddings.shape[1]), (extra, embeddings.shape[1]))
        vectors = (1 - mix) * embeddings[a] + mix * embeddings[b] + noise.astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        names = np.array([f"synthetic-{i}" for i in range(extra)], dtype=object)
        grown = {}
        for key, column in catalog.items():
            column = np.asarray(column)
            if key in ("item_id", "item_title", "item_text"):
                filler = names
            elif column.dtype.kind in "iuf":
                filler = np.zeros(extra, column.dtype)
            else:
                filler = np.full(extra, "", dtype=object)
            grown[key] = np.concatenate([column.astype(filler.dtype), filler])
        return grown, np.concatenate([embeddings, vectors.astype(np.float32)])

    return grow


def build_exports(config: BenchConfig, work: str) -> tuple[dict[str, str], dict]:
    """The three exports (reused when present) and the in-process 1M search figures."""
    import tensorflow as tf

    from trainer.export import build_module, save_export
    from trainer.serving_module import IndexConfig

    paths = {
        "own": os.path.join(work, "own"),
        "big_scann": os.path.join(work, "big_scann"),
        "big_brute_force": os.path.join(work, "big_brute_force"),
    }
    search: dict = {}
    grow = synthetic_catalog(config.synthetic_items, config.seed)
    modules = {}
    for name, path in paths.items():
        kind = "brute_force" if name == "big_brute_force" else "scann"
        needs_module = name != "own" and not search
        if os.path.isdir(os.path.join(path, "1")) and not needs_module:
            continue
        start = time.time()
        module, catalog, users, info = build_module(
            config.model_dir,
            config.data or None,
            IndexConfig(kind=kind),
            grow_catalog=None if name == "own" else grow,
        )
        if not os.path.isdir(os.path.join(path, "1")):
            save_export(module, os.path.dirname(path), os.path.basename(path), 1, users,
                        catalog, info)  # fmt: skip
            print(f"export {name}: {len(catalog['item_id']):,} items, {time.time() - start:.0f}s",
                  flush=True)  # fmt: skip
        if name != "own":
            modules[kind] = (module, users)
    if len(modules) == 2:
        search = index_search(modules, config)
    del modules
    tf.keras.backend.clear_session()
    return {name: os.path.join(path, "1") for name, path in paths.items()}, search


def search_op(module) -> Callable[[Any], Any]:
    """The module's candidate search as eager op calls ``[1, D] -> [1, pool]`` catalog rows.

    Brute force is ``candidate_pool``'s matmul and top-k. ScaNN is the op the export's layer
    calls (batched, parallel) on the export's index: TFRS's layer recreates the searcher
    handle on every call, which is not search, so the handle is taken once here.
    """
    if module.scann is None:
        return lambda q: module.candidate_pool(q)[1]
    from scann.scann_ops.py import scann_ops

    searcher = scann_ops.searcher_from_module(module.scann._serialized_searcher)
    pool = module.index_config.pool
    return lambda q: searcher.search_batched_parallel(q, final_num_neighbors=pool).indices


def time_searches(
    fns: dict[str, Callable[[Any], Any]], embeddings: np.ndarray, block: int = 50
) -> dict[str, tuple[list[float], list]]:
    """Per-query seconds and top-10 rows of each of ``fns`` over ``embeddings``, one query at
    a time, the functions taking turns in blocks of ``block`` queries: a ratio of two of them
    then compares nearby moments of these shared cores, not runs seconds apart. Blocks, not
    single queries in turn: brute force streams the whole 1M table through the caches, and
    ScaNN called right after it runs cold (0.63 against 0.37-0.46 ms p50 in a probe)."""
    import tensorflow as tf

    for fn in fns.values():
        fn(tf.constant(embeddings[:1]))
    settle_client_heap()
    queries = [tf.constant(row[None, :]) for row in embeddings]
    out: dict[str, tuple[list[float], list]] = {name: ([], []) for name in fns}
    for start in range(0, len(queries), block):
        for name, fn in fns.items():
            fn(queries[start])  # warm this function's data before its block is timed
            for q in queries[start : start + block]:
                t0 = time.perf_counter()
                indices = fn(q).numpy()
                out[name][0].append(time.perf_counter() - t0)
                out[name][1].append(indices[0, :10])
    return out


def index_search(modules: dict, config: BenchConfig) -> dict:
    """Single-query search of the big index alone, real query embeddings: p50 per index, the
    speed ratio and ScaNN's recall@10 against brute force.

    Each index is timed twice: its search ops called eagerly (the speed ratio), and
    ``candidate_pool`` through a ``tf.function`` as the export runs it. The second adds a
    ``tf.function`` call's fixed cost, timed here on an empty function.
    """
    import tensorflow as tf

    from trainer.export import recall_at_k

    scann, users = modules["scann"]
    brute, _ = modules["brute_force"]
    n = min(config.search_queries, len(users["user_id"]))
    # The last users: the export tuned its leaf count on the first ones (its recall sample).
    queries = {k: tf.constant(np.asarray(users[k][-n:]).astype(str)) for k in KEYS}
    embeddings = scann.query_embedding(**queries)["embeddings"].numpy()
    out: dict = {"queries": n, "items": int(scann.embeddings.shape[0]),
                 "pool": scann.index_config.pool}  # fmt: skip
    fns = {}
    for kind, module in (("scann", scann), ("brute_force", brute)):
        fns[kind] = search_op(module)
        fns[f"function_{kind}"] = tf.function(lambda q, m=module: m.candidate_pool(q)[1])
    fns["empty_function"] = tf.function(lambda q: q)
    timed = time_searches(fns, embeddings)
    answers = {name: ids for name, (_, ids) in timed.items()}
    for kind in ("scann", "brute_force"):
        for mode in ("", "function_"):
            latencies = timed[f"{mode}{kind}"][0]
            stats = summarize(latencies, sum(latencies), 0)
            out[f"{kind}_{mode}p50_ms"] = stats["p50_ms"]
            out[f"{kind}_{mode}p99_ms"] = stats["p99_ms"]
    empty = timed["empty_function"][0]
    out["empty_function_p50_ms"] = summarize(empty, sum(empty), 0)["p50_ms"]
    out["speedup"] = round(out["brute_force_p50_ms"] / out["scann_p50_ms"], 1)
    out["function_speedup"] = round(
        out["brute_force_function_p50_ms"] / out["scann_function_p50_ms"], 1
    )
    out["recall_at_10"] = round(
        recall_at_k(np.array(answers["scann"]), np.array(answers["brute_force"])), 4
    )
    same = np.array(answers["scann"]) == np.array(answers["function_scann"])
    out["op_matches_function"] = bool(same.all())
    out["leaves"] = f"{scann.index_config.num_leaves_to_search}/{scann.index_config.num_leaves}"
    print("in-process 1M search:", json.dumps(out), flush=True)
    return out


# ----------------------------------------------------------------------------- requests


def query_requests(config: BenchConfig, kind: str, count: int = 64) -> list[dict[str, np.ndarray]]:
    """``count`` distinct requests of ``config.batch`` queries: real users (``known``) or
    free text with a known profile and no history (``free``)."""
    from trainer.config import TrainConfig
    from trainer.data import records

    with open(os.path.join(config.model_dir, "config.json")) as f:
        train = TrainConfig.from_dict(json.load(f))
    users = records.load_users(config.data or train.data.data, train.data.split)
    b = config.batch
    out = []
    for r in range(count):
        rows = [(r * b + i) % len(users["user_id"]) for i in range(b)]
        inputs = {k: np.asarray(users[k])[rows].astype(object) for k in KEYS}
        if kind == "free":
            inputs["user_id"] = np.array([""] * b, object)
            inputs["query_text"] = np.array(
                [f"{FREE_TEXTS[(r * b + i) % len(FREE_TEXTS)]} {r}" for i in range(b)], object
            )
            inputs["history"] = np.array([[""]] * b, object)
        inputs["k"] = np.full([b], config.k, np.int32)
        inputs["exclude_item_ids"] = np.array([[""]] * b, object)
        inputs["diversity"] = np.zeros([b], np.float32)
        out.append(inputs)
    return out


def summarize(latencies_s: list[float], wall_s: float, errors: int) -> dict[str, float]:
    ms = np.asarray(latencies_s or [np.nan]) * 1e3
    return {
        "requests": len(latencies_s),
        "errors": errors,
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "qps": round(len(latencies_s) / wall_s, 1),
    }


def settle_client_heap() -> None:
    """Before a timed loop: this process holds TensorFlow and the exports too, and a full
    collection over them stalls a request by 0.1-0.4 s. The server freezes its heap
    (:func:`serving.model_manager.settle_heap`); the client here does the same, so neither
    side's figures carry the other's garbage collector."""
    from serving.model_manager import settle_heap

    settle_heap()


def floor(path: str, requests: list[dict], total: int) -> dict:
    """``serving_default`` run in process through the session loader, one call at a time."""
    from serving.predictor import call_signature
    from serving.servable import LoaderOptions, load_servable

    servable = load_servable("bench", 1, path, LoaderOptions())
    sig = servable.signatures["serving_default"]
    try:
        for inputs in requests[:8]:
            call_signature(sig, inputs)
        settle_client_heap()
        latencies = []
        start = time.perf_counter()
        for i in range(total):
            t0 = time.perf_counter()
            call_signature(sig, requests[i % len(requests)])
            latencies.append(time.perf_counter() - t0)
        return summarize(latencies, time.perf_counter() - start, 0)
    finally:
        servable.handle.close()


# ----------------------------------------------------------------------------- the server


def start_server(path: str, batching: str | None, threads: tuple[int, int], tmp: str):
    """Starts the server on the version folder's base path; (process, gRPC port) once up."""
    port = free_port()
    cmd = [sys.executable, "-m", "serving.server", "--model_name", "bench",
           "--model_base_path", os.path.dirname(path), "--port", str(port),
           "--rest_api_port", "0", "--file_system_poll_wait_seconds", "0",
           "--grpc_max_threads", "64", "--tensorflow_intra_op_parallelism", str(threads[0]),
           "--tensorflow_inter_op_parallelism", str(threads[1])]  # fmt: skip
    if batching:
        batching_file = os.path.join(tmp, f"batching-{port}.config")
        with open(batching_file, "w") as f:
            f.write(batching)
        cmd += ["--enable_batching", "--batching_parameters_file", batching_file]
    return spawn(cmd, '"server_start"', "the server"), port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: list[str], ready: str, name: str) -> subprocess.Popen:
    """Starts ``cmd`` and returns once a line of its stderr contains ``ready``."""
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    started = threading.Event()
    tail: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail[:] = [*tail[-20:], line]
            if ready in line:
                started.set()

    threading.Thread(target=read, daemon=True).start()
    for _ in range(600):
        if started.wait(1) or proc.poll() is not None:
            break
    if not started.is_set():
        proc.kill()
        raise RuntimeError(f"{name} did not start:\n" + "".join(tail))
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def predict_requests(requests: list[dict]) -> list[Any]:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    out = []
    for inputs in requests:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "bench"
        request.model_spec.signature_name = "serving_default"
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        out.append(request)
    return out


def load(port: int, requests: list[Any], concurrency: int, total: int) -> dict:
    """``total`` requests over ``concurrency`` threads, each with its own channel."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    per_thread = max(1, total // concurrency)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)

    def worker(offset: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            stub.Predict(requests[offset % len(requests)], timeout=120)  # warm the channel
            barrier.wait()
            mine, failed = [], 0
            for i in range(per_thread):
                request = requests[(offset + i) % len(requests)]
                t0 = time.perf_counter()
                try:
                    stub.Predict(request, timeout=120)
                    mine.append(time.perf_counter() - t0)
                except grpc.RpcError:
                    failed += 1
            with lock:
                latencies.extend(mine)
                errors[0] += failed

    threads = [threading.Thread(target=worker, args=(7 * i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    settle_client_heap()  # the workers wait at the barrier meanwhile
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return summarize(latencies, time.perf_counter() - start, errors[0])


def paired(config: BenchConfig, exports: dict[str, str], requests: list[dict],
           protos: list[Any]) -> dict:  # fmt: skip
    """Concurrency 1, every target up at once and called in turn, ``paired_blocks`` rounds of
    ``paired_block_requests`` requests each: p50/p99 per target and their differences."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving.predictor import call_signature
    from serving.servable import LoaderOptions, load_servable
    from serving.tensors import array_to_tensor

    servable = load_servable("bench", 1, exports["own"], LoaderOptions())
    sig = servable.signatures["serving_default"]
    targets: dict[str, Callable[[int], Any]] = {
        "floor": lambda i: call_signature(sig, requests[i % len(requests)])
    }
    response = predict_pb2.PredictResponse()
    for name, value in call_signature(sig, requests[0]).items():
        response.outputs[name].CopyFrom(array_to_tensor(value))
    procs: list[subprocess.Popen] = []
    channels: list[grpc.Channel] = []
    latencies: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = os.path.join(tmp, "response.pb")
            with open(path, "wb") as f:
                f.write(response.SerializeToString())
            echo = os.path.join(REPO, "benchmarks", "grpc_echo.py")
            ports = {ECHO: free_port()}
            procs.append(spawn([sys.executable, echo, "--port", str(ports[ECHO]),
                                "--response", path], "ready", "grpc_echo.py"))  # fmt: skip
            for name, (export, batching) in PAIRED_SERVERS.items():
                proc, ports[name] = start_server(exports[export], batching, (0, 0), tmp)
                procs.append(proc)
            for name, port in ports.items():
                channels.append(grpc.insecure_channel(f"127.0.0.1:{port}"))
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channels[-1])
                targets[name] = lambda i, stub=stub: stub.Predict(protos[i % len(protos)],
                                                                  timeout=120)  # fmt: skip
            latencies = {name: [] for name in targets}
            errors = dict.fromkeys(targets, 0)
            for fn in targets.values():
                for i in range(16):
                    fn(i)
            settle_client_heap()
            n = config.paired_block_requests
            for block in range(config.paired_blocks):
                for name, fn in targets.items():
                    for i in range(block * n, (block + 1) * n):
                        t0 = time.perf_counter()
                        try:
                            fn(i)
                        except Exception:  # counted like the main rows' errors, not fatal
                            errors[name] += 1
                            continue
                        latencies[name].append(time.perf_counter() - t0)
        finally:
            for channel in channels:
                channel.close()
            for proc in procs:
                stop_server(proc)
            servable.handle.close()
    stats = {name: summarize(lat, sum(lat) or 1.0, errors[name]) for name, lat in latencies.items()}
    p50 = {name: s["p50_ms"] for name, s in stats.items()}
    adds = p50["own, no batching"] - p50["floor"]
    out = {
        "targets": stats,
        "server_adds_p50_ms": round(adds, 3),
        "transport_p50_ms": p50[ECHO],
        "server_adds_minus_transport_p50_ms": round(adds - p50[ECHO], 3),
        "batching_adds_p50_ms": round(p50["own, batching"] - p50["own, no batching"], 3),
        "big_scann_minus_own_p50_ms": round(p50["1M ScaNN, batching"] - p50["own, batching"], 3),
    }
    print("paired:", json.dumps(out), flush=True)
    return out


def scaling(config: BenchConfig, export: str, protos: list[Any]) -> dict:
    """QPS at the top concurrency over QPS at 1, batching on, in ``scaling_rounds`` rounds."""
    top = max(config.concurrency)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(export, BATCHING, (0, 0), tmp)
        try:
            load(port, protos, top, 4 * top)  # warm the server's threads
            for _ in range(config.scaling_rounds):
                one = load(port, protos, 1, config.scaling_requests)
                many = load(port, protos, top, max(config.scaling_requests, 4 * top))
                rounds.append({"qps_c1": one["qps"], f"qps_c{top}": many["qps"],
                               "ratio": round(many["qps"] / one["qps"], 2),
                               "errors": one["errors"] + many["errors"]})  # fmt: skip
                print("scaling:", json.dumps(rounds[-1]), flush=True)
        finally:
            stop_server(proc)
    ratios = sorted(r["ratio"] for r in rounds)
    return {"concurrency": top, "rounds": rounds, "median_ratio": float(np.median(ratios)),
            "min_ratio": ratios[0], "errors": sum(r["errors"] for r in rounds)}  # fmt: skip


def tail(config: BenchConfig, export: str, protos: list[Any]) -> dict:
    """p99 over p50 at concurrency 1 from ``tail_requests`` requests per server (known text,
    without and with batching): a 400-request row's p99 is its 4th-slowest request, so one
    hiccup of these shared cores moves it; 2,000 give the 20th."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, batching in (("no batching", None), ("batching", BATCHING)):
            proc, port = start_server(export, batching, (0, 0), tmp)
            try:
                load(port, protos, 1, 200)  # warm the server's threads
                stats = load(port, protos, 1, config.tail_requests)
            finally:
                stop_server(proc)
            out[label] = {**stats, "p99_over_p50": round(stats["p99_ms"] / stats["p50_ms"], 2)}
            print(f"tail {label}:", json.dumps(out[label]), flush=True)
    return out


# ----------------------------------------------------------------------------- the run


def run(config: BenchConfig) -> dict:
    work = config.work or tempfile.mkdtemp(prefix="serving-latency-")
    os.makedirs(work, exist_ok=True)
    exports, search = build_exports(config, work)
    kinds = {kind: query_requests(config, kind) for kind in ("known", "free")}
    protos = {kind: predict_requests(reqs) for kind, reqs in kinds.items()}
    floors: dict[str, dict] = {}
    for export, kind in (("own", "known"), ("own", "free"), ("big_scann", "known"),
                         ("big_brute_force", "known")):  # fmt: skip
        floors[f"{export}/{kind}"] = floor(exports[export], kinds[kind], config.requests)
        print(f"floor {export}/{kind}:", json.dumps(floors[f"{export}/{kind}"]), flush=True)

    rows: list[dict] = []
    quick_c = (min(config.concurrency), max(config.concurrency))

    def measure(
        group: str,
        export: str,
        kind: str,
        batching: str | None,
        label: str,
        threads: tuple[int, int] = (0, 0),
        levels: tuple[int, ...] = quick_c,
    ) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            proc, port = start_server(exports[export], batching, threads, tmp)
            try:
                load(port, protos[kind], 1, 16)  # warm the server's threads
                for c in levels:
                    stats = load(port, protos[kind], c, max(config.requests, 4 * c))
                    row = {"group": group, "export": export, "kind": kind, "setting": label,
                           "batching": batching is not None, "concurrency": c, **stats,
                           "floor_p50_ms": floors[f"{export}/{kind}"]["p50_ms"]}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                stop_server(proc)

    for kind in ("known", "free"):
        measure("main", "own", kind, None, "no batching", levels=config.concurrency)
        measure("main", "own", kind, BATCHING, "batching", levels=config.concurrency)
    for export in ("big_scann", "big_brute_force"):
        measure("main", export, "known", None, "no batching")
        measure("main", export, "known", BATCHING, "batching")
    pair = paired(config, exports, kinds["known"], protos["known"])
    scale = scaling(config, exports["own"], protos["known"])
    tails = tail(config, exports["own"], protos["known"])
    if config.sweeps:
        for label, text in BATCHING_SWEEP.items():
            measure("batching sweep", "own", "known", text, label)
        for label, threads in THREAD_SWEEP.items():
            for kind in ("known", "free"):
                measure("thread sweep", "own", kind, BATCHING, label, threads)
    import tensorflow as tf

    return {
        "config": {**dataclasses.asdict(config), "work": work, "batching": BATCHING,
                   "host": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                           f"{platform.python_version()}, TensorFlow {tf.__version__}"},
        "index_search": search,
        "floors": floors,
        "rows": rows,
        "paired": pair,
        "scaling": scale,
        "tail": tails,
        "ratios": {**ratios(rows, floors, search, pair),
                   "batching_scaling_median": scale["median_ratio"],
                   "batching_scaling_min": scale["min_ratio"],
                   "tail_p99_over_p50_c1": {k: v["p99_over_p50"] for k, v in tails.items()}},
    }  # fmt: skip


def _row(rows: list[dict], **match: Any) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def ratios(rows: list[dict], floors: dict, search: dict, pair: dict) -> dict:
    """The issue's claims as figures of this run."""
    out: dict = {}
    for kind in ("known", "free"):
        for batching in (False, True):
            one = _row(rows, group="main", export="own", kind=kind, batching=batching,
                       concurrency=1)  # fmt: skip
            many = [r for r in rows if r["group"] == "main" and r["export"] == "own"
                    and r["kind"] == kind and r["batching"] == batching]  # fmt: skip
            if not one or not many:
                continue
            top = max(many, key=lambda r: r["concurrency"])
            tag = f"{kind}, {'batching' if batching else 'no batching'}"
            out[tag] = {
                "server_adds_p50_ms": round(one["p50_ms"] - floors[f"own/{kind}"]["p50_ms"], 3),
                "p99_over_p50_c1": round(one["p99_ms"] / one["p50_ms"], 2),
                f"qps_c{top['concurrency']}_over_c1": round(top["qps"] / one["qps"], 2),
                "errors": sum(r["errors"] for r in many),
            }
    own = _row(rows, group="main", export="own", kind="known", batching=True, concurrency=1)
    big = _row(rows, group="main", export="big_scann", kind="known", batching=True,
               concurrency=1)  # fmt: skip
    if own and big:
        out["big_scann_minus_own_p50_ms_c1"] = round(big["p50_ms"] - own["p50_ms"], 3)
    if pair:
        out["paired_c1"] = {k: v for k, v in pair.items() if k != "targets"}
    if search:
        out["index_search_speedup"] = search["speedup"]
        out["index_search_function_speedup"] = search["function_speedup"]
        out["index_recall_at_10"] = search["recall_at_10"]
    return out


def to_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# Serving latency (local gRPC server)",
        "",
        f"Model `{cfg['model_dir']}`; {cfg['batch']} queries per request, k={cfg['k']}, "
        f"{cfg['requests']} requests per row (at least 4 per client thread); {cfg['host']}. "
        "`known`: real users (profile, typed titles, history: texts the model has encoded); "
        "`free`: free text, no history (BERT runs). Floor: the same requests run in process "
        "through the session loader, one at a time.",
        "",
        "| export | queries | setting | concurrency | p50 ms | p99 ms | QPS | errors "
        "| floor p50 ms |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {"own": "own catalog, ScaNN", "big_scann": "1M items, ScaNN",
             "big_brute_force": "1M items, brute force"}  # fmt: skip
    for group in ("main", "batching sweep", "thread sweep"):
        selected = [r for r in result["rows"] if r["group"] == group]
        if not selected:
            continue
        if group != "main":
            lines += ["", f"**{group}** (own catalog)", "",
                      "| queries | setting | concurrency | p50 ms | p99 ms | QPS | errors |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in selected:
            if group == "main":
                lines.append(
                    f"| {names[r['export']]} | {r['kind']} | {r['setting']} | {r['concurrency']} "
                    f"| {r['p50_ms']} | {r['p99_ms']} | {r['qps']} | {r['errors']} "
                    f"| {r['floor_p50_ms']} |"
                )
            else:
                lines.append(
                    f"| {r['kind']} | {r['setting']} | {r['concurrency']} | {r['p50_ms']} "
                    f"| {r['p99_ms']} | {r['qps']} | {r['errors']} |"
                )
    pair = result.get("paired")
    if pair:
        lines += [
            "",
            f"**Paired at concurrency 1** (known text; all targets up at once, called in turn in "
            f"{cfg['paired_blocks']} rounds of {cfg['paired_block_requests']} requests; the echo "
            "is `benchmarks/grpc_echo.py`, a PredictionService that answers with one fixed "
            "response and runs no model)",
            "",
            "| target | p50 ms | p99 ms |",
            "| --- | ---: | ---: |",
            *(f"| {name} | {s['p50_ms']} | {s['p99_ms']} |" for name, s in pair["targets"].items()),
            "",
            f"The server adds {pair['server_adds_p50_ms']} ms over the floor, of which "
            f"{pair['transport_p50_ms']} ms is Python gRPC itself (the echo) and "
            f"{pair['server_adds_minus_transport_p50_ms']} ms the rest (our handler, its "
            f"hand-off to the session); batching adds {pair['batching_adds_p50_ms']} ms; the 1M "
            f"ScaNN export is {pair['big_scann_minus_own_p50_ms']} ms over the own catalog's.",
        ]
    scale = result.get("scaling")
    if scale:
        top = scale["concurrency"]
        lines += [
            "",
            f"**Batching's scaling, paired** (own catalog, known text, one batching server; each "
            f"round runs concurrency 1 then {top}, {cfg['scaling_requests']} requests each)",
            "",
            f"| round | QPS c1 | QPS c{top} | c{top} / c1 | errors |",
            "| ---: | ---: | ---: | ---: | ---: |",
            *(
                f"| {i + 1} | {r['qps_c1']} | {r[f'qps_c{top}']} | {r['ratio']}x | {r['errors']} |"
                for i, r in enumerate(scale["rounds"])
            ),  # fmt: skip
            "",
            f"Median c{top} / c1: {scale['median_ratio']}x, lowest round {scale['min_ratio']}x.",
        ]
    tails = result.get("tail")
    if tails:
        lines += [
            "",
            f"**Concurrency-1 tail** (own catalog, known text, {cfg['tail_requests']} requests "
            "per server, one client thread)",
            "",
            "| setting | p50 ms | p95 ms | p99 ms | p99 / p50 | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *(
                f"| {k} | {v['p50_ms']} | {v['p95_ms']} | {v['p99_ms']} | {v['p99_over_p50']}x "
                f"| {v['errors']} |"
                for k, v in tails.items()
            ),
        ]
    search = result["index_search"]
    if search:
        lines += [
            "",
            f"**{search['items']:,}-item index searched in process** ({search['queries']} real "
            f"query embeddings of users the export's leaf tuning did not see, one at a time, "
            f"the searches taking turns in blocks of 50 queries, top "
            f"{search['pool']}). Search ops called eagerly: ScaNN p50 {search['scann_p50_ms']} ms "
            f"(p99 {search['scann_p99_ms']}), brute force p50 {search['brute_force_p50_ms']} ms "
            f"(p99 {search['brute_force_p99_ms']}): {search['speedup']}x. Through a "
            f"`tf.function` as the export runs them: ScaNN {search['scann_function_p50_ms']} ms, "
            f"brute force {search['brute_force_function_p50_ms']} ms: "
            f"{search['function_speedup']}x (an empty `tf.function` call costs "
            f"{search['empty_function_p50_ms']} ms here). ScaNN recall@10 against brute force "
            f"{search['recall_at_10']} ({search['leaves']} leaves searched).",
        ]
    lines += ["", "Ratios of this run: `" + json.dumps(result["ratios"]) + "`", "",
              f"Batching parameters (\"batching\" rows): "
              f"`{BATCHING.strip().replace(chr(10), ' ')}`",
              ""]  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", required=True, help="trained model dir (python -m trainer.task)")
    p.add_argument("--data", default="", help="prepared data (default: the model's own)")
    p.add_argument("--work", default="", help="folder for the exports (reused when present)")
    p.add_argument("--out_dir", default=RESULTS)
    p.add_argument("--quick", action="store_true", help="200k items, fewer requests and levels")
    p.add_argument("--synthetic_items", type=int)
    p.add_argument("--requests", type=int, help="requests per row")
    p.add_argument("--concurrency", type=int, nargs="+")
    p.add_argument("--batch", type=int, help="queries per request")
    p.add_argument("--no_sweeps", action="store_true", help="skip the batching/thread sweeps")
    p.add_argument("--paired_blocks", type=int, help="rounds of the paired comparison")
    args = p.parse_args(argv)
    given = {"model_dir": args.model_dir, "data": args.data, "work": args.work,
             "out_dir": args.out_dir, "sweeps": not args.no_sweeps}  # fmt: skip
    for name in ("synthetic_items", "requests", "batch", "paired_blocks"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    if args.concurrency:
        given["concurrency"] = tuple(args.concurrency)
    return BenchConfig.quick(**given) if args.quick else BenchConfig(**given)


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
        config.validate()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

    result = run(config)
    for name, text in (("serving_latency.json", json.dumps(result, indent=2)),
                       ("serving_latency.md", to_markdown(result))):  # fmt: skip
        staging.write_text(os.path.join(config.out_dir, name), text)
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
