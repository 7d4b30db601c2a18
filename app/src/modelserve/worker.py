"""Celery workers: LiteRT inference, model loaded once per worker process, hot release switching.

:func:`create_celery_app` builds a configured app from :class:`~modelserve.config.Settings`;
importing this module configures nothing. ``celery -A modelserve.worker`` (what
``modelserve-worker`` execs) asks for the module's ``app``, which is built from the environment
on that first access. Imports only numpy + ai-edge-litert, never TensorFlow.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

from celery import Celery, Task, signals
from celery.worker.consumer import Consumer

from modelserve.config import ConfigError, Settings, load_settings
from modelserve.model import ModelHolder, ModelUnavailable, Predictor
from modelserve.protocol import TASK_MODEL_INFO, TASK_PREDICT, settings_task_queue

log = logging.getLogger(__name__)


class ModelSource(Protocol):
    """Where a task gets its model: ``get()`` returns a Predictor or raises ModelUnavailable."""

    def get(self) -> Predictor: ...


def serving_models(settings: Settings) -> ModelSource:
    """Production: the release ``current`` points at, loaded once, followed when it moves."""
    return ModelHolder(settings.model_dir, settings.model_check_interval)


class _PerProcess:
    """One model source per process, made on first use (so after the prefork pool forked)."""

    def __init__(self, make: Callable[[], ModelSource]) -> None:
        self._make = make
        self._source: ModelSource | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def get(self) -> Predictor:
        if self._source is None or self._pid != os.getpid():
            with self._lock:
                if self._source is None or self._pid != os.getpid():
                    self._source = self._make()
                    self._pid = os.getpid()
        return self._source.get()

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


def _check_rows(rows: Any) -> None:
    # The web validated already; this guards against other publishers.
    if isinstance(rows, str):
        return  # packed float32, checked when unpacked
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and len(r) == 8 for r in rows):
        raise ValueError("rows must be a non-empty list of 8-number lists")


def predict(task: Task, rows: list[list[float]] | str) -> dict[str, Any]:
    """Rows as a list of 8-number lists, or base64 float32 (what the web sends, see wire)."""
    _check_rows(rows)
    try:
        model = _models(task).get()
    except ModelUnavailable as exc:
        # Bounded retry: a release may be mid-install. The web gives up after its own timeout.
        raise task.retry(exc=exc, countdown=0.2) from None
    result = model.predict_packed(rows) if isinstance(rows, str) else model.predict(rows)
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
    app = Celery("modelserve", set_as_current=False)
    app.conf.update(
        # Every broker node, ';'-separated: a lost connection is retried on the next one.
        broker_url=settings.broker_url or None,
        broker_failover_strategy="round-robin",
        broker_connection_retry_on_startup=True,
        # AMQP heartbeats: a silently dead broker node is noticed within two intervals.
        broker_heartbeat=settings.broker_heartbeat,
        # Off unless asked: whoever can publish to the broker could otherwise inspect, purge or shut
        # down the workers with `celery control`. Nothing here uses it (readiness asks a task).
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
    app.modelserve_models = source = _PerProcess(lambda: models(settings))
    # shared=False: the tasks belong to this app only, not to every Celery app made later.
    app.task(name=TASK_PREDICT, bind=True, shared=False, max_retries=settings.task_max_retries)(predict)
    app.task(name=TASK_MODEL_INFO, bind=True, shared=False)(model_info)
    # One app per worker process: these fire in the worker (threads) or each pool child (prefork).
    signals.worker_process_init.connect(source.preload, weak=False)
    signals.worker_ready.connect(source.preload, weak=False)
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
    os.execv(args[0], args)  # noqa: S606 - fixed argv, no shell
    return 0  # pragma: no cover
