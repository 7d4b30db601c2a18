"""Flask web tier (app factory ``modelserve.web:create_app``), served by gunicorn only.

Three blueprints: ``api`` (predict, model, OpenAPI document), ``ops`` (health, readiness, metrics,
and the per-request counters) and ``page`` (the human page). They reach the process's settings,
task layer and metrics through :func:`services`. Imports neither TensorFlow nor LiteRT:
predictions are computed by the Celery workers, reached through
:class:`modelserve.client.TaskClient` (micro-batching over RabbitMQ).

Every response carries an ``X-Request-Id`` (the client's, if it sent a well-formed one) and the
security headers of :data:`SECURITY_HEADERS`. Error bodies say what the client did wrong (or that
the service is unavailable) and hold the request id; what went wrong inside (broker addresses,
workers, paths) goes to the log under that id, never to the client.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Protocol

from flask import Blueprint, Flask, Response, abort, current_app, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from modelserve import __version__
from modelserve.client import ServiceUnavailable, TaskClient
from modelserve.config import ConfigError, Settings, load_settings
from modelserve.features import FEATURES, InputError, parse_json_body, validate_request
from modelserve.metrics import CONTENT_TYPE, WORKER_STATES, Metrics, method_label, prepare_multiproc_dir

log = logging.getLogger(__name__)

# The page loads its own script and stylesheet and calls the API of its own origin; nothing else.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class TaskLayer(Protocol):
    """What the web needs from the worker side (TaskClient in production, a double in tests)."""

    def predict(self, rows: list[list[float]], timeout: float | None = None) -> dict[str, Any]: ...

    def call(self, task: str, args: list[Any], timeout: float | None = None) -> Any: ...

    def broker_reachable(self) -> tuple[bool, str]: ...

    def consumers(self, wait: float = 0.0) -> int | None: ...

    def fleet(self, wait: float = 0.0) -> list[dict[str, Any]]: ...


class Readiness:
    """Cached readiness probe (one probe at a time, result reused for ready_cache_seconds)."""

    def __init__(self, settings: Settings, tasks: TaskLayer) -> None:
        self.settings = settings
        self.tasks = tasks
        self._lock = threading.Lock()
        self._at = -1e9
        self._value: tuple[int, dict[str, Any]] = (503, {"ready": False, "reasons": ["not probed yet"]})

    def get(self) -> tuple[int, dict[str, Any]]:
        if time.monotonic() - self._at < self.settings.ready_cache_seconds:
            return self._value
        with self._lock:
            if time.monotonic() - self._at >= self.settings.ready_cache_seconds:
                self._value = self._probe()
                self._at = time.monotonic()
        return self._value

    def _probe(self) -> tuple[int, dict[str, Any]]:
        """Ready = connected to the broker AND the prediction queue has a consumer.

        Workers consume only while they have a loadable model, so a consumer is a worker that can
        answer; the count comes from the broker (the same for every call), not from whichever
        worker answered a probe. Details of a broker failure go to the log, not to the body.
        """
        # Waits only for this process's first count (connecting included), never afterwards.
        consumers = self.tasks.consumers(
            wait=self.settings.ready_timeout + self.settings.broker_connect_timeout
        )
        broker, why = self.tasks.broker_reachable()
        serving = bool(broker and consumers)
        checks: dict[str, Any] = {"broker": broker, "worker": serving, "model": serving}
        body: dict[str, Any] = {"ready": serving, "checks": checks, "consumers": consumers}
        if not broker:
            log.warning("readiness: broker unreachable: %s", why)
            body["reasons"] = ["broker: not connected to the message broker"]
        elif not consumers:
            body["reasons"] = [
                "worker: no worker with a loadable model consumes the prediction queue"
                if consumers == 0
                else "worker: consumer count unknown (no answer from the broker yet)"
            ]
        if version := _fleet_version(_serving(self.tasks.fleet())):
            body["model_version"] = version
        return (200 if serving else 503), body


def _serving(fleet: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [w for w in fleet if w.get("state") == "serving" and w.get("version")]


def _fleet_version(serving: list[dict[str, Any]]) -> str | None:
    """The version most serving workers have (a tie: the one loaded last)."""
    if not serving:
        return None
    count = Counter(w["version"] for w in serving)
    latest = {
        w["version"]: w.get("loaded_at") or ""
        for w in sorted(serving, key=lambda w: w.get("loaded_at") or "")
    }
    return max(count, key=lambda v: (count[v], latest[v]))


def _number(value: Any) -> float | None:
    """A finite number from a worker's status, else None (a status is data from the broker)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    return float(value) if abs(value) < 1e300 else None


