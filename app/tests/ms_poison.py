"""A worker with one more task, a poison message: test support, not part of the package.

The production Celery app (:func:`modelserve.worker.create_celery_app`, same queue declaration)
plus ``modelserve.test.poison``, a task that always fails and hands its message back to the queue
(``Reject(requeue=True)``), the way a task that crashes its worker comes back for ever.
"""

from __future__ import annotations

import sys

from celery import Celery, Task
from celery.exceptions import Reject
from modelserve import worker
from modelserve.config import load_settings

POISON = "modelserve.test.poison"


def poison(task: Task) -> None:
    raise Reject("poison", requeue=True)


def __getattr__(name: str) -> Celery:
    """``ms_poison.app`` for ``celery -A ms_poison``, built from the environment on first use."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = sys.modules[__name__].app = worker.create_celery_app(load_settings(require_broker=False))
    app.task(name=POISON, bind=True, shared=False)(poison)
    return app


def main(argv: list[str] | None = None) -> int:
    """Like ``modelserve-worker``, with this module's app."""
    return worker.main(argv, app=__name__)
