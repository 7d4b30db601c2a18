"""Celery workers: LiteRT inference, model loaded once per worker process, hot release switching.

:func:`create_celery_app` builds a configured app from :class:`~modelserve.config.Settings`;
importing this module configures nothing. ``celery -A modelserve.worker`` (what
``modelserve-worker`` execs) asks for the module's ``app``, which is built from the environment
on that first access. Imports only numpy + ai-edge-litert, never TensorFlow.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from celery import Celery, Task, signals
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu import Connection, Producer
from prometheus_client import start_http_server

from modelserve.config import ConfigError, Settings, load_settings
from modelserve.drift import DriftMonitor
from modelserve.metrics import WorkerMetrics, mark_process_dead, prepare_multiproc_dir
from modelserve.model import ModelHolder, ModelUnavailable, Predictor, trained_timestamp
from modelserve.protocol import TASK_MODEL_INFO, TASK_PREDICT, settings_task_queue, status_exchange

log = logging.getLogger(__name__)


class ModelSource(Protocol):
    """Where a task gets its model: ``get()`` returns a Predictor or raises ModelUnavailable."""

    def get(self) -> Predictor: ...


def serving_models(settings: Settings) -> ModelSource:
    """Production: the release ``current`` points at, loaded once, followed when it moves."""
    return ModelHolder(settings.model_dir, settings.model_check_interval)


class _PerProcess:
    """One model source per process, made on first use (so after the prefork pool forked)."""

    def __init__(self, make: Callable[[], ModelSource], observer: Any = None) -> None:
        self._make = make
        self._observer = observer
        self._source: ModelSource | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def get(self) -> Predictor:
        if self._source is None or self._pid != os.getpid():
            with self._lock:
                if self._source is None or self._pid != os.getpid():
                    self._source = self._make()
                    if hasattr(self._source, "observer"):  # a ModelHolder: its loads are counted
                        self._source.observer = self._observer
                    self._pid = os.getpid()
        return self._source.get()

    def served(self) -> tuple[str, float] | None:
        """This process's model version and when it was trained (None: no model, or not known)."""
        try:
            model = self.get()
        except ModelUnavailable:
            return None
        trained = trained_timestamp(model)
        return None if trained is None else (model.version, trained)

    def drift(self, monitor: DriftMonitor) -> tuple[str, dict[str, Any]] | None:
        """This process's model version and the drift of the window against its profile."""
        try:
            model = self.get()
        except ModelUnavailable:
            return None
        return model.version, monitor.summary(model.version, model.drift_profile)

    def preload(self, **_: Any) -> None:
        """Load the model when the worker (process) starts, not on the first task."""
        try:
            model = self.get()
            log.warning("model %s loaded from %s", model.version, model.release_dir)
        except ModelUnavailable as exc:
            log.error("no model yet: %s (tasks will retry)", exc)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _models(task: Task) -> _PerProcess:
    return task.app.modelserve_models


def _metrics(task: Task) -> WorkerMetrics:
    return task.app.modelserve_metrics


def _packed_rows(rows_b64: str) -> int:
    """Rows in base64 float32 (8 features, 4 bytes each), without decoding it."""
    return (len(rows_b64) * 3 // 4 - rows_b64[-2:].count("=")) // 32


def _drift(task: Task) -> DriftMonitor:
    return task.app.modelserve_drift


def _check_rows(rows: Any) -> None:
    # The web validated already; this guards against other publishers.
    if isinstance(rows, str):
        return  # packed float32, checked when unpacked
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and len(r) == 8 for r in rows):
        raise ValueError("rows must be a non-empty list of 8-number lists")


def predict(task: Task, rows: list[list[float]] | str) -> dict[str, Any]:
    """Rows as a list of 8-number lists, or base64 float32 (what the web sends, see wire)."""
    _check_rows(rows)
    metrics = _metrics(task)
    try:
        model = _models(task).get()
    except ModelUnavailable as exc:
        # Bounded retry: a release may be mid-install. The web gives up after its own timeout.
        if task.request.retries < task.max_retries:
            metrics.retries.labels(task.name, "no_model").inc()
        raise task.retry(exc=exc, countdown=0.2) from None
    started = time.perf_counter()
    # Every predicted row and its score go to the worker's drift window (shared by its processes).
    drift, version = _drift(task), model.version

    def observe(x, probabilities) -> None:
        drift.observe(version, x, probabilities)

    predict_rows = model.predict_packed if isinstance(rows, str) else model.predict
    result = predict_rows(rows, observe)
    metrics.inference.labels(model.version).observe(time.perf_counter() - started)
    metrics.rows.labels(model.version).observe(_packed_rows(rows) if isinstance(rows, str) else len(rows))
    result["worker"] = worker_id()
    return result


