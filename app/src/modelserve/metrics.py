"""Prometheus metrics of the web and the workers, with ``prometheus_client`` (README "Metrics").

Multiprocess mode: ``modelserve-web`` and ``modelserve-worker`` set ``PROMETHEUS_MULTIPROC_DIR``
(a private directory when the environment names none; systemd's RuntimeDirectory in the role) and
empty it before they exec gunicorn or Celery. Every process of the service then writes its samples
to files there and a scrape, from any process, reads them all: one view per service, without a
``pid`` label, counters and histograms summed over the processes (dead ones included, so they never
go backwards), gauges combined by their mode (a dead process's are dropped: gunicorn's
``child_exit`` and Celery's ``worker_process_shutdown`` call :func:`mark_process_dead`). Without
the variable (an app built in a test process) each :class:`Metrics` keeps its own registry.

Label values come from closed sets, never verbatim from a client: an HTTP method outside
:data:`HTTP_METHODS` is counted as ``other`` and a path no route matched as ``unmatched``, so no
request can add a series (memory stays bounded whatever clients send). ``model_version`` values are
the versions of installed releases (operator-controlled).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
WORKER_STATES = ("serving", "no_model")
ENDPOINT, TASK, VERSION = ("endpoint",), ("task",), ("model_version",)


def method_label(method: str) -> str:
    """The ``method`` label: a standard method as is, anything else one value."""
    return method if method in HTTP_METHODS else "other"


def multiproc_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiproc_dir(service: str) -> Path:
    """Before exec: the service's multiprocess directory, emptied (a new service, new counters).

    The environment's ``PROMETHEUS_MULTIPROC_DIR`` if set, else a new private directory, which is
    then put in the environment for the processes to come.
    """
    path = multiproc_dir() or tempfile.mkdtemp(prefix=f"{service}-metrics-")
    os.environ[MULTIPROC_ENV] = path
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return root


def serve_multiprocess(address: str, port: int) -> Any:
    """Serve every process's samples (the multiprocess directory) over HTTP from this process.

    The gunicorn master's metrics port (``gunicorn_hooks.when_ready``): it answers while the
    request threads are busy, and only what the multiprocess files hold (the scrape-time gauges
    are written by the processes that compute them). Returns the HTTP server (``.socket``).
    """
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server


def mark_process_dead(pid: int) -> None:
    """Drop a dead process's live gauges (its counters stay in the sums)."""
    if multiproc_dir():
        multiprocess.mark_process_dead(pid)


class _Registry:
    """The metrics of one app: its own registry, or every process's files in multiprocess mode."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def histogram(
        self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...], mode: str) -> Gauge:
        """``mode``: how the processes' values combine in multiprocess mode (prometheus_client's)."""
        return Gauge(name, doc, labels, multiprocess_mode=mode, registry=self.registry)

    def scrape_registry(self) -> CollectorRegistry:
        """What a scrape reads: every process's files in multiprocess mode, else this registry."""
        if not multiproc_dir():
            return self.registry
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        for collector in self.extra_collectors():
            registry.register(collector)
        return registry

    def render(self) -> bytes:
        return generate_latest(self.scrape_registry())

    def extra_collectors(self) -> list[Collector]:
        """Collectors computed at scrape time in the scraped process (not kept in files)."""
        return []

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's value (0 when absent), from what a scrape would return."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.render().decode()):
            for s in family.samples:
                if s.name == name and s.labels == (labels or {}):
                    return s.value
        return 0.0


class Metrics(_Registry):
    """The web tier's (one per app; every gunicorn process of a host adds to the same view)."""

    def __init__(self) -> None:
        super().__init__()
        c, h = self.counter, self.histogram
        self.requests = c("modelserve_http_requests_total", "HTTP requests", ("endpoint", "method", "status"))
        self.latency = h(
            "modelserve_http_request_duration_seconds", "HTTP request latency", ENDPOINT, LATENCY_BUCKETS
        )
        # From publishing a task to RabbitMQ to receiving its result.
        self.roundtrip = h("modelserve_queue_roundtrip_seconds", "Task round trip", TASK, LATENCY_BUCKETS)
        self.batch_rows = h("modelserve_batch_rows", "Rows per task sent to the workers", TASK, SIZE_BUCKETS)
        self.predictions = c(
            "modelserve_predictions_total", "Rows predicted, by the version that answered", VERSION
        )
        self.unavailable = c("modelserve_unavailable_total", "Requests answered 503 by reason", ("reason",))
        # Set by the process that serves the scrape, from its view: the most recent value wins.
        consumers = "Consumers of the prediction queue at the last check (-1: unknown); readiness needs >= 1"
        self.queue_consumers = self.gauge("modelserve_queue_consumers", consumers, (), "livemostrecent")
        fleet = "Workers whose status the front end received, by state (serving, no_model)"
        self.fleet_workers = self.gauge("modelserve_fleet_workers", fleet, ("state",), "livemostrecent")


