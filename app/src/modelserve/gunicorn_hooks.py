"""gunicorn server hooks of ``modelserve-web`` (``--config python:modelserve.gunicorn_hooks``).

Multiprocess metrics (:mod:`modelserve.metrics`): a worker process that exits (restarted, killed,
scaled down) has its live gauges dropped from the host's view; its counters stay in the sums.
"""

from __future__ import annotations

from typing import Any

from modelserve.metrics import mark_process_dead


def child_exit(server: Any, worker: Any) -> None:
    mark_process_dead(worker.pid)