def model_info(task: Task) -> dict[str, Any]:
    info: dict[str, Any] = {"worker": worker_id()}
    try:
        info.update(_models(task).get().info())
        info["loaded"] = True
    except ModelUnavailable as exc:
        info.update(loaded=False, error=str(exc))
    return info


class Supervisor:
    """Consumes the prediction queue only while this worker has a loadable model; tells the fleet.

    Started by ``worker_ready`` in the worker's main process. A thread asks the model source every
    check interval (a release that failed is retried with the holder's bounded backoff); while
    there is no model, the worker's consumer of the prediction queue is cancelled in-process, so
    RabbitMQ hands predictions only to workers that can answer them and the queue's consumer count
    (the front ends' readiness) counts only those; it is added back once a model loads. The
    cancel/add runs on Celery's event loop (``hub.call_soon``), the thread that owns the channel.
    The thread also publishes this worker's status (see :mod:`modelserve.protocol`) at start, on
    every change and every ``status_interval``: Celery's remote control (broadcast, inspect) is not
    needed, and may be off.
    """

    def __init__(
        self, app: Celery, settings: Settings, source: ModelSource, drift: DriftMonitor | None = None
    ) -> None:
        self.app = app
        self.settings = settings
        self.source = source
        self.drift = drift
        self.consuming = True  # the worker starts with --queues <task queue>
        self.status: dict[str, Any] = {}
        self._consumer: Any = None
        self._pending: bool | None = None
        self._stop = threading.Event()
        self._conn: Connection | None = None
        self._producer: Producer | None = None

    # --- signals (main thread) ---------------------------------------------------------------

    def _mine(self, sender: Any) -> bool:
        # The signals are process-wide: only this app's worker is supervised by this app.
        return getattr(sender, "app", None) is self.app

    def on_ready(self, sender: Any = None, **_: Any) -> None:
        if not self._mine(sender):
            return
        self._consumer = sender
        status = self.check()
        if status["state"] != "serving":
            self._apply(False)  # before the event loop hands this worker more predictions
        threading.Thread(target=self._run, name="modelserve-supervisor", daemon=True).start()

    def on_shutdown(self, sender: Any = None, **_: Any) -> None:
        if not self._mine(sender) or self._consumer is None:
            return
        self._stop.set()
        self.publish({**self.status, "state": "stopped", "consuming": False})

    # --- the model and the consumer ----------------------------------------------------------

    def check(self) -> dict[str, Any]:
        status: dict[str, Any] = {"worker": worker_id(), "consuming": self.consuming}
        try:
            info = self.source.get().info()
        except ModelUnavailable as exc:
            status.update(state="no_model", reason=str(exc))
        else:
            info.pop("release_dir", None)  # a path: stays on the host
            status.update(info, state="serving")
        return status

    def _want(self, consume: bool) -> None:
        if consume == self.consuming or self._pending == consume:
            return
        self._pending = consume
        hub = getattr(self._consumer, "hub", None)
        if hub is not None:
            hub.call_soon(self._apply, consume)
        else:  # no event loop (e.g. the memory transport): the consumer is driven synchronously
            self._apply(consume)

    def _apply(self, consume: bool) -> None:
        self._pending = None
        consumer, queue = self._consumer, self.settings.task_queue
        if consumer is None or consume == self.consuming:
            return
        try:
            if consume:
                consumer.add_task_queue(queue)
            else:
                consumer.cancel_task_queue(queue)
        except Exception as exc:  # e.g. the consumer is reconnecting: the next check tries again
            log.warning("could not %s consuming %s: %s", "start" if consume else "stop", queue, exc)
            return
        self.consuming = consume
        if consume:
            log.warning("model loaded: consuming %s again", queue)
        else:
            log.error("no loadable model: stopped consuming %s until one loads", queue)

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.settings.status_interval
        next_publish = 0.0
        while not self._stop.is_set():
            status = self.check()
            self._want(status["state"] == "serving")
            key = ("state", "version", "reason", "consuming")
            changed = [status.get(k) for k in key] != [self.status.get(k) for k in key]
            now = time.monotonic()
            if changed or now >= next_publish:
                if changed:
                    log.warning("worker status: %s", {k: status.get(k) for k in key})
                self.status = status
                if self.publish({**status, **self.observed()}):
                    next_publish = now + interval
            self._stop.wait(min(interval, max(0.1, self.settings.model_check_interval)))

    def observed(self) -> dict[str, Any]:
        """What the status adds about the traffic: rows per second over the last half minute, and
        the drift of the served version (the page shows them; the fleet view sums and averages)."""
        if self.drift is None:
            return {}
        out: dict[str, Any] = {"rows_per_second": self.drift.rows_per_second()}
        served = self.source.drift(self.drift) if hasattr(self.source, "drift") else None
        if served is not None:
            out["drift"] = served[1]
        return out

    def publish(self, status: dict[str, Any]) -> bool:
        """One transient status message; False (and reconnect next time) when the broker failed."""
        if not status:
            return False
        ttl = 3 * self.settings.status_interval + 1
        exchange = status_exchange(self.settings.task_queue)
        try:
            if self._producer is None:
                self._conn = Connection(
                    self.settings.broker_url,
                    connect_timeout=self.settings.broker_connect_timeout,
                    heartbeat=0,
                    ssl=self.settings.broker_ssl(),
                )
                self._producer = Producer(self._conn.channel(), exchange=exchange, serializer="json")
                exchange(self._producer.channel).declare()
            self._producer.publish(
                {**status, "ttl": ttl}, routing_key="", delivery_mode=1, expiration=ttl, retry=False
            )
            return True
        except Exception as exc:
            log.warning("could not publish the worker status: %s", exc)
            self._producer = None
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.release()
            return False


