"""Request metrics in Prometheus' text format, at TF Serving's path and with its metric names.

TF Serving serves them at ``/monitoring/prometheus/metrics`` on the REST port when
``--monitoring_config_file`` enables ``prometheus_config``; this server does the same. Latency
is in microseconds, as TF Serving reports it.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

from common.contract import RETRIEVE

DEFAULT_PATH = "/monitoring/prometheus/metrics"
REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"
# Microseconds: 100 us .. ~100 s in steps of about x2.5.
BUCKETS_US: tuple[float, ...] = tuple(round(100 * 2.5**i) for i in range(16))

_Key = tuple[str, str, str, str]  # entrypoint, model, signature, status


class Metrics:
    """Thread-safe request counters and latency histograms by entrypoint, model, signature,
    status."""

    def __init__(self, buckets_us: Sequence[float] = BUCKETS_US) -> None:
        self.buckets = tuple(buckets_us)
        self._lock = threading.Lock()
        self._count: dict[_Key, int] = {}
        self._hist: dict[_Key, list[float]] = {}  # per bucket counts + [sum]

    def observe(
        self, entrypoint: str, model: str, signature: str, status: str, seconds: float
    ) -> None:
        key = (entrypoint, model, signature or RETRIEVE, status)
        micros = seconds * 1e6
        index = bisect.bisect_left(self.buckets, micros)
        with self._lock:
            self._count[key] = self._count.get(key, 0) + 1
            hist = self._hist.setdefault(key, [0.0] * (len(self.buckets) + 2))
            hist[index] += 1  # index == len(buckets): the +Inf bucket
            hist[-1] += micros

    def render(self) -> str:
        """The Prometheus exposition text of every series seen so far."""
        with self._lock:
            counts = dict(self._count)
            hists = {k: list(v) for k, v in self._hist.items()}
        lines = [
            f"# TYPE {REQUEST_COUNT} counter",
        ]
        for key, value in sorted(counts.items()):
            lines.append(f"{REQUEST_COUNT}{{{_labels(key)}}} {value}")
        lines.append(f"# TYPE {REQUEST_LATENCY} histogram")
        for key, hist in sorted(hists.items()):
            labels = _labels(key)
            cumulative = 0.0
            for bound, n in zip((*self.buckets, float("inf")), hist[:-1], strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'{REQUEST_LATENCY}_bucket{{{labels},le="{le}"}} {cumulative:g}')
            lines.append(f"{REQUEST_LATENCY}_sum{{{labels}}} {hist[-1]:g}")
            lines.append(f"{REQUEST_LATENCY}_count{{{labels}}} {cumulative:g}")
        return "\n".join(lines) + "\n"


def _labels(key: _Key) -> str:
    names = ("entrypoint", "model_name", "signature_name", "status")
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, key, strict=True))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_monitoring_config(text: str) -> str | None:
    """Parses a MonitoringConfig text proto; returns the Prometheus path, None if disabled.

    The tensorflow-serving-api wheel lacks monitoring_config_pb2, so the message (one field,
    ``prometheus_config { enable path }``) is rebuilt with TF Serving's field numbers.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

    pool = descriptor_pool.DescriptorPool()
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="serving_local/monitoring_config.proto", package="tensorflow.serving", syntax="proto3"
    )
    fdp = descriptor_pb2.FieldDescriptorProto
    prom = file_proto.message_type.add(name="PrometheusConfig")
    prom.field.add(name="enable", number=1, label=fdp.LABEL_OPTIONAL, type=fdp.TYPE_BOOL)
    prom.field.add(name="path", number=2, label=fdp.LABEL_OPTIONAL, type=fdp.TYPE_STRING)
    mon = file_proto.message_type.add(name="MonitoringConfig")
    mon.field.add(
        name="prometheus_config",
        number=1,
        label=fdp.LABEL_OPTIONAL,
        type=fdp.TYPE_MESSAGE,
        type_name=".tensorflow.serving.PrometheusConfig",
    )
    pool.Add(file_proto)
    cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")
    )
    proto = cls()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        raise ValueError(f"invalid monitoring config: {exc}") from exc
    if not proto.prometheus_config.enable:
        return None
    path = proto.prometheus_config.path or DEFAULT_PATH
    if not path.startswith("/"):
        raise ValueError(f"prometheus_config.path must start with '/', got {path!r}")
    return path
