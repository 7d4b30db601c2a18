"""The shipped drift alert, evaluated by a real Prometheus scraping a real worker.

The live stack (RabbitMQ, a Celery worker, gunicorn) serves the seed release; Prometheus (Debian's
``prometheus``, on loopback) scrapes the worker's /metrics every second and evaluates the collection's
``roles/monitoring/files/rules/drift.rules.yml`` as shipped. Held-out Pima rows (the seed release's
split, never trained on) raise no alert; the same rows with blood pressure shifted by 15 mmHg make
``ModelserveFeatureDrift`` fire for blood_pressure and no other feature.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import ms_devstack as devstack
import pytest
import requests
from ms_support import requires_rabbitmq
from test_drift import heldout_rows

RULES = Path(__file__).resolve().parents[2] / "roles" / "monitoring" / "files" / "rules" / "drift.rules.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SHIFTED = "blood_pressure"

pytestmark = [
    pytest.mark.integration,
    requires_rabbitmq,
    pytest.mark.skipif(
        not Path(PROMETHEUS).is_file(),
        reason="prometheus not installed (apt-get install prometheus; scripts/bootstrap --test does)",
    ),
]


class Prometheus:
    def __init__(self, base: Path, targets: list[str]) -> None:
        self.port = devstack.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        config = base / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{RULES}]\n"
            "scrape_configs:\n"
            "  - job_name: worker\n"
            f"    static_configs: [{{targets: [{', '.join(targets)}]}}]\n",
            encoding="utf-8",
        )
        self.proc = subprocess.Popen(
            [
                PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={base / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
            ],
            stdout=(base / "prometheus.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        devstack.wait_http(f"{self.url}/-/ready", 30)

    def query(self, expr: str) -> dict[str, float]:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        return {s["metric"].get("feature", ""): float(s["value"][1]) for s in r.json()["data"]["result"]}

    def alerts(self) -> list[dict]:
        r = requests.get(f"{self.url}/api/v1/alerts", timeout=10)
        r.raise_for_status()
        return [a for a in r.json()["data"]["alerts"] if a["labels"]["alertname"].endswith("Drift")]

    def stop(self) -> None:
        devstack.stop_process(self.proc, timeout=10)


def _send(url: str, rows, total: int) -> None:
    """``total`` rows, the given ones over and over, 50 per request."""
    sent = 0
    while sent < total:
        chunk = [rows[(sent + i) % len(rows)].tolist() for i in range(min(50, total - sent))]
        r = requests.post(f"{url}/api/v1/predict", json={"rows": chunk}, timeout=15)
        assert r.status_code == 200, r.text
        sent += len(chunk)


def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(1)


def test_held_out_rows_raise_no_alert_and_one_shifted_feature_fires_alone(make_stack, seed_release, tmp_path):
    assert RULES.is_file(), RULES
    stack = make_stack(workers=1, MODELSERVE_DRIFT_WINDOW="1000", MODELSERVE_DRIFT_MIN_ROWS="100")
    stack.wait_ready()
    (worker,) = stack.workers
    devstack.wait_http(worker.metrics_url, 30)
    target = worker.metrics_url.split("/")[2]
    prometheus = Prometheus(tmp_path / "prometheus", [target])
    try:
        recorded = "feature_model_version:modelserve_worker_drift_psi:avg"
        rows = heldout_rows(seed_release)

        # Held-out rows: a full window of them, evaluated by the rule: every column below the band.
        _send(stack.url, rows, 1000)
        _until(lambda: len(prometheus.query(recorded)) == 9, 60, "Prometheus to record PSI of 9 columns")
        time.sleep(5)  # five more scrapes and evaluations of the same window
        held_out = prometheus.query(recorded)
        assert max(held_out.values()) < 0.25, held_out
        assert prometheus.alerts() == [], prometheus.alerts()  # neither firing nor pending

        # One feature shifted (a blood pressure meter reading 15 mmHg high): a window of those rows.
        shifted = rows.copy()
        shifted[:, 2] += 15
        _send(stack.url, shifted, 1000)
        _until(lambda: prometheus.query(recorded).get(SHIFTED, 0) > 0.25, 30, "the shifted PSI recorded")
        firing = _until(
            lambda: [a for a in prometheus.alerts() if a["state"] == "firing"],
            120,  # the rule's `for: 1m`, then an evaluation
            "ModelserveFeatureDrift to fire",
        )
        print("held-out PSI:", held_out, "\nshifted PSI:", prometheus.query(recorded))
        features = {
            a["labels"]["feature"]
            for a in prometheus.alerts()
            if a["labels"]["alertname"] == "ModelserveFeatureDrift"
        }
        assert features == {SHIFTED}, prometheus.alerts()
        (alert,) = [a for a in firing if a["labels"]["alertname"] == "ModelserveFeatureDrift"]
        assert alert["labels"]["model_version"] == "1.0.0" and alert["labels"]["band"] == "significant"
        assert float(alert["value"]) > 0.25
        # The scores moved little: no prediction drift either.
        assert not [a for a in prometheus.alerts() if a["labels"]["alertname"] == "ModelservePredictionDrift"]
    finally:
        prometheus.stop()