class CountingRequest(Request):
    """Celery's task request, counting the messages the worker hands back to the broker.

    A rejection (a task's ``Reject``, or Celery's after a worker process was lost on the message) is
    what the worker can see of dead-lettering, which RabbitMQ does: a quorum queue dead-letters a
    message rejected without requeue, or requeued once more than its delivery limit (the message's
    ``x-delivery-count`` says how often it came back before). The dead-letter queue's depth itself
    comes from RabbitMQ's own metrics.
    """

    def reject(self, requeue: bool = False) -> None:
        if not self.acknowledged:
            app = self.task.app
            metrics: WorkerMetrics | None = getattr(app, "modelserve_metrics", None)
            settings: Settings | None = getattr(app, "modelserve_settings", None)
            if metrics is not None and settings is not None:
                metrics.rejected.labels(self.task.name, str(requeue).lower()).inc()
                returned = int((self._message.headers or {}).get("x-delivery-count") or 0)
                if settings.task_queue_type == "quorum":
                    if not requeue:
                        metrics.dead_lettered.labels(self.task.name, "rejected").inc()
                    elif returned + 1 > settings.task_delivery_limit:
                        metrics.dead_lettered.labels(self.task.name, "delivery_limit").inc()
        super().reject(requeue=requeue)


class ServingTask(Task):
    Request = f"{__name__}:CountingRequest"


