"""Status errors shared by the gRPC and REST front ends.

TF Serving reports every failure as a canonical status code (the same numbering as gRPC's) plus
a message; the REST API maps the code to an HTTP status. Keeping one exception type with the
canonical code lets the core stay transport-agnostic.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from typing import Any


class Code(enum.IntEnum):
    """Canonical status codes (tensorflow/core/protobuf/error_codes.proto == gRPC codes)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# TF Serving's http_server.cc ToHTTPStatusCode.
HTTP_STATUS: dict[Code, int] = {
    Code.OK: 200,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}


class ServingError(Exception):
    """A request failure carrying a canonical status code and TF Serving-like message."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = Code(code)
        self.message = message

    @property
    def http_status(self) -> int:
        """The HTTP status TF Serving's REST API answers for this code."""
        return HTTP_STATUS.get(self.code, 500)

    def __repr__(self) -> str:
        return f"ServingError({self.code.name}, {self.message!r})"


def from_exception(exc: BaseException) -> ServingError:
    """Maps any exception raised while serving a request to a ServingError.

    TensorFlow's OpError subclasses carry the canonical code already (tf.errors uses the same
    numbering), so a failure inside a signature keeps its code and TF message.
    """
    if isinstance(exc, ServingError):
        return exc
    error_code = getattr(exc, "error_code", None)
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(error_code, int) and 0 < error_code <= 16:
        return ServingError(Code(error_code), message)
    if isinstance(exc, (TypeError, ValueError)):
        return ServingError(Code.INVALID_ARGUMENT, str(exc))
    return ServingError(Code.INTERNAL, f"{type(exc).__name__}: {exc}")


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object per line (structured logs on stderr)."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Logs one structured event; the JSON formatter turns `fields` into top-level keys."""
    logger.log(level, event, extra={"fields": {"event": event, **fields}})
