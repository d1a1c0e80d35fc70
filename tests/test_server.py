"""Tests of the local TF Serving-compatible server (serving/server.py) and client.

The models served are real exports: the export code's own RecommenderModule with hash-embedding
towers (``fake_export_factory`` in conftest.py), saved by ``save_export`` with its warm-up file,
as versions 1 and 2 (different embedding tables, so different answers), served by
`python -m serving.server` in a subprocess on 127.0.0.1. Expected answers come from the same
versions run through the session loader TF Serving uses (:mod:`serving.session_runner`); which
version answered is what the response's ``model_spec.version`` says. Servers are module-scoped:
each one costs a TensorFlow import (~5 s).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from common import contract
from serving.batching import (
    Batcher,
    BatchingOptions,
    batch_key_and_size,
    parse_batching_parameters,
)
from serving.client import ServingClient, format_table
from serving.client import main as client_main
from serving.errors import Code, ServingError
from serving.model_config import VersionPolicy, list_versions, parse_model_config_text
from serving.session_runner import SessionModel

REPO = Path(__file__).resolve().parents[1]
MAX_MESSAGE_BYTES = 1 << 20
MAX_ROWS = 64
MAX_K = 20  # the fake export's default
REST_THREADS = 2
STARTUP_TIMEOUT_S = 120

Expected = Callable[[int, str, dict[str, np.ndarray]], dict[str, np.ndarray]]


def make_query(batch: int, seed: int = 0, k: int = 5, history: int = 2) -> dict[str, np.ndarray]:
    """Retrieve inputs for `batch` users (numpy, as the contract's dtypes)."""
    q: dict[str, np.ndarray] = {
        "user_id": np.array([f"user_{seed}_{i}".encode() for i in range(batch)], dtype=object),
        "user_age": np.array([b"25"] * batch, dtype=object),
        "user_gender": np.array([b"F"] * batch, dtype=object),
        "user_occupation": np.array([b"engineer"] * batch, dtype=object),
        "query_text": np.array([f"query {seed % 7}".encode()] * batch, dtype=object),
        "history": np.array([[b"1", b""][:history]] * batch, dtype=object).reshape(batch, history),
    }
    q["k"] = np.full([batch], k, dtype=np.int32)
    q["exclude_item_ids"] = np.array([[b"3", b""]] * batch, dtype=object).reshape(batch, 2)
    q["diversity"] = np.full([batch], 0.5, dtype=np.float32)
    return q


def rank_query(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rank_inputs = contract.SIGNATURES[contract.RANK].inputs
    q = {k: v for k, v in make_query(batch, seed).items() if k in rank_inputs}
    q["candidate_item_ids"] = np.array([[b"2", b"5", b"9"]] * batch, dtype=object)
    return q


def assert_outputs_match(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        if value.dtype == object:
            np.testing.assert_array_equal(np.asarray(got[name]).astype(bytes), value.astype(bytes))
        else:
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-4)


def to_request(inputs: dict[str, np.ndarray], model: str = "recs", **spec: Any) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def from_response(response: Any) -> dict[str, np.ndarray]:
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def to_json(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    def conv(v: np.ndarray) -> Any:
        if v.dtype == object:
            return np.vectorize(lambda b: b.decode(), otypes=[object])(v).tolist()
        return v.tolist()

    return {k: conv(v) for k, v in inputs.items()}


# -- server processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m serving.server` in a subprocess; collects its JSON log lines."""

    def __init__(self, args: list[str]) -> None:
        self.rest_port = free_port()
        cmd = [sys.executable, "-m", "serving.server", "--port", "0"]
        cmd += ["--rest_api_port", str(self.rest_port), *args]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._started = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._started.wait(STARTUP_TIMEOUT_S) or self.proc.poll() is not None:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.raw[-40:]))
        start = next(e for e in self.events if e.get("event") == "server_start")
        self.grpc_port = start["grpc_port"]
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.rest = f"http://127.0.0.1:{self.rest_port}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.raw.append(line)
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.events.append(event)
                if event.get("event") == "server_start":
                    self._started.set()

    def terminate(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def copy_version(source: str | Path, base: Path, version: int) -> None:
    """Copies an export version to a temp name and renames it into place, as exporters do."""
    tmp = base / f".tmp-{version}"
    shutil.copytree(source, tmp)
    os.rename(tmp, base / str(version))


@pytest.fixture(scope="module")
def base_path(
    fake_export_base: str, fake_export_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``<tmp>/recs`` with versions 1 (the session's fake export, seed 0) and 2 (seed 2)."""
    base = tmp_path_factory.mktemp("models") / "recs"
    base.mkdir()
    copy_version(os.path.join(fake_export_base, "1"), base, 1)
    fake_export_factory(str(base.parent), model_name="recs", version=2, seed=2)
    return base


@pytest.fixture(scope="module")
def expected(base_path: Path) -> Iterator[Expected]:
    """``expected(version, signature, inputs)``: that version's outputs through the session
    loader TF Serving uses (each version loaded once, on first use)."""
    models: dict[int, SessionModel] = {}

    def run(version: int, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if version not in models:
            models[version] = SessionModel(str(base_path / str(version)))
        return models[version].run(signature, inputs)

    yield run
    for model in models.values():
        model.close()


@pytest.fixture(scope="module")
def server(base_path: Path) -> Iterator[ServerProcess]:
    config = base_path.parent / "models.config"
    config.write_text(
        f"""
model_config_list {{
  config {{ name: "recs" base_path: "{base_path}" model_platform: "tensorflow" }}
  config {{
    name: "recs_pinned" base_path: "{base_path}" model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 2 }}
  }}
}}
"""
    )
    monitoring = base_path.parent / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }\n")
    proc = ServerProcess(
        [
            "--model_config_file",
            str(config),
            "--monitoring_config_file",
            str(monitoring),
            "--enable_batching=false",
            "--rest_api_num_threads",
            str(REST_THREADS),
            "--max_batch_size_per_request",
            str(MAX_ROWS),
            "--file_system_poll_wait_seconds",
            "0.2",
            "--max_num_load_retries",
            "0",
            "--grpc_max_threads",
            "16",
            "--grpc_channel_arguments",
            f"grpc.max_receive_message_length={MAX_MESSAGE_BYTES}",
        ]
    )
    yield proc
    assert proc.terminate() == 0
    assert not any("Traceback" in line for line in proc.raw), "".join(proc.raw[-60:])


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(server.target) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_stub(server: ServerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(server.target) as channel:
        yield model_service_pb2_grpc.ModelServiceStub(channel)


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


def http(method: str, url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# -- gRPC ---------------------------------------------------------------------------------------


def test_grpc_retrieve_and_rank(stub: Any, expected: Expected) -> None:
    inputs = make_query(3, seed=1)
    response = stub.Predict(to_request(inputs), timeout=30)
    version = response.model_spec.version.value
    assert response.model_spec.name == "recs"
    assert response.model_spec.signature_name == "serving_default"
    assert version in (2, 3)
    got = from_response(response)
    assert_outputs_match(got, expected(version, contract.RETRIEVE, inputs))
    assert got["item_ids"].shape == (3, 5)
    assert b"3" not in got["item_ids"]  # excluded

    rank_inputs = rank_query(2)
    response = stub.Predict(to_request(rank_inputs, signature_name="rank"), timeout=30)
    assert response.model_spec.signature_name == "rank"
    want = expected(response.model_spec.version.value, contract.RANK, rank_inputs)
    assert_outputs_match(from_response(response), want)

    request = to_request(inputs)
    request.output_filter.append("scores")
    assert sorted(stub.Predict(request, timeout=30).outputs) == ["scores"]


def test_grpc_versions_and_labels(stub: Any, expected: Expected) -> None:
    inputs = make_query(2, seed=2)
    for spec, version in (({"version": 1}, 1), ({"version_label": "canary"}, 2), ({}, 2)):
        response = stub.Predict(to_request(inputs, "recs_pinned", **spec), timeout=30)
        assert response.model_spec.version.value == version
        assert_outputs_match(from_response(response), expected(version, contract.RETRIEVE, inputs))


def test_grpc_metadata_and_status(stub: Any, model_stub: Any) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "recs_pinned"
    request.model_spec.version.value = 1
    response = stub.GetModelMetadata(request, timeout=30)
    assert response.model_spec.name == "recs_pinned"
    assert response.model_spec.version.value == 1
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sig_map)
    retrieve = sig_map.signature_def["serving_default"]
    contract_retrieve = contract.SIGNATURES[contract.RETRIEVE]
    assert set(retrieve.inputs) == set(contract_retrieve.inputs)
    assert retrieve.inputs["k"].dtype == tf.int32.as_datatype_enum
    assert len(retrieve.inputs["history"].tensor_shape.dim) == 2
    assert (
        set(retrieve.outputs) == set(contract_retrieve.outputs) == {"item_ids", "scores", "titles"}
    )
    assert set(sig_map.signature_def["rank"].outputs) == {"ratings"}
    assert set(sig_map.signature_def) >= set(contract.SIGNATURES)
    assert retrieve.method_name == "tensorflow/serving/predict"

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "recs_pinned"
    status = model_stub.GetModelStatus(status_request, timeout=30)
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (2, get_model_status_pb2.ModelVersionStatus.AVAILABLE),
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE),
    ]
    assert all(s.status.error_code == 0 for s in status.model_version_status)


# -- REST ---------------------------------------------------------------------------------------


def test_rest_columnar_and_row_formats(server: ServerProcess, expected: Expected) -> None:
    inputs = make_query(2, seed=3)
    code, body = http(
        "POST", f"{server.rest}/v1/models/recs_pinned:predict", {"inputs": to_json(inputs)}
    )
    assert code == 200, body
    want = expected(2, contract.RETRIEVE, inputs)
    assert body["outputs"]["item_ids"] == want["item_ids"].astype(str).tolist()
    assert body["outputs"]["titles"] == want["titles"].astype(str).tolist()
    np.testing.assert_allclose(body["outputs"]["scores"], want["scores"], rtol=1e-6)

    # Row format: one object per instance, k and diversity included (per query).
    rows = [{name: value[i] for name, value in to_json(inputs).items()} for i in range(2)]
    code, body = http(
        "POST", f"{server.rest}/v1/models/recs_pinned/versions/1:predict", {"instances": rows}
    )
    assert code == 200, body
    want = expected(1, contract.RETRIEVE, inputs)
    assert [p["item_ids"] for p in body["predictions"]] == want["item_ids"].astype(str).tolist()
    np.testing.assert_allclose([p["scores"] for p in body["predictions"]], want["scores"], 1e-6)

    # Single-output signature: predictions are bare rows; b64 string input accepted.
    rank_inputs = to_json(rank_query(1))
    rank_inputs["user_id"] = [{"b64": base64.b64encode(b"user_0_0").decode()}]
    code, body = http(
        "POST",
        f"{server.rest}/v1/models/recs_pinned/labels/stable:predict",
        {"signature_name": "rank", "inputs": rank_inputs},
    )
    assert code == 200, body
    np.testing.assert_allclose(
        body["outputs"], expected(1, contract.RANK, rank_query(1))["ratings"], 1e-6
    )


def test_rest_status_and_metadata(server: ServerProcess) -> None:
    code, body = http("GET", f"{server.rest}/v1/models/recs_pinned/versions/1")
    assert code == 200
    assert body == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    code, body = http("GET", f"{server.rest}/v1/models/recs_pinned/labels/canary")
    assert code == 200 and body["model_version_status"][0]["version"] == "2"

    code, body = http("GET", f"{server.rest}/v1/models/recs_pinned/metadata")
    assert code == 200
    assert body["model_spec"] == {"name": "recs_pinned", "signature_name": "", "version": "2"}
    sigs = body["metadata"]["signature_def"]["signature_def"]
    assert sigs["serving_default"]["inputs"]["k"]["dtype"] == "DT_INT32"
    assert sigs["rank"]["outputs"]["ratings"]["dtype"] == "DT_FLOAT"


# -- bad requests ---------------------------------------------------------------------------------


def _bad_cases() -> list[tuple[str, Any, grpc.StatusCode]]:
    good = make_query(2)
    cases: list[tuple[str, Any, grpc.StatusCode]] = [
        ("unknown model", to_request(good, "nope"), grpc.StatusCode.NOT_FOUND),
        ("unknown version", to_request(good, "recs_pinned", version=7), grpc.StatusCode.NOT_FOUND),
        (
            "unknown label",
            to_request(good, "recs_pinned", version_label="beta"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        # TF Serving answers FAILED_PRECONDITION for an unknown signature key over gRPC.
        (
            "wrong signature",
            to_request(good, signature_name="nope"),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
    ]
    renamed = dict(good)
    renamed["userid"] = renamed.pop("user_id")
    cases.append(("wrong input name", to_request(renamed), grpc.StatusCode.INVALID_ARGUMENT))
    missing = {k: v for k, v in good.items() if k != "history"}
    cases.append(("missing input", to_request(missing), grpc.StatusCode.INVALID_ARGUMENT))
    wrong_dtype = dict(good, k=np.array([5, 5], dtype=np.int64))
    cases.append(("wrong dtype", to_request(wrong_dtype), grpc.StatusCode.INVALID_ARGUMENT))
    wrong_shape = dict(good, history=np.array([b"1", b"2"], dtype=object))
    cases.append(("wrong rank", to_request(wrong_shape), grpc.StatusCode.INVALID_ARGUMENT))
    empty = make_query(0)
    empty["history"] = np.zeros((0, 2), dtype=object)
    empty["exclude_item_ids"] = np.zeros((0, 2), dtype=object)
    cases.append(("empty batch", to_request(empty), grpc.StatusCode.INVALID_ARGUMENT))
    too_big = dict(good, k=np.array([50, 50], dtype=np.int32))  # top_k's own error
    cases.append(("error inside graph", to_request(too_big), grpc.StatusCode.INVALID_ARGUMENT))
    huge = dict(good, query_text=np.array([b"x" * (MAX_MESSAGE_BYTES + 10)] * 2, dtype=object))
    cases.append(("oversize", to_request(huge), grpc.StatusCode.RESOURCE_EXHAUSTED))
    return cases


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_grpc_bad_requests(stub: Any, case: tuple[str, Any, grpc.StatusCode]) -> None:
    _, request, code = case
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    assert info.value.details()


def test_grpc_error_messages_and_unimplemented(stub: Any, model_stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(to_request(make_query(1), "nope"), timeout=30)
    assert info.value.details() == "Servable not found for request: Latest(nope)"
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(to_request(make_query(1), "recs_pinned", version=7), timeout=30)
    assert info.value.details() == "Servable not found for request: Specific(recs_pinned, 7)"
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(classification_pb2.ClassificationRequest(), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as info:
        model_stub.GetModelStatus(status_request, timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # Still serving after all of that.
    assert stub.Predict(to_request(make_query(1)), timeout=30).outputs


def test_rest_bad_requests(server: ServerProcess) -> None:
    good = to_json(make_query(1))
    url = f"{server.rest}/v1/models"
    cases = [
        ("POST", f"{url}/nope:predict", {"inputs": good}, 404),
        ("POST", f"{url}/recs_pinned/versions/9:predict", {"inputs": good}, 404),
        ("POST", f"{url}/recs:predict", {"signature_name": "nope", "inputs": good}, 400),
        ("POST", f"{url}/recs:predict", {"inputs": dict(good, k="five")}, 400),
        ("POST", f"{url}/recs:predict", {"inputs": dict(good, history=["a"])}, 400),
        ("POST", f"{url}/recs:predict", {"instances": [], "inputs": good}, 400),
        ("POST", f"{url}/recs:classify", {"examples": []}, 501),
        ("GET", f"{url}/nope", None, 404),
        ("GET", f"{server.rest}/healthz", None, 404),
    ]
    for method, target, body, status in cases:
        code, answer = http(method, target, body)
        assert code == status, (target, body, answer)
        assert isinstance(answer.get("error"), str) and answer["error"]
    code, answer = http("POST", f"{url}/recs:predict", raw=b"{not json")
    assert code == 400 and "JSON" in answer["error"]
    for size in (MAX_MESSAGE_BYTES + 1, 3 * MAX_MESSAGE_BYTES):  # drained, answered in JSON
        code, answer = http("POST", f"{url}/recs:predict", raw=b" " * size)
        assert code == 429 and "larger than max" in answer["error"]


def test_rest_refuses_deep_json_and_non_integral_ints(server: ServerProcess) -> None:
    url = f"{server.rest}/v1/models/recs:predict"
    good = to_json(make_query(1))
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    code, answer = http("POST", url, raw=deep)
    assert code == 400 and "nested deeper" in answer["error"]
    code, answer = http("POST", url, {"inputs": dict(good, k=[10.7])})
    assert code == 400 and "not an integer" in answer["error"] and "10.7" in answer["error"]
    code, answer = http("POST", url, {"inputs": dict(good, k=[True])})
    assert code == 400 and "not an integer" in answer["error"]
    code, body = http("POST", url, {"inputs": dict(good, k=[4.0])})  # an integer, as TF Serving
    assert code == 200 and len(body["outputs"]["item_ids"][0]) == 4


def test_request_rows_are_bounded(server: ServerProcess, stub: Any) -> None:
    big = make_query(MAX_ROWS + 1)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(to_request(big), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"limit of {MAX_ROWS}" in info.value.details()
    code, answer = http("POST", f"{server.rest}/v1/models/recs:predict", {"inputs": to_json(big)})
    assert code == 429 and "--max_batch_size_per_request" in answer["error"]
    assert stub.Predict(to_request(make_query(MAX_ROWS)), timeout=30).outputs


def test_half_sent_requests_do_not_starve_rest(server: ServerProcess, expected: Expected) -> None:
    """Many more stalled connections than REST workers; good requests still get answers."""
    host, port = "127.0.0.1", int(server.rest.rsplit(":", 1)[1])
    stalled = []
    try:
        for i in range(8 * REST_THREADS):
            sock = socket.create_connection((host, port), timeout=30)
            if i % 2:  # headers only, the announced body never comes
                sock.sendall(
                    b"POST /v1/models/recs:predict HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Length: 1000\r\n\r\n{"
                )
            else:  # half the headers
                sock.sendall(b"POST /v1/models/recs:predict HTTP/1.1\r\nHost:")
            stalled.append(sock)
        inputs = make_query(2, seed=11)
        for _ in range(3):
            code, body = http(
                "POST", f"{server.rest}/v1/models/recs_pinned:predict", {"inputs": to_json(inputs)}
            )
            assert code == 200, body
            want = expected(2, contract.RETRIEVE, inputs)
            assert body["outputs"]["item_ids"] == want["item_ids"].astype(str).tolist()
    finally:
        for sock in stalled:
            sock.close()


def test_prometheus_metrics(server: ServerProcess, stub: Any) -> None:
    stub.Predict(to_request(make_query(1), "recs_pinned"), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Predict(to_request(make_query(1), "recs_pinned", signature_name="nope"), timeout=30)
    http("POST", f"{server.rest}/v1/models/recs_pinned:predict", {"inputs": to_json(make_query(1))})
    text = http_text(f"{server.rest}/monitoring/prometheus/metrics")
    ok = 'model_name="recs_pinned",signature_name="serving_default",status="OK"'
    assert f':tensorflow:serving:request_count{{entrypoint="GRPC",{ok}}}' in text
    assert f':tensorflow:serving:request_count{{entrypoint="REST",{ok}}}' in text
    assert 'signature_name="nope",status="FAILED_PRECONDITION"' in text
    assert f':tensorflow:serving:request_latency_bucket{{entrypoint="GRPC",{ok},le="+Inf"}}' in text
    assert "# TYPE :tensorflow:serving:request_latency histogram" in text


def test_versions_replay_their_warmup_file(server: ServerProcess) -> None:
    loads = [e for e in server.events if e.get("event") == "load" and e.get("model") == "recs"]
    # The exporter's warm-up file: one request per signature of the contract.
    assert loads and all(e["warmup_requests"] == len(contract.SIGNATURES) for e in loads)


# -- load -----------------------------------------------------------------------------------------


def test_concurrent_clients(server: ServerProcess, expected: Expected) -> None:
    failures: list[str] = []
    checked = [0]
    lock = threading.Lock()

    def worker(worker_id: int) -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for i in range(50):
                inputs = make_query(1 + i % 3, seed=worker_id * 100 + i)
                try:
                    response = stub.Predict(to_request(inputs, "recs_pinned"), timeout=60)
                    assert_outputs_match(
                        from_response(response), expected(2, contract.RETRIEVE, inputs)
                    )
                    with lock:
                        checked[0] += 1
                except Exception as exc:  # collected, asserted below
                    failures.append(f"{worker_id}/{i}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]
    assert checked[0] == 400


# -- client ---------------------------------------------------------------------------------------


def test_client_api_and_cli(
    server: ServerProcess, expected: Expected, capsys: pytest.CaptureFixture[str]
) -> None:
    with ServingClient(server.target, "recs_pinned", timeout_s=30) as client:
        meta = client.metadata()
        assert set(meta) == set(contract.SIGNATURES)
        assert meta["serving_default"]["inputs"]["history"] == {
            "dtype": "DT_STRING",
            "shape": [-1, -1],
            "name": "serving_default_history:0",
        }
        assert [s["version"] for s in client.status()] == [2, 1]

        queries = [
            {"user_id": "user_9_0", "user_age": 25, "query_text": "query 2", "history": ["1"]},
            {"user_id": "user_9_1", "user_age": 31, "query_text": "query 2"},
        ]
        result = client.retrieve(queries, k=4, exclude_item_ids=[["3"], []], diversity=0.5)
        # The client fills defaults for inputs the queries lack (gender, occupation, history).
        inputs = {
            "user_id": np.array([b"user_9_0", b"user_9_1"], dtype=object),
            "user_age": np.array([b"25", b"31"], dtype=object),
            "user_gender": np.array([b"", b""], dtype=object),
            "user_occupation": np.array([b"", b""], dtype=object),
            "query_text": np.array([b"query 2", b"query 2"], dtype=object),
            "history": np.array([[b"1"], [b""]], dtype=object),
            "k": np.array([4, 4], np.int32),
            "exclude_item_ids": np.array([[b"3"], [b""]], dtype=object),
            "diversity": np.array([0.5, 0.5], np.float32),
        }
        want = expected(2, contract.RETRIEVE, inputs)
        assert result["item_ids"].tolist() == want["item_ids"].astype(str).tolist()
        np.testing.assert_allclose(result["scores"], want["scores"], rtol=1e-5)
        assert "3" not in result["item_ids"][0]

        ratings = client.rank(queries, [["2", "5"], ["9", "10"]])
        assert ratings.shape == (2, 2)
        raw = client.predict(inputs, version=1)
        assert_outputs_match(raw, expected(1, contract.RETRIEVE, inputs))
        assert "rank" in format_table(result)

    assert client_main(
        ["--server", server.target, "--model", "recs_pinned", "--k", "3",
         "--input", "user_id=user_1", "--input", "history=1,2"]
    ) == 0  # fmt: skip
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "item_id" in lines[0] and "title" in lines[0] and len(lines) == 4
    assert all(line.split()[1].isdigit() and len(line.split()) > 3 for line in lines[1:])


def test_query_rows_from_data_exclude_each_users_train_items(
    server: ServerProcess, tiny_data_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m trainer.queries` writes named users' query rows from prepared data (profile,
    train history, train items); `serving.client --query-json` keeps each row's exclusions."""
    from trainer import queries

    rows_file = tmp_path / "users.json"
    argv = ["--data", tiny_data_dir, "--split", "p2", "--users", "1", "5"]
    assert queries.main([*argv, "--output", str(rows_file)]) == 0
    rows = json.loads(rows_file.read_text())
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [f"user {row['user_id']}: {row['query_text']}" for row in rows]
    assert [row["user_id"] for row in rows] == ["1", "5"]
    for row in rows:
        assert set(row) == {*contract.QUERY_FEATURES, contract.HISTORY, contract.EXCLUDE_ITEM_IDS}
        assert row[contract.EXCLUDE_ITEM_IDS] and set(row[contract.HISTORY]) <= set(
            row[contract.EXCLUDE_ITEM_IDS]
        )
    assert queries.main([*argv[:4], "--users", "nobody", "--output", str(rows_file)]) == 2
    assert "unknown user id(s)" in capsys.readouterr().err

    k = MAX_K
    client_argv = ["--server", server.target, "--model-name", "recs_pinned",
                   "--query-json", str(rows_file), "--k", str(k)]  # fmt: skip
    assert client_main(client_argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    blocks = [i for i, line in enumerate(out) if line.startswith("query ")]
    assert len(blocks) == len(rows)
    for row, start in zip(rows, blocks, strict=True):
        shown = [line.split()[1] for line in out[start + 2 : start + 2 + k]]
        assert len(shown) == k and not set(shown) & set(row[contract.EXCLUDE_ITEM_IDS])
    # --exclude replaces the rows' own exclusions.
    assert client_main([*client_argv, "--exclude", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    shown = {line.split()[1] for line in out if line[:4].strip().isdigit()}
    assert "1" not in shown and shown & {i for row in rows for i in row[contract.EXCLUDE_ITEM_IDS]}


# -- lifecycle ----------------------------------------------------------------------------------


def _wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_hot_swap_without_failures(
    server: ServerProcess, base_path: Path, stub: Any, expected: Expected
) -> None:
    results: list[tuple[int, bool]] = []
    errors: list[str] = []
    stop = threading.Event()
    inputs = make_query(2, seed=5)
    # Version 3 is a copy of version 1, whose answers differ from version 2's.
    want = {2: expected(2, contract.RETRIEVE, inputs), 3: expected(1, contract.RETRIEVE, inputs)}
    assert not np.array_equal(want[2]["item_ids"], want[3]["item_ids"])

    def query_loop() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                try:
                    response = stub.Predict(to_request(inputs), timeout=30)
                    version = response.model_spec.version.value
                    assert_outputs_match(from_response(response), want[version])
                    results.append((version, True))
                except Exception as exc:
                    errors.append(repr(exc))

    thread = threading.Thread(target=query_loop)
    thread.start()
    try:
        _wait_for(lambda: len(results) >= 5, 30, "first answers")
        copy_version(base_path / "1", base_path, 3)
        _wait_for(lambda: results and results[-1][0] == 3, 60, "version 3 to serve")
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors[:5]
    versions = [v for v, _ in results]
    assert versions[0] == 2 and versions[-1] == 3
    assert versions == sorted(versions)  # switched once, never back

    with ServingClient(server.target, "recs", timeout_s=30) as client:
        states = {s["version"]: s["state"] for s in client.status()}
        assert states == {3: "AVAILABLE", 2: "END"}
        # A broken version is logged and skipped; temp folders are ignored.
        (base_path / "4").mkdir()
        (base_path / "4" / "saved_model.pb").write_bytes(b"not a saved model")
        for name in (".tmp-5", "5.tmp"):
            (base_path / name).mkdir()
            (base_path / name / "saved_model.pb").write_bytes(b"")
        _wait_for(
            lambda: any(s["version"] == 4 and s["state"] == "END" for s in client.status()),
            30,
            "version 4 to fail",
        )
        status = {s["version"]: s for s in client.status()}
        assert status[4]["error_code"] != 0 and status[4]["error_message"]
        assert status[3]["state"] == "AVAILABLE" and 5 not in status
        response = stub.Predict(to_request(inputs), timeout=30)
        assert response.model_spec.version.value == 3  # still version 3
        assert_outputs_match(from_response(response), want[3])
    assert any(e.get("event") == "load_failure" and e.get("version") == 4 for e in server.events)
    assert any(e.get("event") == "unload" and e.get("version") == 2 for e in server.events)


# -- batching -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batching_server(base_path: Path, server: ServerProcess) -> Iterator[ServerProcess]:
    params = base_path.parent / "batching.config"
    params.write_text(
        "max_batch_size { value: 4 }\n"
        "batch_timeout_micros { value: 1000000 }\n"
        "num_batch_threads { value: 2 }\n"
        "max_enqueued_batches { value: 100 }\n"
    )
    proc = ServerProcess(
        [
            "--model_name",
            "recs",
            "--model_base_path",
            str(base_path),
            "--enable_batching=true",
            "--batching_parameters_file",
            str(params),
            "--max_num_load_retries",
            "0",
            "--file_system_poll_wait_seconds",
            "0",
        ]
    )
    yield proc
    proc.terminate()


def test_batching_gives_same_answers(batching_server: ServerProcess, expected: Expected) -> None:
    failures: list[str] = []

    def worker(worker_id: int) -> None:
        with grpc.insecure_channel(batching_server.target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for i in range(6):
                inputs = make_query(1 + (worker_id + i) % 2, seed=1000 + worker_id * 10 + i)
                try:
                    response = stub.Predict(to_request(inputs), timeout=60)
                    version = response.model_spec.version.value
                    assert_outputs_match(
                        from_response(response), expected(version, contract.RETRIEVE, inputs)
                    )
                except Exception as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]


def test_batching_refuses_what_tf_serving_batching_refuses(batching_server: ServerProcess) -> None:
    inputs = make_query(2, seed=7)
    inputs["k"] = np.array([5, 5, 5], np.int32)  # fits the signature, not a batch
    with grpc.insecure_channel(batching_server.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(to_request(inputs), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "Batching Run() input tensors must have equal 0th-dimension size"


def test_sigterm_finishes_in_flight_requests(
    batching_server: ServerProcess, expected: Expected
) -> None:
    # Three 1-row requests sit in the batch queue (max 4 rows, 1 s timeout) when SIGTERM lands.
    done: list[tuple[float, Any]] = []

    def one(seed: int) -> None:
        with grpc.insecure_channel(batching_server.target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            inputs = make_query(1, seed=seed)
            try:
                response = stub.Predict(to_request(inputs), timeout=60)
                version = response.model_spec.version.value
                assert_outputs_match(
                    from_response(response), expected(version, contract.RETRIEVE, inputs)
                )
                done.append((time.monotonic(), None))
            except Exception as exc:
                done.append((time.monotonic(), exc))

    threads = [threading.Thread(target=one, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    sent_at = time.monotonic()
    batching_server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert batching_server.proc.wait(60) == 0
    assert [exc for _, exc in done] == [None, None, None]
    assert all(t >= sent_at for t, _ in done)  # they were still in flight at SIGTERM
    assert any(e.get("event") == "server_stopped" for e in batching_server.events)
    stats = next(e for e in batching_server.events if e.get("event") == "batching_stats")
    assert stats["rows"] > stats["batches"] and stats["max_rows"] > 1  # requests were merged


# -- in-process units -----------------------------------------------------------------------------


def test_batcher_merges_and_splits() -> None:
    calls: list[int] = []

    def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(batch["x"]))
        time.sleep(0.05)
        return {"y": batch["x"] * 2 + batch["s"]}

    batcher = Batcher(BatchingOptions(max_batch_size=8, batch_timeout_micros=200_000,
                                      num_batch_threads=1))  # fmt: skip
    results: dict[int, np.ndarray] = {}

    def submit(i: int) -> None:
        inputs = {"x": np.full((2,), i), "s": np.ones((2,), int)}
        key, size = batch_key_and_size("m", inputs)
        results[i] = batcher.submit(key, inputs, size, run)["y"]

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    batcher.stop()
    assert {i: r.tolist() for i, r in results.items()} == {i: [2 * i + 1] * 2 for i in range(4)}
    assert calls == [8]  # one merged call
    with pytest.raises(ServingError) as info:
        Batcher(BatchingOptions(max_batch_size=2)).submit("k", {"x": np.zeros(3)}, 3, run)
    assert info.value.code == Code.INVALID_ARGUMENT
    # Different trailing shapes never share a batch; what TF Serving's batching refuses is
    # refused with its messages.
    k1 = batch_key_and_size("m", {"x": np.zeros((2, 3))})
    k2 = batch_key_and_size("m", {"x": np.zeros((2, 4))})
    assert k1[1] == k2[1] == 2 and k1[0] != k2[0]
    for inputs, message in (
        ({"x": np.zeros(2), "s": np.array(1)}, "must have at least one dimension"),
        ({"x": np.zeros(2), "s": np.zeros(3)}, "must have equal 0th-dimension size"),
    ):
        with pytest.raises(ServingError, match=message) as info:
            batch_key_and_size("m", inputs)
        assert info.value.code == Code.INVALID_ARGUMENT


def test_batcher_without_timeout_runs_a_lone_request_at_once_and_batches_under_load() -> None:
    """batch_timeout_micros 0, one batch thread (serving/configs/batching.config): a lone
    request is never held back, and what queues while a batch runs becomes the next batch."""
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(batch["x"]))
        if len(calls) == 1:
            started.set()
            release.wait(10)
        return {"y": batch["x"] + 1}

    batcher = Batcher(BatchingOptions(max_batch_size=64, batch_timeout_micros=0,
                                      num_batch_threads=1))  # fmt: skip
    results: dict[int, list[int]] = {}

    def submit(i: int, rows: int) -> None:
        inputs = {"x": np.full((rows,), i)}
        key, size = batch_key_and_size("m", inputs)
        results[i] = batcher.submit(key, inputs, size, run)["y"].tolist()

    threads = [threading.Thread(target=submit, args=(0, 1))]
    threads[0].start()
    assert started.wait(10)  # ran with nothing else queued: no timeout to wait out
    threads += [threading.Thread(target=submit, args=(i, 2)) for i in range(1, 6)]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # all five queued behind the running batch
        with batcher._cv:
            if sum(q.size for q in batcher._queues.values()) == 10:
                break
        time.sleep(0.005)
    release.set()
    for t in threads:
        t.join(10)
    batcher.stop()
    assert calls == [1, 10]
    assert results == {0: [1], **{i: [i + 1] * 2 for i in range(1, 6)}}


def test_tensor_converters_match_tensorflows() -> None:
    """The server's fast TensorProto <-> numpy converters give what TF's own give."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    from serving.tensors import array_to_tensor, tensor_to_array

    cases = [
        np.array([b"a", b"bc"], object), np.array([[b"1"] * 5] * 2, object),
        np.array([3, 4], np.int32), np.array([0.5, 1], np.float32), np.array([1, 2], np.int64),
        np.array(7, np.int32), np.array([], np.float32), np.array([1.5, 2], np.float64),
        np.array(["x", "y"]),
    ]  # fmt: skip
    for value in cases:
        proto = tf.make_tensor_proto(value)
        got, want = tensor_to_array(proto), tf.make_ndarray(proto)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tolist() == want.tolist()
        assert got.flags.writeable  # frombuffer over the request's bytes would be read-only
        assert array_to_tensor(value) == proto
        assert array_to_tensor(value, tensor_pb2.TensorProto()) == proto  # filled in place
    repeated = tensor_pb2.TensorProto(dtype=7, string_val=[b"z"])  # one value for 3 slots
    repeated.tensor_shape.dim.add(size=3)
    listed = tensor_pb2.TensorProto(dtype=1, float_val=[1.0, 2.0])
    listed.tensor_shape.dim.add(size=2)
    for proto in (repeated, listed):
        assert tensor_to_array(proto).tolist() == tf.make_ndarray(proto).tolist()


def test_config_parsing_and_version_listing(tmp_path: Path) -> None:
    opts = parse_batching_parameters("max_batch_size { value: 16 } num_batch_threads { value: 3 }")
    assert (opts.max_batch_size, opts.num_batch_threads, opts.batch_timeout_micros) == (16, 3, 0)
    with pytest.raises(ValueError):
        parse_batching_parameters("max_batch_size: 3")
    configs = parse_model_config_text(
        'model_config_list { config { name: "a" base_path: "/m/a" '
        "model_version_policy { latest { num_versions: 2 } } } }"
    )
    assert configs[0].policy == VersionPolicy(kind="latest", num_versions=2)
    assert configs[0].policy.select([1, 5, 3]) == {5, 3}
    assert VersionPolicy(kind="specific", versions=(1, 9)).select([1, 2]) == {1}
    for name in ("1", "12", ".tmp-3", "3.tmp", "x"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a version")
    assert sorted(list_versions(str(tmp_path))) == [1, 12]


def test_flag_validation() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, message in (
        (["--model_base_path", "/x", "--port", "70000"], "--port must be in"),
        ([], "one of --model_base_path or --model_config_file"),
        (["--model_base_path", "/x", "--grpc_max_threads", "0"], "--grpc_max_threads"),
        (["--model_base_path", "/x", "--batching_parameters_file", "/nope"], "--enable_batching"),
        (["--model_base_path", "/x", "--enable_batching=maybe"], "expected true or false"),
        (["--model_base_path", "/x", "--monitoring_config_file", "/nope"], "monitoring_config"),
        (["--model_base_path", "/x", "--rest_api_timeout_in_ms", "0"], "rest_api_timeout_in_ms"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "serving.server", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr


def test_corrupt_version_fails_fast_and_newer_versions_load(tmp_path: Path) -> None:
    """A failing version is END with its error; its retries wait for later polls (no sleep
    under the poll lock), so a newer version loads in the same poll."""
    from serving.model_config import ModelConfig
    from serving.model_manager import ServableManager
    from serving.servable import LoaderOptions, Servable

    for version in (1, 2, 3):
        (tmp_path / str(version)).mkdir()
        (tmp_path / str(version) / "saved_model.pb").write_bytes(b"x")
    attempts: list[int] = []

    def loader(name: str, version: int, path: str, options: Any) -> Servable:
        attempts.append(version)
        if version == 2:
            raise ValueError("garbage saved_model.pb")
        return Servable(name, version, path, {}, None)

    policy = VersionPolicy(kind="latest", num_versions=2)
    manager = ServableManager(
        [ModelConfig("m", str(tmp_path), policy)],
        loader=loader,
        options=LoaderOptions(max_num_load_retries=3, load_retry_interval_micros=3_600_000_000),
    )
    poll = threading.Thread(target=manager.poll_once)
    poll.start()
    poll.join(60)  # an hour-long retry sleep would leave it running
    assert not poll.is_alive()
    assert manager.served_versions("m") == [1, 3]
    states = dict(manager.status("m"))
    assert states[2].state == "END" and "garbage saved_model.pb" in states[2].error_message
    assert states[2].error_code == Code.UNKNOWN
    manager.poll_once()  # the retry is not due yet
    assert attempts.count(2) == 1
    # A rewritten folder is tried again at once.
    (tmp_path / "2" / "saved_model.pb").write_bytes(b"xy")
    manager.poll_once()
    assert attempts.count(2) == 2


def test_server_manager_freezes_the_heap_and_still_frees_unloaded_versions(
    tmp_path: Path,
) -> None:
    """freeze_heap: after a load, what is alive is out of the cyclic GC (gc.freeze), and a
    version unloaded later is still collected even when it sits in a reference cycle."""
    import gc
    import weakref

    from serving.model_config import ModelConfig
    from serving.model_manager import ServableManager
    from serving.servable import Servable

    def loader(name: str, version: int, path: str, options: Any) -> Servable:
        servable = Servable(name, version, path, {}, None)
        servable.handle = servable  # a cycle: only the cyclic GC can free it
        return servable

    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"x")
    policy = VersionPolicy(kind="latest", num_versions=1)
    manager = ServableManager([ModelConfig("m", str(tmp_path), policy)], loader=loader,
                              freeze_heap=True)  # fmt: skip
    try:
        manager.poll_once()
        assert gc.get_freeze_count() > 0
        first = weakref.ref(manager.get("m"))
        assert first() is not None
        (tmp_path / "2").mkdir()
        (tmp_path / "2" / "saved_model.pb").write_bytes(b"x")
        manager.poll_once()
        assert manager.served_versions("m") == [2]
        assert first() is None  # unfrozen and collected, not kept frozen forever
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_version_listing_through_gfile() -> None:
    """Base paths go through tf.io.gfile (gs:// etc.); TF's in-memory file system stands in."""
    base = "ram://models/recs"
    for name in ("1", "12", ".tmp-3"):
        tf.io.gfile.makedirs(f"{base}/{name}")
    with tf.io.gfile.GFile(f"{base}/7", "w") as f:
        f.write("a file, not a version")
    assert sorted(list_versions(base)) == [1, 12]
    with pytest.raises(OSError):
        list_versions("ram://models/none")


def test_model_config_reload_adds_and_removes_models(tmp_path: Path) -> None:
    """What --model_config_file_poll_wait_seconds applies: a re-read config's models."""
    from serving.model_config import ModelConfig
    from serving.model_manager import ServableManager
    from serving.servable import Servable

    for name in ("a", "b"):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "saved_model.pb").write_bytes(b"x")

    def loader(name: str, version: int, path: str, options: Any) -> Servable:
        return Servable(name, version, path, {}, None)

    manager = ServableManager([ModelConfig("a", str(tmp_path / "a"))], loader=loader)
    manager.poll_once()
    assert manager.model_names == ["a"] and manager.served_versions("a") == [1]
    manager.update_configs([ModelConfig("b", str(tmp_path / "b"))])
    manager.poll_once()
    assert manager.model_names == ["b"] and manager.served_versions("b") == [1]
    with pytest.raises(ServingError) as info:
        manager.get("a")
    assert info.value.code == Code.NOT_FOUND


def test_rest_api_timeout_answers_504() -> None:
    """--rest_api_timeout_in_ms: a request still running at its deadline gets a JSON 504 (the
    handler here blocks until released, so the deadline always passes first)."""
    from serving.rest import RestServer

    release = threading.Event()

    class BlockingApi:
        max_body_bytes = 1 << 20

        def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
            release.wait(30)
            return 200, {"ok": True}

    rest = RestServer(BlockingApi(), "127.0.0.1", 0, 1, request_timeout_s=0.2)  # type: ignore[arg-type]
    rest.start()
    try:
        code, answer = http("GET", f"http://127.0.0.1:{rest.port}/v1/models/m")
        assert code == 504 and "--rest_api_timeout_in_ms" in answer["error"]
    finally:
        release.set()
        rest.stop(5)


def test_real_export_through_the_batching_server(fake_export_base: str, tmp_path: Path) -> None:
    """The export code's own SavedModel (brute force, hash towers): every signature's warm-up
    request answers over gRPC as the session loader answers it, and requests with different
    per-query k, batched together when they arrive together, each get their own top-k."""
    path = os.path.join(fake_export_base, "1")
    params = tmp_path / "batching.config"
    params.write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 500000 }\n")
    proc = ServerProcess(
        ["--model_name", "movielens", "--model_base_path", os.path.dirname(path),
         "--enable_batching=true", "--batching_parameters_file", str(params),
         "--file_system_poll_wait_seconds", "0"]
    )  # fmt: skip
    try:
        load = next(e for e in proc.events if e.get("event") == "load")
        assert load["warmup_requests"] == len(contract.SIGNATURES)
        warmup = os.path.join(path, "assets.extra", contract.WARMUP_FILE)
        requests = [
            prediction_log_pb2.PredictionLog.FromString(raw.numpy()).predict_log.request
            for raw in tf.data.TFRecordDataset(warmup)
        ]
        with SessionModel(path) as model, grpc.insecure_channel(proc.target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for request in requests:
                name = request.model_spec.signature_name
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                assert_outputs_match(from_response(stub.Predict(request, timeout=60)),
                                     model.run(name, inputs))  # fmt: skip
            retrieve = next(r for r in requests if r.model_spec.signature_name == contract.RETRIEVE)
            base = {k: tf.make_ndarray(v) for k, v in retrieve.inputs.items()}
            answers: dict[int, dict[str, np.ndarray]] = {}

            def ask(k: int) -> None:
                inputs = dict(base, k=np.full([len(base["k"])], k, np.int32))
                answers[k] = from_response(
                    stub.Predict(to_request(inputs, "movielens"), timeout=60)
                )

            threads = [threading.Thread(target=ask, args=(k,)) for k in (2, 7)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            for k, got in answers.items():
                want = model.run(
                    contract.RETRIEVE, dict(base, k=np.full([len(base["k"])], k, np.int32))
                )
                assert got["item_ids"].shape[1] >= k
                assert_outputs_match(
                    {n: v[:, :k] for n, v in got.items()}, {n: v[:, :k] for n, v in want.items()}
                )
                assert (got["item_ids"][:, k:] == b"").all()  # padding past this request's k
    finally:
        assert proc.terminate() == 0
    stats = next(e for e in proc.events if e.get("event") == "batching_stats")
    assert stats["batches"] >= 1