class MetricsServer:
    """The worker's /metrics over HTTP, from its main process (``worker_ready``): the samples of
    every process of this worker (pool children write theirs to the multiprocess directory)."""

    def __init__(self, app: Celery, settings: Settings, metrics: WorkerMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.address: tuple[str, int] | None = None

    def on_ready(self, sender: Any = None, **_: Any) -> None:
        bind = self.settings.worker_metrics_bind
        if getattr(sender, "app", None) is not self.app or bind is None or self.address is not None:
            return
        try:
            server, _thread = start_http_server(bind[1], bind[0], registry=self.metrics.scrape_registry())
        except OSError as exc:  # predictions still work; the scrape target shows as down
            log.error("cannot serve metrics on %s:%s: %s", bind[0], bind[1], exc)
            return
        self.address = server.server_address[:2]
        log.warning("metrics on http://%s:%s/metrics", *self.address)

    @staticmethod
    def on_child_exit(**_: Any) -> None:
        # In the pool child that exits: its live gauges leave the worker's view.
        mark_process_dead(os.getpid())


class TaskConsumer(Consumer):
    """Celery's consumer without native delayed delivery.

    With a quorum queue Celery 5.5+ declares 28 ``celery_delayed_*`` quorum queues and exchanges at
    every worker start, for countdown/ETA tasks routed through topic exchanges. Ours go through a
    direct exchange (and only a model retry uses a countdown), so they would stay unused.
    """

    class Blueprint(Consumer.Blueprint):
        default_steps = frozenset(Consumer.Blueprint.default_steps) - {
            "celery.worker.consumer.delayed_delivery:DelayedDelivery"
        }


def create_celery_app(
    settings: Settings, models: Callable[[Settings], ModelSource] = serving_models
) -> Celery:
    """A Celery app with the serving tasks; ``models`` makes each process's model source."""
    app = Celery("modelserve", set_as_current=False, task_cls=f"{__name__}:ServingTask")
    app.conf.update(
        # Every broker node, ';'-separated: a lost connection is retried on the next one.
        broker_url=settings.broker_url or None,
        broker_failover_strategy="round-robin",
        broker_connection_retry_on_startup=True,
        # AMQP heartbeats: a silently dead broker node is noticed within two intervals.
        broker_heartbeat=settings.broker_heartbeat,
        # amqps://: the brokers' CA, this host's client certificate, each node's name checked.
        broker_use_ssl=settings.broker_ssl(),
        # Off unless asked: whoever can publish to the broker could otherwise inspect, purge or shut
        # down the workers with `celery control`. Nothing here uses it (readiness counts the queue's
        # consumers; the fleet view hears the workers' status messages).
        worker_enable_remote_control=settings.worker_remote_control,
        worker_consumer=f"{__name__}:TaskConsumer",
        result_backend="rpc://",
        result_persistent=False,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_queues=[settings_task_queue(settings)],
        task_default_queue=settings.task_queue,
        # At-least-once: the message is acked after the task ran, and re-queued if the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=settings.worker_prefetch,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=max(1.0, settings.task_time_limit - 5.0),
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_disable_rate_limits=True,
        task_track_started=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    app.modelserve_settings = settings
    app.modelserve_metrics = metrics = WorkerMetrics()
    app.modelserve_models = source = _PerProcess(lambda: models(settings), observer=metrics)
    metrics.served = source.served
    # Made here, in the main process, before the prefork pool forks: one window for all its processes.
    app.modelserve_drift = drift = DriftMonitor(settings.drift_window, settings.drift_min_rows)
    metrics.drift = functools.partial(source.drift, drift)
    # shared=False: the tasks belong to this app only, not to every Celery app made later.
    app.task(name=TASK_PREDICT, bind=True, shared=False, max_retries=settings.task_max_retries)(predict)
    app.task(name=TASK_MODEL_INFO, bind=True, shared=False)(model_info)
    # One app per worker process: these fire in the worker (threads) or each pool child (prefork).
    signals.worker_process_init.connect(source.preload, weak=False)
    signals.worker_ready.connect(source.preload, weak=False)
    # The main process: consume only with a model, and publish the status (prefork: its own copy).
    app.modelserve_supervisor = supervisor = Supervisor(app, settings, source, drift)
    signals.worker_ready.connect(supervisor.on_ready, weak=False)
    signals.worker_shutdown.connect(supervisor.on_shutdown, weak=False)
    app.modelserve_metrics_server = server = MetricsServer(app, settings, metrics)
    signals.worker_ready.connect(server.on_ready, weak=False)
    signals.worker_process_shutdown.connect(server.on_child_exit, weak=False)
    return app


def app_on_first_use(module: str, models: Callable[[Settings], ModelSource] = serving_models):
    """A module ``__getattr__`` giving ``<module>.app`` (what ``celery -A <module>`` asks for).

    The app is built from the environment on that first access, not when the module is imported.
    """

    def __getattr__(name: str) -> Celery:
        if name != "app":
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        app = sys.modules[module].app = create_celery_app(load_settings(require_broker=False), models)
        return app

    return __getattr__


__getattr__ = app_on_first_use(__name__)


def celery_argv(settings: Settings, extra: list[str], app: str = __name__) -> list[str]:
    s = settings
    argv = [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "--pool", s.worker_pool,
        "--concurrency", str(s.worker_concurrency),
        "--prefetch-multiplier", str(s.worker_prefetch),
        "--queues", s.task_queue,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", os.environ.get("MODELSERVE_LOG_LEVEL", "WARNING"),
        "--hostname", f"modelserve-{os.getpid()}@%h",
    ]  # fmt: skip
    return argv + extra


def main(argv: list[str] | None = None, app: str = __name__) -> int:
    """``modelserve-worker [extra celery worker args]``: exec celery worker with tuned settings."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"modelserve-worker: {exc}", file=sys.stderr)
        return 2
    args = celery_argv(settings, list(sys.argv[1:] if argv is None else argv), app)
    prepare_multiproc_dir("modelserve-worker")  # before Celery imports prometheus_client
    os.execv(args[0], args)  # noqa: S606 - fixed argv, no shell
    return 0  # pragma: no cover
