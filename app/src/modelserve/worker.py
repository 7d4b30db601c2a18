"""Celery workers: LiteRT inference, model loaded once per worker process, hot release switching.

Run with ``modelserve-worker`` (wraps ``celery worker`` with the settings below). Imports only
numpy + ai-edge-litert (never TensorFlow), except the benchmark-only ``predict_naive`` task.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from typing import Any

from celery import Celery, signals

from modelserve.config import ConfigError, load_settings
from modelserve.model import ModelHolder, ModelUnavailable
from modelserve.protocol import TASK_MODEL_INFO, TASK_PREDICT, TASK_PREDICT_NAIVE, task_queue
from modelserve.release import CURRENT

log = logging.getLogger(__name__)

settings = load_settings(require_broker=False)

app = Celery("modelserve")
app.conf.update(
    broker_url=settings.broker_url or None,
    broker_connection_retry_on_startup=True,
    broker_heartbeat=30,
    result_backend="rpc://",
    result_persistent=False,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_queues=[task_queue(settings.task_queue)],
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


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


_holder: ModelHolder | None = None
_holder_pid = -1
_holder_lock = threading.Lock()


def holder() -> ModelHolder:
    """The process's model holder (created after fork for the prefork pool)."""
    global _holder, _holder_pid
    if _holder is None or _holder_pid != os.getpid():
        with _holder_lock:
            if _holder is None or _holder_pid != os.getpid():
                _holder = ModelHolder(settings.model_dir, settings.model_check_interval)
                _holder_pid = os.getpid()
    return _holder


def _check_rows(rows: Any) -> None:
    # The web validated already; this guards against other publishers.
    if isinstance(rows, str):
        return  # packed float32, checked when unpacked
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and len(r) == 8 for r in rows):
        raise ValueError("rows must be a non-empty list of 8-number lists")


@app.task(name=TASK_PREDICT, bind=True, max_retries=settings.task_max_retries)
def predict(self, rows: list[list[float]] | str) -> dict[str, Any]:
    """Rows as a list of 8-number lists, or base64 float32 (what the web sends, see protocol)."""
    _check_rows(rows)
    try:
        model = holder().get()
    except ModelUnavailable as exc:
        # Bounded retry: a release may be mid-install. The web gives up after its own timeout.
        raise self.retry(exc=exc, countdown=0.2) from None
    result = model.predict_packed(rows) if isinstance(rows, str) else model.predict(rows)
    result["worker"] = worker_id()
    return result


@app.task(name=TASK_MODEL_INFO)
def model_info() -> dict[str, Any]:
    info: dict[str, Any] = {"worker": worker_id()}
    try:
        info.update(holder().get().info())
        info["loaded"] = True
    except ModelUnavailable as exc:
        info.update(loaded=False, error=str(exc))
    return info


@app.task(name=TASK_PREDICT_NAIVE, bind=True, max_retries=settings.task_max_retries)
def predict_naive(self, rows: list[list[float]]) -> dict[str, Any]:
    """Benchmark baseline only: loads model.keras for EVERY task and uses keras predict (needs TF)."""
    _check_rows(rows)
    import json

    import keras
    import numpy as np

    release = settings.model_dir / CURRENT
    meta = json.loads((release / "metadata.json").read_text(encoding="utf-8"))
    model = keras.models.load_model(release / "model.keras")
    probs = model.predict(np.asarray(rows, dtype=np.float32), verbose=0).reshape(-1)
    return {
        "model_version": meta["version"],
        "probabilities": [round(float(p), 6) for p in probs],
        "labels": [int(p >= meta.get("threshold", 0.5)) for p in probs],
    }


@signals.worker_process_init.connect
@signals.worker_ready.connect
def _preload(**_: Any) -> None:
    """Load the model when the worker (process) starts, not on the first task."""
    try:
        model = holder().get()
        log.warning("model %s loaded from %s", model.version, model.release_dir)
    except ModelUnavailable as exc:
        log.error("no model yet: %s (tasks will retry)", exc)


def celery_argv(extra: list[str]) -> list[str]:
    s = settings
    argv = [
        sys.executable, "-m", "celery", "-A", "modelserve.worker", "worker",
        "--pool", s.worker_pool,
        "--concurrency", str(s.worker_concurrency),
        "--prefetch-multiplier", str(s.worker_prefetch),
        "--queues", s.task_queue,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", os.environ.get("MODELSERVE_LOG_LEVEL", "WARNING"),
        "--hostname", f"modelserve-{os.getpid()}@%h",
    ]  # fmt: skip
    return argv + extra


def main(argv: list[str] | None = None) -> int:
    """``modelserve-worker [extra celery worker args]``: exec celery worker with tuned settings."""
    try:
        load_settings()
    except ConfigError as exc:
        print(f"modelserve-worker: {exc}", file=sys.stderr)
        return 2
    args = celery_argv(list(sys.argv[1:] if argv is None else argv))
    os.execv(args[0], args)  # noqa: S606 - fixed argv, no shell
    return 0  # pragma: no cover