class _ModelAge(Collector):
    """``modelserve_worker_model_age_seconds``: computed at each scrape, from the served model."""

    def __init__(self, served: Callable[[], tuple[str, float] | None]) -> None:
        self.served = served

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "modelserve_worker_model_age_seconds",
            "Seconds since the served release was trained (its metadata's trained_at)",
            labels=("model_version",),
        )
        served = self.served()
        if served is not None:
            version, trained = served
            family.add_metric((version,), max(0.0, time.time() - trained))
        yield family


class _Drift(Collector):
    """The drift gauges (``modelserve.drift``): computed at each scrape, in the worker's main process,
    from the window every process of the worker writes to (one coherent window per worker)."""

    def __init__(self, summary: Callable[[], tuple[str, dict] | None]) -> None:
        self.summary = summary

    def collect(self) -> Iterator[GaugeMetricFamily]:
        name, labels = "modelserve_worker_drift_", ("feature", "model_version")
        enabled = GaugeMetricFamily(
            name + "enabled",
            "1 when drift is computed for the served version (its release has a reference profile"
            " and the window is on), else 0",
            labels=VERSION,
        )
        rows = GaugeMetricFamily(name + "window_rows", "Live rows in the drift window", labels=VERSION)
        psi = GaugeMetricFamily(
            name + "psi",
            "Population stability index of the window against the release's training profile,"
            " per feature and for the score (reported once the window has MODELSERVE_DRIFT_MIN_ROWS)",
            labels=labels,
        )
        ks = GaugeMetricFamily(
            name + "ks_statistic",
            "Two-sample Kolmogorov-Smirnov statistic of the window against the training data,"
            " per feature and for the score",
            labels=labels,
        )
        served = self.summary()
        if served is not None:
            version, drift = served
            enabled.add_metric((version,), 1.0 if drift["enabled"] else 0.0)
            if drift["enabled"]:
                rows.add_metric((version,), drift["rows"])
            for column, values in (drift.get("columns") or {}).items():
                psi.add_metric((column, version), values["psi"])
                ks.add_metric((column, version), values["ks"])
        yield from (enabled, rows, psi, ks)


class WorkerMetrics(_Registry):
    """A Celery worker's: its main process serves them over HTTP (``worker.MetricsServer``), pool
    children (prefork) write theirs to the multiprocess directory; threads share the main process's."""

    def __init__(
        self,
        served: Callable[[], tuple[str, float] | None] = lambda: None,
        drift: Callable[[], tuple[str, dict] | None] = lambda: None,
    ) -> None:
        super().__init__()
        c, h, name = self.counter, self.histogram, "modelserve_worker_"
        self.inference = h(
            name + "inference_duration_seconds", "Model time of a task", VERSION, LATENCY_BUCKETS
        )
        self.rows = h(name + "task_rows", "Rows per predict task", VERSION, SIZE_BUCKETS)
        self.load = h(name + "model_load_duration_seconds", "Loading a release", VERSION, LOAD_BUCKETS)
        self.load_failures = c(name + "model_load_failures_total", "Failed loads of a release", VERSION)
        # 1 while a live process of this worker holds that version; 0 once none does.
        info = "The model version this worker serves (1), versions it served before (0)"
        self.model_info = self.gauge(name + "model_info", info, VERSION, "livemax")
        self.retries = c(
            name + "task_retries_total", "Tasks retried, by reason (no_model)", (*TASK, "reason")
        )
        self.rejected = c(name + "task_rejections_total", "Task messages handed back", (*TASK, "requeue"))
        dead = "Task messages this worker's rejection made the broker dead-letter (quorum queue)"
        self.dead_lettered = c(name + "tasks_dead_lettered_total", dead, (*TASK, "reason"))
        # Set by the worker to its main process's model (prefork: the copy the Supervisor checks).
        self.served = served
        self._age = _ModelAge(lambda: self.served())
        self.registry.register(self._age)
        # Set by the worker: (served version, modelserve.drift.DriftMonitor.summary) or None.
        self.drift = drift
        self._drift = _Drift(lambda: self.drift())
        self.registry.register(self._drift)

    def extra_collectors(self) -> list[Collector]:
        return [self._age, self._drift]

    # --- what a ModelHolder reports (see modelserve.model.ModelHolder.observer) --------------------

    def model_loaded(self, version: str, seconds: float, previous: str | None) -> None:
        self.load.labels(version).observe(seconds)
        if previous is not None and previous != version:
            self.model_info.labels(previous).set(0)
        self.model_info.labels(version).set(1)

    def model_load_failed(self, version: str) -> None:
        self.load_failures.labels(version).inc()