def _fleet_throughput(serving: list[dict[str, Any]]) -> float | None:
    """Rows per second the serving workers predicted over about the last half minute (summed)."""
    rates = [r for r in (_number(w.get("rows_per_second")) for w in serving) if r is not None]
    return round(sum(rates), 2) if rates else None


def _fleet_drift(serving: list[dict[str, Any]], version: str) -> dict[str, Any]:
    """The drift of ``version`` as its workers report it: each worker's window is a share of the
    traffic, so per column the mean over the workers that have enough rows (the monitoring rule's
    aggregation too)."""
    reports = [w["drift"] for w in serving if w["version"] == version and isinstance(w.get("drift"), dict)]
    on = [d for d in reports if d.get("enabled") is True]
    if not on:
        reason = next((str(d.get("reason"))[:200] for d in reports if d.get("reason")), "not reported yet")
        return {"enabled": False, "reason": reason}
    out: dict[str, Any] = {
        "enabled": True,
        "rows": int(sum(_number(d.get("rows")) or 0 for d in on)),
        "min_rows": _number(on[0].get("min_rows")),
        "workers": len(on),
    }
    columns: dict[str, dict[str, list[float]]] = {}
    for report in on:
        if not isinstance(report.get("columns"), dict):
            continue
        for name in ("psi", "ks"):
            for column in (*FEATURES, "score"):
                entry = report["columns"].get(column)
                figure = _number(entry.get(name)) if isinstance(entry, dict) else None
                if figure is not None:
                    columns.setdefault(column, {"psi": [], "ks": []})[name].append(figure)
    out["columns"] = {
        column: {name: round(sum(v) / len(v), 4) if v else None for name, v in figures.items()}
        for column, figures in columns.items()
    }
    return out


def _age_seconds(trained_at: Any) -> float | None:
    try:
        trained = datetime.fromisoformat(str(trained_at))
    except ValueError:
        return None
    if trained.tzinfo is None:
        return None
    return round(max(0.0, (datetime.now(UTC) - trained).total_seconds()), 1)


@dataclass(frozen=True)
class Services:
    """What the blueprints share within one app (one gunicorn process)."""

    settings: Settings
    tasks: TaskLayer
    metrics: Metrics
    readiness: Readiness


def services() -> Services:
    return current_app.extensions["modelserve"]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json", headers=headers
    )


@functools.cache
def _static(name: str) -> bytes:
    return resources.files("modelserve").joinpath(name).read_bytes()


def request_id() -> str:
    """This request's id: the client's X-Request-Id if well-formed, else a new one."""
    rid = g.get("request_id")
    if rid is None:
        incoming = request.headers.get("X-Request-Id", "")
        rid = g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    return rid


