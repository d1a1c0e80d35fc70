"""TF Serving's REST API (/v1/models/...) on Tornado's asynchronous HTTP server.

JSON shapes follow tensorflow_serving/util/json_tensor.cc and model_servers/http_rest_api_*.cc:
row format (`instances` -> `predictions`), columnar format (`inputs` -> `outputs`), string
outputs as UTF-8 text except names ending in `_bytes` (`{"b64": ...}`), and errors as
`{"error": "..."}` with TF Serving's HTTP status for the status code. The JSON <-> numpy
conversion is :mod:`serving.rest_codec`; here are the routes and the HTTP server.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import tornado.web
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

from common.contract import RETRIEVE
from serving.errors import Code, ServingError, from_exception, log_event
from serving.predictor import Predictor, check_input, check_input_names
from serving.rest_codec import (
    MAX_JSON_DEPTH,
    check_json_depth,
    columns_to_arrays,
    outputs_to_columns,
    outputs_to_rows,
    rows_to_arrays,
)

logger = logging.getLogger("serving.rest")

_PREDICT_RE = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
_STATUS_RE = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)
_V1_RE = re.compile(r"/v1/.*", re.IGNORECASE)


class RestApi:
    """Maps (method, path, body) to (HTTP status, JSON-able body); no sockets involved."""

    def __init__(self, predictor: Predictor, max_body_bytes: int = 2**31 - 1) -> None:
        self.predictor = predictor
        self.max_body_bytes = max_body_bytes

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        """Answers one request; never raises."""
        try:
            return 200, self._dispatch(method, path, body)
        except Exception as exc:
            err = from_exception(exc)
            log_event(
                logger,
                logging.WARNING,
                "request_error",
                api="rest",
                method=method,
                path=path,
                code=err.code.name,
                error=err.message[:1000],
            )
            return err.http_status, {"error": err.message}

    def _dispatch(self, method: str, path: str, body: bytes) -> Any:
        path = urllib.parse.urlsplit(path).path
        if not _V1_RE.fullmatch(path):
            raise ServingError(Code.NOT_FOUND, f"Not found: {method} {path}")
        if method == "POST":
            m = _PREDICT_RE.fullmatch(path)
            if m:
                name, version, label = _model_info(m.group(1), m.group(2), m.group(3))
                verb = m.group(4).lower()
                if verb != "predict":
                    raise ServingError(
                        Code.UNIMPLEMENTED, f"{verb} is not supported by this model server"
                    )
                if len(body) > self.max_body_bytes:
                    raise ServingError(
                        Code.RESOURCE_EXHAUSTED,
                        f"Request body larger than max ({len(body)} vs. {self.max_body_bytes})",
                    )
                return self.predict(name, version, label, body)
        elif method == "GET":
            m = _STATUS_RE.fullmatch(path)
            if m:
                if not m.group(1):
                    raise ServingError(Code.INVALID_ARGUMENT, "Missing model name in request.")
                name, version, label = _model_info(m.group(1), m.group(2), m.group(3))
                if m.group(4):
                    return self.metadata(name, version, label)
                return self.status(name, version, label)
        raise ServingError(Code.INVALID_ARGUMENT, f"Malformed request: {method} {path}")

    # -- endpoints ----------------------------------------------------------------------------

    def status(self, name: str, version: int | None, label: str | None) -> Any:
        response = get_model_status_pb2.GetModelStatusResponse()
        for ver, state in self.predictor.manager.status(name, version, label):
            entry = response.model_version_status.add()
            entry.version = ver
            entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state.state)
            entry.status.error_code = int(state.error_code)
            entry.status.error_message = state.error_message
        return json_format.MessageToDict(response, always_print_fields_with_no_presence=True)

    def metadata(self, name: str, version: int | None, label: str | None) -> Any:
        servable = self.predictor.manager.get(name, version, label)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        opts = {"always_print_fields_with_no_presence": True, "preserving_proto_field_name": True}
        return {
            "model_spec": json_format.MessageToDict(response.model_spec, **opts),
            "metadata": {
                "signature_def": json_format.MessageToDict(servable.signature_def_map, **opts)
            },
        }

    def predict(self, name: str, version: int | None, label: str | None, body: bytes) -> Any:
        """Answers one :predict call and records it in the request metrics."""
        start = time.monotonic()
        seen: dict[str, str] = {}
        code = Code.OK
        try:
            return self._predict(name, version, label, body, seen)
        except Exception as exc:
            code = from_exception(exc).code
            raise
        finally:
            metrics = getattr(self.predictor, "metrics", None)
            if metrics is not None:
                metrics.observe(
                    "REST", name, seen.get("signature", ""), code.name, time.monotonic() - start
                )

    def _predict(
        self, name: str, version: int | None, label: str | None, body: bytes, seen: dict
    ) -> Any:
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ServingError(Code.INVALID_ARGUMENT, f"JSON Parse error: {exc}") from exc
        except RecursionError as exc:
            raise ServingError(
                Code.INVALID_ARGUMENT, f"JSON Parse error: nested deeper than {MAX_JSON_DEPTH}"
            ) from exc
        check_json_depth(request)
        if not isinstance(request, dict):
            raise ServingError(
                Code.INVALID_ARGUMENT, "JSON Value: not an object. Expecting a JSON object"
            )
        signature_name = request.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise ServingError(Code.INVALID_ARGUMENT, "'signature_name' key must be a string")
        seen["signature"] = signature_name[:100]
        has_rows, has_cols = "instances" in request, "inputs" in request
        if has_rows == has_cols:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                "Missing 'inputs' or 'instances' key"
                if not has_rows
                else "Not formatted correctly expecting only one of 'inputs' or 'instances' "
                "keys exists",
            )
        try:
            servable, sig = self.predictor.resolve(name, version, label, signature_name)
        except ServingError as err:
            if err.code == Code.FAILED_PRECONDITION:  # REST wording and code for this case
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f'Serving signature name: "{signature_name or RETRIEVE}" not '
                    "found in signature def",
                ) from err
            raise
        specs = sig.inputs
        if has_rows:
            arrays = rows_to_arrays(request["instances"], specs)
        else:
            arrays = columns_to_arrays(request["inputs"], specs)
        check_input_names(sig, arrays)
        for input_name, arr in arrays.items():
            check_input(sig, input_name, specs[input_name].dtype, arr.shape)
        result = self.predictor.run(servable, sig, arrays)
        if has_rows:
            return {"predictions": outputs_to_rows(result.outputs)}
        return {"outputs": outputs_to_columns(result.outputs)}


def _model_info(
    name: str, version: str | None, label: str | None
) -> tuple[str, int | None, str | None]:
    name = urllib.parse.unquote(name)
    ver: int | None = None
    if version:
        try:
            ver = int(version)
        except ValueError as exc:
            raise ServingError(
                Code.INVALID_ARGUMENT, f"Failed to convert version: {version} to numeric."
            ) from exc
    return name, ver, urllib.parse.unquote(label) if label else None


# -- HTTP server ------------------------------------------------------------------------------


class RestServer:
    """The REST front end on Tornado's asynchronous HTTP server, in its own IO-loop thread.

    Reading headers and bodies costs no worker thread, so clients that send half a request
    (or send it slowly) cannot starve the others; they are cut off after ``header_timeout_s``
    / ``body_timeout_s``. Requests run on a pool of ``num_threads`` workers, each bounded by
    ``request_timeout_s`` (``--rest_api_timeout_in_ms``). start() binds and serves; stop()
    stops accepting and waits for in-flight requests.
    """

    def __init__(
        self,
        api: RestApi,
        host: str,
        port: int,
        num_threads: int,
        *,
        request_timeout_s: float = 30.0,
        header_timeout_s: float = 30.0,
        body_timeout_s: float = 60.0,
        metrics: Any = None,
        metrics_path: str | None = None,
    ) -> None:
        import asyncio

        import tornado.httpserver
        import tornado.netutil

        self.api = api
        self.metrics = metrics
        self.metrics_path = metrics_path
        self.request_timeout_s = request_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="rest")
        self._loop = asyncio.new_event_loop()
        self._sockets = tornado.netutil.bind_sockets(port, host, backlog=1024)
        self._cv = threading.Condition()
        self._in_flight = 0
        self._closing = False
        owner = self

        async def make_server() -> Any:
            app = tornado.web.Application([(r"/.*", _Handler, {"owner": owner})])
            server = tornado.httpserver.HTTPServer(
                app,
                idle_connection_timeout=header_timeout_s,
                body_timeout=body_timeout_s,
                # The limit is enforced per request in _Handler, which drains (never keeps) an
                # oversized body so the client can read a JSON 429; Tornado's own check would
                # just drop the connection. body_timeout bounds how long a drain may take.
                max_body_size=2**62,
                max_buffer_size=16 << 20,
                max_header_size=64 * 1024,
            )
            server.add_sockets(self._sockets)
            return server

        self._make_server = make_server
        self._server: Any = None
        self._thread = threading.Thread(target=self._run, name="rest-ioloop", daemon=True)
        self._started = threading.Event()

    @property
    def port(self) -> int:
        return self._sockets[0].getsockname()[1]

    def _run(self) -> None:
        import asyncio

        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(self._make_server())
        self._started.set()
        self._loop.run_forever()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(30)

    def enter(self) -> bool:
        with self._cv:
            if self._closing:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._cv:
            self._in_flight -= 1
            self._cv.notify_all()

    def stop(self, grace_s: float) -> None:
        """Stops accepting, waits up to grace_s for in-flight requests, then closes."""
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.stop)
        with self._cv:
            self._closing = True
            self._cv.wait_for(lambda: self._in_flight == 0, timeout=grace_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)


@tornado.web.stream_request_body
class _Handler(tornado.web.RequestHandler):
    """Collects the body (refusing it past the limit without buffering it), then answers."""

    def initialize(self, owner: RestServer) -> None:
        self.owner = owner
        self._chunks: list[bytes] = []
        self._received = 0
        self._too_big = False

    def prepare(self) -> None:
        limit = self.owner.api.max_body_bytes
        try:
            announced = int(self.request.headers.get("Content-Length") or 0)
        except ValueError:
            announced = 0
        if announced > limit:
            self._too_big = True
            self._received = announced

    def data_received(self, chunk: bytes) -> None:
        if self._too_big:
            return  # drained, not kept, so the client can read the error
        self._received += len(chunk)
        if self._received > self.owner.api.max_body_bytes:
            self._too_big = True
            self._chunks = []
            return
        self._chunks.append(chunk)

    async def get(self) -> None:
        if self.owner.metrics_path and self.request.path == self.owner.metrics_path:
            self.set_header("Content-Type", "text/plain; version=0.0.4")
            self.finish(self.owner.metrics.render() if self.owner.metrics else "")
            return
        await self._serve()

    async def post(self) -> None:
        if self._too_big:
            limit = self.owner.api.max_body_bytes
            self._reply(
                429, {"error": f"Request body larger than max ({self._received} vs. {limit})"}
            )
            return
        await self._serve()

    async def _serve(self) -> None:
        import asyncio

        owner = self.owner
        if not owner.enter():
            self._reply(503, {"error": "Server is shutting down"})
            return
        try:
            loop = asyncio.get_running_loop()
            body = b"".join(self._chunks)
            work = loop.run_in_executor(
                owner._pool, owner.api.handle, self.request.method, self.request.uri, body
            )
            try:
                status, payload = await asyncio.wait_for(work, owner.request_timeout_s)
            except asyncio.TimeoutError:
                status, payload = (
                    504,
                    {
                        "error": f"Request timed out after {owner.request_timeout_s:g}s "
                        "(--rest_api_timeout_in_ms)"
                    },
                )
            self._reply(status, payload)
        finally:
            owner.leave()

    def _reply(self, status: int, payload: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload, indent=None).encode("utf-8"))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        log_event(logger, logging.WARNING, "connection_error", error=f"{typ.__name__}: {value}")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish(json.dumps({"error": self._reason}))

    def on_connection_close(self) -> None:
        self._chunks = []

    # Tornado answers unknown methods with 405; TF Serving does the same for PUT/DELETE.
