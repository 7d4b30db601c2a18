"""Metrics of the live stack (real RabbitMQ, Celery workers, gunicorn with 2 processes), scraped the
way Prometheus does: the web's /metrics on its load-balanced port, each worker's own endpoint."""

from __future__ import annotations

import os
import signal
import time

import ms_devstack as devstack
import pytest
import requests
from ms_support import requires_rabbitmq
from prometheus_client.parser import text_string_to_metric_families
from test_integration import _broken_model_dir

pytestmark = [pytest.mark.integration, requires_rabbitmq]

ROW = [6, 148, 72, 35, 0, 33.6, 0.627, 50]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape, by (name, sorted labels)."""
    text = requests.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def worker_value(stack, name: str, **labels: str) -> float:
    """A sample summed over the stack's workers, each scraped on its own port."""
    return sum(value(scrape(w.metrics_url), name, **labels) for w in stack.workers if w.poll() is None)


def wait_for(check, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _healthz_pids(url: str, n: int) -> set[int]:
    """n requests on new connections: the gunicorn processes that answered them."""
    return {requests.get(f"{url}/healthz", timeout=10).json()["pid"] for _ in range(n)}


def test_web_counters_are_one_view_of_every_gunicorn_process(make_stack):
    stack = make_stack(workers=1)
    stack.wait_ready()
    healthz = {"endpoint": "/healthz", "method": "GET", "status": "200"}
    already = value(scrape(f"{stack.url}/metrics"), "modelserve_http_requests_total", **healthz)  # start-up
    # Requests on new connections until both gunicorn processes have answered some (bounded).
    pids: set[int] = set()
    sent = 0
    while len(pids) < 2 and sent < 400:
        pids |= _healthz_pids(stack.url, 20)
        sent += 20
    assert len(pids) == 2, f"one gunicorn process answered all {sent} requests"
    predictions = 30
    for _ in range(predictions):
        r = requests.post(f"{stack.url}/api/v1/predict", json={"row": ROW}, timeout=15)
        assert r.status_code == 200
    # Whichever process serves the scrape, the counts are exactly what was sent, with no pid label.
    for _ in range(10):
        samples = scrape(f"{stack.url}/metrics")
        assert value(samples, "modelserve_http_requests_total", **healthz) == already + sent
        assert value(samples, "modelserve_predictions_total", model_version="1.0.0") == predictions
        assert not any("pid" in dict(labels) for _, labels in samples)
    # A gunicorn process killed: its counts stay in the sums (counters never go backwards) and the
    # process gunicorn starts instead adds to them.
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in _healthz_pids(stack.url, 10) and len(_healthz_pids(stack.url, 20)) == 2,
             what="gunicorn to replace the killed process")  # fmt: skip
    samples = scrape(f"{stack.url}/metrics")
    assert value(samples, "modelserve_http_requests_total", **healthz) >= already + sent + 20
    assert value(samples, "modelserve_predictions_total", model_version="1.0.0") == predictions


def test_web_metrics_on_their_own_port_are_served_by_the_gunicorn_master(make_stack):
    port = devstack.free_port()
    stack = make_stack(workers=1, MODELSERVE_WEB_METRICS_PORT=str(port))
    stack.wait_ready()
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    assert requests.get(f"{stack.url}/metrics", timeout=10).status_code == 404  # not on the clients' port
    healthz = {"endpoint": "/healthz", "method": "GET", "status": "200"}
    already = value(scrape(metrics_url), "modelserve_http_requests_total", **healthz)
    pids = _healthz_pids(stack.url, 40)
    samples = scrape(metrics_url)
    assert value(samples, "modelserve_http_requests_total", **healthz) == already + 40
    # The request processes' own view of the fleet, refreshed in the background, reaches the master.
    wait_for(
        lambda: value(scrape(metrics_url), "modelserve_queue_consumers") >= 1, what="the consumers gauge"
    )
    # Every request process killed at once: the master still answers, with the counts so far.
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    samples = scrape(metrics_url)
    assert value(samples, "modelserve_http_requests_total", **healthz) >= already + 40


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_worker_metrics_grow_with_predictions(make_stack, pool):
    """The worker's endpoint (its main process) counts what its threads or pool children did."""
    stack = make_stack(workers=1, MODELSERVE_WORKER_POOL=pool, MODELSERVE_WORKER_CONCURRENCY="2")
    stack.wait_ready()
    (worker,) = stack.workers
    devstack.wait_http(worker.metrics_url, 30)
    before = scrape(worker.metrics_url)
    rows_before = value(before, "modelserve_worker_task_rows_sum", model_version="1.0.0")
    tasks_before = value(before, "modelserve_worker_inference_duration_seconds_count", model_version="1.0.0")
    for n in (1, 3, 5, 7):
        r = requests.post(f"{stack.url}/api/v1/predict", json={"rows": [ROW] * n}, timeout=15)
        assert r.status_code == 200
    after = scrape(worker.metrics_url)
    assert value(after, "modelserve_worker_task_rows_sum", model_version="1.0.0") - rows_before == 16
    tasks = value(after, "modelserve_worker_inference_duration_seconds_count", model_version="1.0.0")
    assert tasks - tasks_before >= 1  # micro-batching may put several requests in one task
    assert value(after, "modelserve_worker_task_rows_count", model_version="1.0.0") == tasks
    assert value(after, "modelserve_worker_inference_duration_seconds_sum", model_version="1.0.0") > 0
    # The served version, when it was loaded and how old it is, all with model_version.
    assert value(after, "modelserve_worker_model_info", model_version="1.0.0") == 1
    assert value(after, "modelserve_worker_model_load_duration_seconds_count", model_version="1.0.0") >= 1
    assert value(after, "modelserve_worker_model_age_seconds", model_version="1.0.0") > 0
    assert value(after, "modelserve_worker_model_load_failures_total", model_version="1.0.0") == 0
    assert not any("pid" in dict(labels) for _, labels in after)


def test_a_model_load_failure_is_counted(make_stack, seed_release):
    stack = make_stack(workers=0, web=False)
    broken_dir, _ = _broken_model_dir(stack, seed_release, "broken-models")
    worker = stack.start_worker(MODELSERVE_MODEL_DIR=str(broken_dir))
    devstack.wait_http(worker.metrics_url, 30)
    failures = "modelserve_worker_model_load_failures_total"
    wait_for(lambda: value(scrape(worker.metrics_url), failures, model_version="1.0.0") >= 1,
             what="a counted load failure")  # fmt: skip
    samples = scrape(worker.metrics_url)
    assert value(samples, "modelserve_worker_model_info", model_version="1.0.0") == 0
    assert value(samples, "modelserve_worker_model_load_duration_seconds_count", model_version="1.0.0") == 0