def error(message: str, status: int, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    """An error answer: what the client should know, and the request id to quote."""
    return _json({"error": message, **extra, "request_id": request_id()}, status, headers)


# What a client is told for each kind of ServiceUnavailable; the reason itself goes to the log.
_UNAVAILABLE = {
    "timeout": "no worker answered in time",
    "broker": "the message broker is unreachable",
    "no_queue": "no worker has started yet",
    "worker": "a worker failed to compute the answer",
}


def _unavailable(exc: ServiceUnavailable) -> Response:
    services().metrics.unavailable.labels(exc.kind).inc()
    log.warning("request %s: 503 (%s): %s", request_id(), exc.kind, exc.reason)
    message = _UNAVAILABLE.get(exc.kind, "the service is unavailable")
    return error(f"service unavailable: {message}; retry later", 503, {"Retry-After": "1"})


def require_json() -> Response | None:
    """``before_request`` of a JSON API: a body that is not declared JSON is refused with 415."""
    if request.method in ("POST", "PUT", "PATCH") and not request.is_json:
        sent = (request.mimetype or "no Content-Type")[:80]
        return error(f"request body must be JSON: send Content-Type: application/json (got {sent})", 415)
    return None


# --- api: predictions and the model ------------------------------------------------------------

api = Blueprint("api", __name__, url_prefix="/api/v1")
api.before_request(require_json)


@api.post("/predict")
def predict() -> Response:
    s = services()
    try:
        body = parse_json_body(request.get_data(cache=False))
        rows, single = validate_request(body, s.settings.max_batch_rows)
    except InputError as exc:
        return _json({**exc.to_json(), "request_id": request_id()}, exc.status)
    try:
        result = s.tasks.predict(rows)
    except ServiceUnavailable as exc:
        return _unavailable(exc)
    version = result["model_version"]
    s.metrics.predictions.labels(version).inc(len(rows))
    # Built as text: for big batches this is several times faster than json.dumps of dicts.
    preds = [
        f'{{"probability":{p:.6g},"label":{label}}}'
        for p, label in zip(result["probabilities"], result["labels"], strict=True)
    ]
    text = f'{{"model_version":{json.dumps(version)},"predictions":[{",".join(preds)}]'
    if single:
        text += f',"prediction":{preds[0]}'
    # The version that answered, in a header too: during a canary, proxies and load tests can count
    # answers per version without parsing bodies.
    headers = {"X-Model-Version": version}
    if worker := result.get("worker"):
        headers["X-Modelserve-Worker"] = worker
    return Response(text + "}", mimetype="application/json", headers=headers)


@api.get("/model")
def model() -> Response:
    """The fleet: every worker whose status this process holds, and the versions they serve."""
    s = services()
    fleet = sorted(s.tasks.fleet(wait=s.settings.ready_timeout), key=lambda w: w["worker"])
    serving = _serving(fleet)
    workers = [
        {
            k: w.get(k)
            for k in ("worker", "state", "version", "reason", "consuming", "loaded_at", "seen_seconds_ago")
        }
        for w in fleet
    ]
    versions = dict(Counter(w["version"] for w in serving))
    version = _fleet_version(serving)
    if version is None:
        return error(
            "service unavailable: no worker has a loadable model", 503, {"Retry-After": "1"}, workers=workers
        )
    # The model's details from the worker that loaded that version last.
    latest = max((w for w in serving if w["version"] == version), key=lambda w: w.get("loaded_at") or "")
    body = {k: latest.get(k) for k in ("metrics", "trained_at", "loaded_at", "threshold")}
    body.update(
        version=version,
        loaded=True,
        features=latest.get("features") or list(FEATURES),
        versions=versions,
        workers=workers,
        # What the page shows beside the version: how old it is, the traffic, and its drift.
        age_seconds=_age_seconds(latest.get("trained_at")),
        rows_per_second=_fleet_throughput(serving),
        drift=_fleet_drift(serving, version),
    )
    return _json(body)


@api.get("/openapi.json")
def openapi_doc() -> Response:
    return Response(_static("openapi.json"), mimetype="application/json")


# --- ops: health, readiness, metrics -----------------------------------------------------------

ops = Blueprint("ops", __name__)


@ops.before_app_request
def _start_timer() -> None:
    g.t0 = time.perf_counter()
    request_id()


@ops.after_app_request
def _count(response: Response) -> Response:
    metrics = services().metrics
    # Closed label sets: the route's rule (not the path) and a known method, else one value each.
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.requests.labels(rule, method_label(request.method), str(response.status_code)).inc()
    t0 = g.get("t0")
    if t0 is not None:
        metrics.latency.labels(rule).observe(time.perf_counter() - t0)
    response.headers["X-Request-Id"] = request_id()
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@ops.get("/healthz")
def healthz() -> Response:
    return _json({"status": "ok", "pid": os.getpid(), "version": __version__})


@ops.get("/readyz")
def readyz() -> Response:
    status, body = services().readiness.get()
    return _json(body, status)


def _fleet_gauges(s: Services) -> None:
    """The scrape-time gauges, from this process's view of the broker and the fleet."""
    consumers = s.tasks.consumers()
    s.metrics.queue_consumers.set(-1 if consumers is None else consumers)
    states = Counter(w.get("state") for w in s.tasks.fleet())
    for state in WORKER_STATES:
        s.metrics.fleet_workers.labels(state).set(states.get(state, 0))


def _refresh_fleet_gauges(s: Services) -> None:
    """Every status interval, for the life of the process (a daemon thread)."""
    while True:
        try:
            _fleet_gauges(s)
        except Exception:  # never kill the thread over one failed read; the log says why
            log.exception("metrics: refreshing the fleet gauges failed")
        time.sleep(s.settings.status_interval)


@ops.get("/metrics")
def prometheus() -> Response:
    s = services()
    if s.settings.web_metrics_port:
        # Served by the gunicorn master on its own port (gunicorn_hooks), not to the clients.
        abort(404)
    _fleet_gauges(s)
    # Every gunicorn process's samples (multiprocess mode): whichever process answers, one view.
    return Response(s.metrics.render(), content_type=CONTENT_TYPE)


# --- page: the human page ----------------------------------------------------------------------

page = Blueprint("page", __name__)


@page.get("/")
def index() -> Response:
    return Response(_static("static/index.html"), mimetype="text/html; charset=utf-8")


@page.get("/static/app.js")
def script() -> Response:
    return Response(_static("static/app.js"), mimetype="text/javascript; charset=utf-8")


@page.get("/static/app.css")
def stylesheet() -> Response:
    return Response(_static("static/app.css"), mimetype="text/css; charset=utf-8")


# --- the app -----------------------------------------------------------------------------------


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 413:
        return error(f"request body too large (max {current_app.config['MAX_CONTENT_LENGTH']} bytes)", 413)
    response = error(exc.description or exc.name, status)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _unexpected(exc: Exception) -> Response:
    log.exception("request %s: unhandled error", request_id())  # the details stay in the log
    return error("internal error", 500)


def create_app(settings: Settings | None = None, tasks: TaskLayer | None = None) -> Flask:
    settings = settings or load_settings()
    metrics = Metrics()
    if tasks is None:
        tasks = TaskClient(settings, metrics)
        # Connect now (gunicorn builds the app in each worker process, after the fork): the first
        # /readyz of a new process then finds the broker's answer waiting instead of connecting.
        tasks.start()
    app = Flask(__name__, static_folder=None)
    # A bound on the body too: rows * ~150 bytes of JSON each, plus slack.
    app.config["MAX_CONTENT_LENGTH"] = max(64 * 1024, settings.max_batch_rows * 400)
    services_ = Services(settings, tasks, metrics, Readiness(settings, tasks))
    app.extensions["modelserve"] = services_
    if settings.web_metrics_port and isinstance(tasks, TaskClient):
        # The master serves /metrics from the multiprocess files: keep this process's gauges there.
        gauges = threading.Thread(target=_refresh_fleet_gauges, args=(services_,), name="modelserve-gauges")
        gauges.daemon = True
        gauges.start()
    from modelserve.oip import oip  # here: oip imports this module

    for blueprint in (api, ops, page, oip):
        app.register_blueprint(blueprint)
    # Every error is JSON, on every path (also 404/405 outside the blueprints).
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    return app


def gunicorn_argv(settings: Settings, extra: list[str]) -> list[str]:
    argv = [
        sys.executable, "-m", "gunicorn",
        "--worker-class", "gthread",
        "--workers", str(settings.web_workers),
        "--threads", str(settings.web_threads),
        "--bind", settings.bind,
        "--timeout", str(int(max(30, settings.task_timeout * 3))),
        "--graceful-timeout", str(int(max(10, settings.task_timeout * 2))),
        "--keep-alive", "5",
        "--backlog", "2048",
        "--worker-tmp-dir", "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp",  # noqa: S108
        "--name", "modelserve-web",
        "--no-control-socket",  # gunicorn >= 27: else every instance shares ~/.gunicorn/gunicorn.ctl
        "--config", "python:modelserve.gunicorn_hooks",  # child_exit: a dead process's metrics
        "--log-level", os.environ.get("MODELSERVE_LOG_LEVEL", "warning").lower(),
    ]  # fmt: skip
    if settings.access_log:
        argv += ["--access-logfile", "-"]
    return [*argv, *extra, "modelserve.web:create_app()"]


def main(argv: list[str] | None = None) -> int:
    """``modelserve-web [extra gunicorn args]``: exec gunicorn (never the Flask debug server)."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"modelserve-web: {exc}", file=sys.stderr)
        return 2
    args = gunicorn_argv(settings, list(sys.argv[1:] if argv is None else argv))
    prepare_multiproc_dir("modelserve-web")  # before gunicorn imports prometheus_client
    os.execv(args[0], args)  # noqa: S606 - fixed argv, no shell
    return 0  # pragma: no cover
