"""gunicorn server hooks of ``modelserve-web`` (``--config python:modelserve.gunicorn_hooks``).

Multiprocess metrics (:mod:`modelserve.metrics`): a worker process that exits (restarted, killed,
scaled down) has its live gauges dropped from the host's view; its counters stay in the sums.

With ``MODELSERVE_WEB_METRICS_PORT`` set, the master serves ``/metrics`` on that port (not on the
public HTTP port, where the app answers 404): one view of every process, answered even while all
request threads are busy, and firewalled apart from the clients' port.
"""

from __future__ import annotations

import logging
from typing import Any

from modelserve.config import load_settings
from modelserve.metrics import mark_process_dead, serve_multiprocess

log = logging.getLogger("modelserve.web")
_metrics_server: Any = None


def when_ready(server: Any) -> None:
    """In the master, before it forks the request processes: start the metrics server."""
    global _metrics_server  # one server per master
    settings = load_settings()
    if settings.web_metrics_port and _metrics_server is None:
        _metrics_server = serve_multiprocess(settings.web_metrics_address, settings.web_metrics_port)
        server.log.info("metrics on %s:%s", settings.web_metrics_address, settings.web_metrics_port)


def post_fork(server: Any, worker: Any) -> None:
    """A request process does not keep the master's metrics socket open (no thread serves it here),
    and logs through gunicorn's error log: each line with its time and process, at its level."""
    if _metrics_server is not None:
        _metrics_server.socket.close()
    app_log = logging.getLogger("modelserve")
    app_log.handlers = list(server.log.error_log.handlers)
    app_log.setLevel(server.log.error_log.level)
    app_log.propagate = False


def child_exit(server: Any, worker: Any) -> None:
    mark_process_dead(worker.pid)
