"""Flask web tier (app factory ``modelserve.web:create_app``), served by gunicorn only.

Three blueprints: ``api`` (predict, model, OpenAPI document), ``ops`` (health, readiness, metrics,
and the per-request counters) and ``page`` (the human page). They reach the process's settings,
task layer and metrics through :func:`services`. Imports neither TensorFlow nor LiteRT:
predictions are computed by the Celery workers, reached through
:class:`modelserve.client.TaskClient` (micro-batching over RabbitMQ).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from modelserve import __version__
from modelserve.client import ServiceUnavailable, TaskClient
from modelserve.config import ConfigError, Settings, load_settings
from modelserve.features import FEATURES, InputError, parse_json_body, validate_request
from modelserve.metrics import Metrics
from modelserve.protocol import TASK_MODEL_INFO


class TaskLayer(Protocol):
    """What the web needs from the worker side (TaskClient in production, a double in tests)."""

    def predict(self, rows: list[list[float]], timeout: float | None = None) -> dict[str, Any]: ...

    def call(self, task: str, args: list[Any], timeout: float | None = None) -> Any: ...

    def broker_reachable(self) -> tuple[bool, str]: ...


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
        checks: dict[str, Any] = {"broker": False, "worker": False, "model": False}
        reasons: list[str] = []
        ok, why = self.tasks.broker_reachable()
        if not ok:
            reasons.append(f"broker: {why}")
        info: dict[str, Any] = {}
        try:
            info = self.tasks.call(TASK_MODEL_INFO, [], timeout=self.settings.ready_timeout)
            checks["broker"] = checks["worker"] = True
            reasons = []  # a worker answered through the broker: the broker is fine
        except ServiceUnavailable as exc:
            reasons.append(f"worker: {exc.reason}")
        if checks["worker"]:
            if info.get("loaded"):
                checks["model"] = True
            else:
                reasons.append(f"model: {info.get('error', 'not loaded')}")
        body: dict[str, Any] = {"ready": not reasons, "checks": checks}
        if info.get("version"):
            body["model_version"] = info["version"]
        if reasons:
            body["reasons"] = reasons
            return 503, body
        return 200, body


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


def _unavailable(exc: ServiceUnavailable) -> Response:
    services().metrics.unavailable.inc(exc.kind)
    return _json({"error": f"service unavailable: {exc.reason}"}, 503, {"Retry-After": "1"})


# --- api: predictions and the model ------------------------------------------------------------

api = Blueprint("api", __name__, url_prefix="/api/v1")


@api.post("/predict")
def predict() -> Response:
    s = services()
    try:
        body = parse_json_body(request.get_data(cache=False))
        rows, single = validate_request(body, s.settings.max_batch_rows)
    except InputError as exc:
        return _json(exc.to_json(), exc.status)
    try:
        result = s.tasks.predict(rows)
    except ServiceUnavailable as exc:
        return _unavailable(exc)
    version = result["model_version"]
    s.metrics.predictions.inc(version, amount=len(rows))
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
    try:
        info = services().tasks.call(TASK_MODEL_INFO, [])
    except ServiceUnavailable as exc:
        return _unavailable(exc)
    if not info.get("loaded"):
        return _json({"error": f"worker {info.get('worker')} has no model: {info.get('error')}"}, 503)
    info["features"] = info.get("features") or list(FEATURES)
    return _json(info)


@api.get("/openapi.json")
def openapi_doc() -> Response:
    return Response(_static("openapi.json"), mimetype="application/json")


# --- ops: health, readiness, metrics -----------------------------------------------------------

ops = Blueprint("ops", __name__)


@ops.before_app_request
def _start_timer() -> None:
    g.t0 = time.perf_counter()


@ops.after_app_request
def _count(response: Response) -> Response:
    metrics = services().metrics
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.requests.inc(rule, request.method, str(response.status_code))
    t0 = g.get("t0")
    if t0 is not None:
        metrics.latency.observe(time.perf_counter() - t0, rule)
    return response


@ops.get("/healthz")
def healthz() -> Response:
    return _json({"status": "ok", "pid": os.getpid(), "version": __version__})


@ops.get("/readyz")
def readyz() -> Response:
    status, body = services().readiness.get()
    return _json(body, status)


@ops.get("/metrics")
def prometheus() -> Response:
    return Response(services().metrics.render(), mimetype="text/plain; version=0.0.4; charset=utf-8")


# --- page: the human page ----------------------------------------------------------------------

page = Blueprint("page", __name__)


@page.get("/")
def index() -> Response:
    return Response(_static("static/index.html"), mimetype="text/html; charset=utf-8")


@page.get("/static/app.js")
def script() -> Response:
    return Response(_static("static/app.js"), mimetype="text/javascript; charset=utf-8")


# --- the app -----------------------------------------------------------------------------------


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 413:
        body = {"error": f"request body too large (max {current_app.config['MAX_CONTENT_LENGTH']} bytes)"}
    else:
        body = {"error": exc.description or exc.name}
    return _json(body, status)


def _unexpected(exc: Exception) -> Response:  # pragma: no cover - last resort, logged
    current_app.logger.exception("unhandled error")
    return _json({"error": "internal error"}, 500)


def create_app(settings: Settings | None = None, tasks: TaskLayer | None = None) -> Flask:
    settings = settings or load_settings()
    metrics = Metrics()
    if tasks is None:
        tasks = TaskClient(settings, metrics)
    app = Flask(__name__, static_folder=None)
    # A bound on the body too: rows * ~150 bytes of JSON each, plus slack.
    app.config["MAX_CONTENT_LENGTH"] = max(64 * 1024, settings.max_batch_rows * 400)
    app.extensions["modelserve"] = Services(settings, tasks, metrics, Readiness(settings, tasks))
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
    os.execv(args[0], args)  # noqa: S606 - fixed argv, no shell
    return 0  # pragma: no cover
