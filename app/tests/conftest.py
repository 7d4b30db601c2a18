from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import ms_devstack as devstack
import pytest
import requests
from modelserve import release
from ms_support import FakeTaskLayer, make_settings

APP = Path(__file__).resolve().parents[1]
SEED_RELEASE = APP / "seed-release"
DATA = APP / "data" / "pima-indians-diabetes.csv"


@pytest.fixture
def seed_release() -> Path:
    return SEED_RELEASE


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model dir with the seed release installed as 1.0.0 and active."""
    root = tmp_path / "models"
    devstack.install_release(root, SEED_RELEASE)
    release.activate(root, "1.0.0")
    return root


@pytest.fixture
def fake_tasks() -> FakeTaskLayer:
    return FakeTaskLayer()


@pytest.fixture
def client(fake_tasks):
    from modelserve.web import create_app

    app = create_app(make_settings(MODELSERVE_MAX_BATCH_ROWS="50"), tasks=fake_tasks)
    return app.test_client()


# --- integration: a private RabbitMQ, real workers, real gunicorn ------------------------------


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory):
    if not devstack.rabbitmq_available():
        pytest.skip("rabbitmq-server not installed (apt-get install rabbitmq-server)")
    node = devstack.RabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    yield node
    node.stop()


class Stack:
    """Workers + gunicorn on the session's RabbitMQ, with their own queue and model dir.

    ``broker_urls``: each component's URL (``RabbitMQ.urls()``: the web's and the workers' users,
    with the rabbitmq role's permissions)."""

    def __init__(self, broker_urls: dict[str, str], base: Path, **env: str) -> None:
        self.base = base
        self.model_dir = base / "models"
        devstack.install_release(self.model_dir, SEED_RELEASE)
        release.activate(self.model_dir, "1.0.0")
        self.port = devstack.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = {
            "MODELSERVE_TASK_QUEUE": f"modelserve.test.{secrets.token_hex(4)}",
            "MODELSERVE_WEB_WORKERS": "2",
            "MODELSERVE_WEB_THREADS": "16",
            "MODELSERVE_TASK_TIMEOUT": "10",
            "MODELSERVE_MODEL_CHECK_INTERVAL": "0.2",
            "MODELSERVE_STATUS_INTERVAL": "1",
        }
        settings.update(env)
        self.env = devstack.stack_env(
            broker_urls["web"], self.model_dir, f"127.0.0.1:{self.port}", **settings
        )
        self.worker_env = {**self.env, "MODELSERVE_BROKER_URL": broker_urls["worker"]}
        self.workers: list = []
        self.web = None

    def start_worker(self, **env: str):
        """A worker; ``env`` overrides settings for this one (e.g. its own MODELSERVE_MODEL_DIR)."""
        log = self.base / f"worker{len(self.workers)}.log"
        proc = devstack.start_worker({**self.worker_env, **env}, log)
        self.workers.append(proc)
        return proc

    def start_web(self):
        self.web = devstack.start_web(self.env, self.base / "web.log")
        devstack.wait_http(f"{self.url}/healthz", 30)
        return self.web

    def wait_ready(self, timeout: float = 30) -> None:
        devstack.wait_http(f"{self.url}/readyz", timeout)

    def fleet(self) -> dict[str, dict]:
        """The workers /api/v1/model lists, by id (host:pid)."""
        r = requests.get(f"{self.url}/api/v1/model", timeout=15)
        return {w["worker"]: w for w in r.json().get("workers", [])}

    def worker_ids(self, timeout: float = 20, state: str = "serving") -> set[str]:
        """Ask /api/v1/model until every live worker is listed in ``state``."""
        alive = {p.pid for p in self.workers if p.poll() is None}
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and {int(s.rsplit(":", 1)[1]) for s in seen} < alive:
            seen = {w for w, status in self.fleet().items() if status["state"] == state}
            time.sleep(0.2)
        return seen

    def kill_worker(self, proc) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def logs(self) -> str:
        out = []
        for log in sorted(self.base.glob("*.log")):
            out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        devstack.stop_process(self.web, timeout=5, sig=signal.SIGINT)  # gunicorn quick shutdown
        for proc in self.workers:
            devstack.stop_process(proc, timeout=2, sig=signal.SIGQUIT)  # unacked tasks are requeued


@pytest.fixture
def make_stack(rabbitmq, tmp_path):
    stacks: list[Stack] = []

    def factory(workers: int = 1, web: bool = True, broker_urls: dict | None = None, **env: str) -> Stack:
        stack = Stack(broker_urls or rabbitmq.urls(), tmp_path / f"stack{len(stacks)}", **env)
        stacks.append(stack)
        for _ in range(workers):
            stack.start_worker()
        if web:
            stack.start_web()
        return stack

    yield factory
    for stack in stacks:
        stack.stop()


@pytest.fixture(scope="session")
def live_stack(rabbitmq, tmp_path_factory):
    """One shared, non-destructive stack (2 workers) for round-trip, browser and property tests."""
    stack = Stack(rabbitmq.urls(), tmp_path_factory.mktemp("live"))
    stack.start_worker()
    stack.start_worker()
    stack.start_web()
    try:
        stack.wait_ready(40)
    except TimeoutError:
        print(stack.logs())
        stack.stop()
        raise
    yield stack
    stack.stop()


def dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


@pytest.fixture
def copy_seed(tmp_path: Path):
    def factory(name: str = "rel") -> Path:
        dest = tmp_path / name
        shutil.copytree(SEED_RELEASE, dest)
        return dest

    return factory
