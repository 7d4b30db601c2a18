"""A small Prometheus text-format registry (per process; see README "Metrics").

Each gunicorn worker process keeps its own counters; every sample carries a ``pid`` label so a
scrape through the load-balanced port never mixes processes silently. Sum by job in PromQL.

Label values come from closed sets, never verbatim from a client: an HTTP method outside
:data:`HTTP_METHODS` is counted as ``other`` and a path no route matched as ``unmatched``, so no
request can add a series (memory stays bounded whatever clients send).
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
WORKER_STATES = ("serving", "no_model")


def method_label(method: str) -> str:
    """The ``method`` label: a standard method as is, anything else one value."""
    return method if method in HTTP_METHODS else "other"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = (*labelnames, "pid")
        self._lock = threading.Lock()

    def _key(self, labels: Sequence[str]) -> tuple[str, ...]:
        return (*labels, str(os.getpid()))

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [*self.header(), *(f"{self.name}{_labels(self.labelnames, k)} {v:g}" for k, v in items)]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        with self._lock:
            self._values[self._key(labels)] = value


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (), buckets=LATENCY_BUCKETS):
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(buckets)
        self._values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            row = self._values.get(key)
            if row is None:
                row = self._values[key] = [0.0] * (len(self.buckets) + 2)
            row[i] += 1  # per-bucket count; cumulated at render time; last two: +Inf slot, sum
            row[-1] += value

    def count(self, *labels: str) -> int:
        row = self._values.get(self._key(labels))
        return int(sum(row[:-1])) if row else 0

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._values.items())
        for key, row in items:
            cumulative = 0.0
            for bound, n in zip((*self.buckets, float("inf")), row[:-1], strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                labels = _labels(self.labelnames, key, 'le="' + le + '"')
                lines.append(f"{self.name}_bucket{labels} {cumulative:g}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {row[-1]:.6f}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {cumulative:g}")
        return lines


class Metrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "modelserve_http_requests_total",
            "HTTP requests by endpoint, method and status",
            ("endpoint", "method", "status"),
        )
        self.latency = Histogram(
            "modelserve_http_request_duration_seconds", "HTTP request latency", ("endpoint",)
        )
        self.roundtrip = Histogram(
            "modelserve_queue_roundtrip_seconds",
            "Time from publishing a task to RabbitMQ to receiving its result",
            ("task",),
        )
        self.batch_rows = Histogram(
            "modelserve_batch_rows", "Rows per task sent to the workers", ("task",), buckets=SIZE_BUCKETS
        )
        self.predictions = Counter("modelserve_predictions_total", "Rows predicted", ("model_version",))
        self.unavailable = Counter(
            "modelserve_unavailable_total", "Requests answered 503 by reason", ("reason",)
        )
        self.queue_consumers = Gauge(
            "modelserve_queue_consumers",
            "Consumers of the prediction queue at the last check (-1: unknown); readiness needs >= 1",
        )
        self.fleet_workers = Gauge(
            "modelserve_fleet_workers",
            "Workers whose status this process received, by state (serving, no_model)",
            ("state",),
        )

    def render(self) -> str:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.latency,
            self.roundtrip,
            self.batch_rows,
            self.predictions,
            self.unavailable,
            self.queue_consumers,
            self.fleet_workers,
        ):
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
