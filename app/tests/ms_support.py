"""Shared test helpers (a uniquely named module: app/edge/tests has its own conftest)."""

from __future__ import annotations

from typing import Any

import ms_devstack as devstack
import pytest
from modelserve.client import ServiceUnavailable
from modelserve.config import load_settings
from modelserve.protocol import TASK_MODEL_INFO
from modelserve.wire import labels


class FakeTaskLayer:
    """Test double for modelserve.client.TaskClient: no broker, deterministic probabilities."""

    def __init__(self, version: str = "1.0.0", fail: str | None = None) -> None:
        self.version = version
        self.fail = fail
        self.calls: list[tuple[str, Any]] = []

    def predict(self, rows, timeout=None):
        self.calls.append(("predict", rows))
        if self.fail:
            raise ServiceUnavailable(self.fail, "timeout")
        probs = [min(1.0, r[1] / 200.0) for r in rows]  # glucose-driven, enough to check plumbing
        return {
            "model_version": self.version,
            "probabilities": probs,
            "labels": labels(probs),
        }

    def call(self, task, args, timeout=None):
        self.calls.append((task, args))
        if self.fail:
            raise ServiceUnavailable(self.fail, "timeout")
        if task == TASK_MODEL_INFO:
            return {
                "loaded": True,
                "version": self.version,
                "metrics": {},
                "loaded_at": "now",
                "worker": "fake",
            }
        raise AssertionError(task)

    def broker_reachable(self):
        return (not self.fail, self.fail or "")

    def consumers(self, wait=0.0):
        self.calls.append(("consumers", wait))
        return 0 if self.fail else 1

    def fleet(self, wait=0.0):
        if self.fail:
            return []
        return [
            {
                "worker": "fake:1",
                "state": "serving",
                "consuming": True,
                "version": self.version,
                "metrics": {},
                "loaded_at": "now",
                "ttl": 7.0,
                "seen_seconds_ago": 0.1,
            }
        ]


def make_settings(**env: str):
    base = {
        "MODELSERVE_BROKER_URL": "amqp://test:unused@127.0.0.1:1/test",
        "MODELSERVE_MODEL_DIR": "/nonexistent",
    }
    base.update(env)
    return load_settings(base)


requires_rabbitmq = pytest.mark.skipif(
    not devstack.rabbitmq_available(),
    reason="rabbitmq-server not installed (apt-get install rabbitmq-server)",
)
