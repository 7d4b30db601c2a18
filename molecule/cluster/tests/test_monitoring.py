"""Monitoring of the whole cluster, from the controller (on the cluster network, like an operator's
SSH tunnel would be): every target of every job up, counted against the inventory; a recording rule
with a value; a stopped worker fires ModelserveWorkerDown in Prometheus, and Alertmanager delivers it
to a webhook receiver this test runs. Runs twice, like test_cluster.py: the second time the spare
host is a worker and must be scraped too (its targets written on the side_effect run).
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import requests
import testinfra.utils.ansible_runner

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
runner = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
# molecule.yml: monitoring_alertmanager_webhook_url, on the scenario network's gateway (this machine).
WEBHOOK_ADDRESS, WEBHOOK_PORT = "10.213.29.1", 19093
ROLE_GROUPS = ["broker", "frontend", "workers", "development", "monitoring"]


def _host(name):
    return runner.get_host(name)


def _monitor():
    return runner.get_hosts("monitoring")[0]


@pytest.fixture(scope="module")
def prometheus():
    addr = _host(_monitor()).interface("eth0").addresses[0]
    return f"http://{addr}:9090"


def _api(prometheus, path, **params):
    r = requests.get(f"{prometheus}/api/v1/{path}", params=params, timeout=10)
    r.raise_for_status()
    return r.json()["data"]


def _workers():
    """Worker hosts now: the inventory's, plus the spare host once side_effect made it one."""
    names = set(runner.get_hosts("workers")) | {"cl-spare"}
    return sorted(n for n in names if _host(n).service("modelserve-worker@1").is_running)


def _expected_targets():
    """job -> sorted host names, one per target, from the inventory (the monitoring play's jobs)."""
    workers = _workers()
    role_hosts = {h for g in ROLE_GROUPS for h in runner.get_hosts(g)} | set(workers)
    per_worker = {w: int(runner.get_variables(w).get("model_serving_worker_processes", 1)) for w in workers}
    return {
        "node": sorted(role_hosts),
        "web": sorted(runner.get_hosts("frontend")),
        "worker": sorted(w for w in workers for _ in range(per_worker[w])),
        "rabbitmq": sorted(runner.get_hosts("broker")),
        "prometheus": [_monitor()],
        "alertmanager": [_monitor()],
    }


def _targets(prometheus):
    found = {}
    for t in _api(prometheus, "targets", state="active")["activeTargets"]:
        found.setdefault(t["labels"]["job"], []).append((t["labels"]["host"], t["health"], t["lastError"]))
    return found


def _wait(check, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(2)


def test_every_target_of_every_job_is_up(prometheus):
    expected = _expected_targets()

    def all_up():
        found = _targets(prometheus)
        hosts = {job: sorted(h for h, _, _ in found.get(job, [])) for job in expected}
        up = all(health == "up" for job in expected for _, health, _ in found.get(job, []))
        return (hosts == expected and up) or None

    # Scrapes every 5 s (molecule.yml); file_sd changes are picked up within seconds. After
    # test_cluster.py's VIP kill the killed front end's exporters come back with its boot, which
    # under CI's load can take minutes: the wait is long, the passing case short.
    try:
        _wait(all_up, 300, "every target up")
    except AssertionError:
        pytest.fail(f"expected {expected}, Prometheus has {_targets(prometheus)}")
    assert sum(len(v) for v in expected.values()) >= 8


def test_a_recording_rule_has_a_value(prometheus):
    def value():
        result = _api(prometheus, "query", query='job:up:sum{job="worker"}')["result"]
        return result or None

    result = _wait(value, 60, "job:up:sum")
    assert float(result[0]["value"][1]) == len(_expected_targets()["worker"])


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    _Receiver.received = []
    # On the scenario network's gateway only: the monitoring container posts here.
    server = ThreadingHTTPServer((WEBHOOK_ADDRESS, WEBHOOK_PORT), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield _Receiver.received
    server.shutdown()
    server.server_close()


def test_a_stopped_worker_fires_worker_down_and_reaches_the_webhook(prometheus, webhook):
    # Once per scenario, before side_effect (test_cluster.py's VIP kill runs after it): the alert's
    # path does not depend on the number of worker hosts, and waiting for it costs minutes.
    if _host("cl-spare").file("/etc/systemd/system/modelserve-worker@.service").exists:
        pytest.skip("runs once, before side_effect")
    name = _workers()[0]
    worker = _host(name)

    def firing():
        alerts = _api(prometheus, "alerts")["alerts"]
        return [
            a
            for a in alerts
            if a["labels"]["alertname"] == "ModelserveWorkerDown"
            and a["labels"].get("host") == name
            and a["state"] == "firing"
        ] or None

    assert not firing(), "ModelserveWorkerDown fires before the worker is stopped"
    worker.check_output("systemctl stop modelserve-worker@1")
    try:
        alert = _wait(firing, 90, "ModelserveWorkerDown firing in Prometheus")[0]
        assert alert["labels"]["severity"] == "page"

        def delivered():
            return [
                a
                for message in webhook
                for a in message.get("alerts", [])
                if a["labels"]["alertname"] == "ModelserveWorkerDown"
                and a["status"] == "firing"
                and a["labels"].get("host") == name
            ] or None

        got = _wait(delivered, 90, "the alert at the webhook receiver")
        assert got[0]["annotations"]["summary"].startswith("Worker process ")
    finally:
        worker.check_output("systemctl start modelserve-worker@1")
    # Back up: the target answers again, the alert stops firing.
    _wait(lambda: not firing(), 90, "ModelserveWorkerDown to resolve")
