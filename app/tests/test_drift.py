"""Drift without labels: the profile's statistics, the shared window, and the live worker's gauges."""

from __future__ import annotations

import json
import os
import struct
import time

import ms_devstack as devstack
import numpy as np
import pytest
import requests
from modelserve import drift, train
from modelserve.drift import COLUMNS, DriftMonitor, DriftWindow, Profile
from modelserve.litert import TFLiteModel
from ms_support import FakeTaskLayer, make_settings, requires_rabbitmq
from test_metrics import scrape, value, wait_for

SEED = train.DEFAULT_DATA.parents[1] / "seed-release"


def heldout_rows(seed_release) -> np.ndarray:
    """The seed release's held-out split (never trained on), as its metadata describes it."""
    meta = json.loads((seed_release / "metadata.json").read_text())
    split = meta["training"]["split"]
    x, y = train.load_csv(train.DEFAULT_DATA)
    _, test = train.stratified_split(y, split["test_fraction"], split["seed"])
    return x[test]


@pytest.fixture(scope="module")
def seed_profile() -> Profile:
    return Profile(drift.read_profile(SEED / drift.PROFILE))


def _window(rows: np.ndarray) -> np.ndarray:
    scores = np.asarray(TFLiteModel(SEED / "model.tflite").predict(rows), dtype=np.float32)
    return np.column_stack([rows, scores]).astype(np.float32)


def test_training_rows_have_no_drift_and_held_out_rows_little(seed_profile, seed_release):
    x, y = train.load_csv(train.DEFAULT_DATA)
    train_idx, _ = train.stratified_split(y, 0.2, 42)
    same = seed_profile.compare(_window(x[train_idx]))
    assert all(psi == 0 for psi, _ in same.values()), same
    assert all(ks < 0.01 for _, ks in same.values()), same  # exact but for the score's 256 points
    held = seed_profile.compare(_window(heldout_rows(seed_release)))
    assert list(held) == list(COLUMNS)
    assert all(psi < 0.25 for psi, _ in held.values()), held  # sampling noise only (153 rows)


def test_one_shifted_feature_drifts_alone(seed_profile, seed_release):
    rows = heldout_rows(seed_release).copy()
    rows[:, 2] += 15  # blood_pressure
    stats = seed_profile.compare(_window(rows))
    assert stats["blood_pressure"][0] > 0.25 and stats["blood_pressure"][1] > 0.3, stats
    others = {k: v for k, v in stats.items() if k not in ("blood_pressure", "score")}
    assert all(psi < 0.25 for psi, _ in others.values()), others


def test_ks_is_the_largest_distance_between_the_distribution_functions(seed_profile):
    # A window of one value, v: F_live jumps from 0 to 1 at v, so D = max(F_ref(v-), 1 - F_ref(v)).
    column = COLUMNS.index("glucose")
    values, cdf = seed_profile.values[column], seed_profile.cdf[column]
    v = values[len(values) // 2]
    below = cdf[np.searchsorted(values, v) - 1]
    window = np.zeros((5, 9), dtype=np.float32)
    window[:, column] = v
    _, ks = seed_profile.compare(window)["glucose"]
    assert ks == pytest.approx(max(below, 1 - cdf[np.searchsorted(values, v)]), abs=1e-6)


def test_window_keeps_the_last_rows_of_one_version():
    window = DriftWindow(5)
    rows = np.arange(7 * 8, dtype=np.float32).reshape(7, 8)
    window.add("1.0.0", rows[:3], np.zeros(3, np.float32))
    window.add("1.0.0", rows[3:], np.ones(4, np.float32))
    kept = window.snapshot("1.0.0")
    assert sorted(kept[:, 0]) == sorted(rows[2:, 0])  # the last 5 of 7
    assert window.snapshot("2.0.0") is None
    window.add("2.0.0", rows[:1], np.zeros(1, np.float32))  # a new version starts a new window
    assert len(window.snapshot("2.0.0")) == 1 and window.snapshot("1.0.0") is None
    assert window.rows_total == 8
    window.add("2.0.0", rows, np.zeros(7, np.float32))  # more rows than the window: the last 5
    assert sorted(window.snapshot("2.0.0")[:, 0]) == sorted(rows[2:, 0])


def test_window_is_shared_with_forked_processes():
    """What the prefork pool relies on: children's rows are in the parent's window."""
    window = DriftWindow(100)
    children = []
    for i in range(3):
        pid = os.fork()
        if pid == 0:  # the child: add 10 rows, then leave without running the parent's cleanup
            try:
                window.add("1.0.0", np.full((10, 8), i, np.float32), np.zeros(10, np.float32))
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    rows = window.snapshot("1.0.0")
    assert len(rows) == 30 and sorted(set(rows[:, 0])) == [0, 1, 2]


def test_summary_waits_for_min_rows_and_says_why_drift_is_off(seed_profile):
    monitor = DriftMonitor(50, min_rows=10)
    rows = np.tile(_window(heldout_rows(SEED)), (1, 1))
    monitor.observe("1.0.0", rows[:9, :8], rows[:9, 8])
    assert monitor.summary("1.0.0", seed_profile) == {
        "enabled": True,
        "rows": 9,
        "window": 50,
        "min_rows": 10,
    }
    monitor.observe("1.0.0", rows[9:20, :8], rows[9:20, 8])
    summary = monitor.summary("1.0.0", seed_profile)
    assert summary["rows"] == 20 and list(summary["columns"]) == list(COLUMNS)
    assert monitor.summary("1.0.0", None) == {
        "enabled": False,
        "reason": "release 1.0.0 has no drift_profile.json",
    }
    off = DriftMonitor(0, min_rows=10)
    off.observe("1.0.0", rows[:5, :8], rows[:5, 8])
    assert off.summary("1.0.0", seed_profile)["enabled"] is False
    assert off.window.rows_total == 5  # still counted: the worker's throughput


def test_drift_settings():
    s = make_settings()
    assert (s.drift_window, s.drift_min_rows) == (1000, 200)
    s = make_settings(MODELSERVE_DRIFT_WINDOW="0", MODELSERVE_DRIFT_MIN_ROWS="5")
    assert (s.drift_window, s.drift_min_rows) == (0, 5)
    from modelserve.config import ConfigError

    with pytest.raises(ConfigError, match="MODELSERVE_DRIFT_MIN_ROWS must be an integer >= 1"):
        make_settings(MODELSERVE_DRIFT_MIN_ROWS="0")
    with pytest.raises(ConfigError, match="MODELSERVE_DRIFT_WINDOW must be an integer"):
        make_settings(MODELSERVE_DRIFT_WINDOW="lots")


# --- the live worker ---------------------------------------------------------------------------


def _oip_binary(url: str, rows: np.ndarray) -> requests.Response:
    raw = struct.pack(f"<{rows.size}f", *rows.reshape(-1).tolist())
    tensor = {"name": "input", "datatype": "FP32", "shape": list(rows.shape)}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return requests.post(
        f"{url}/v2/models/pima-diabetes/infer",
        data=header + raw,
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
        timeout=15,
    )


@pytest.mark.integration
@requires_rabbitmq
def test_worker_gauges_cover_every_pool_process_and_both_protocols(make_stack, seed_release):
    """prefork with 2 pool processes: the worker's one window holds every row, /api/v1's and /v2's."""
    stack = make_stack(
        workers=1,
        MODELSERVE_WORKER_POOL="prefork",
        MODELSERVE_WORKER_CONCURRENCY="2",
        MODELSERVE_DRIFT_MIN_ROWS="100",
    )
    stack.wait_ready()
    (worker,) = stack.workers
    devstack.wait_http(worker.metrics_url, 30)
    before = scrape(worker.metrics_url)
    assert value(before, "modelserve_worker_drift_enabled", model_version="1.0.0") == 1
    assert value(before, "modelserve_worker_drift_window_rows", model_version="1.0.0") == 0
    assert not [k for k in before if k[0] == "modelserve_worker_drift_psi"]  # fewer than min rows
    rows = heldout_rows(seed_release)
    for chunk in np.array_split(rows[:100], 20):  # 20 requests: both pool processes take some
        r = requests.post(f"{stack.url}/api/v1/predict", json={"rows": chunk.tolist()}, timeout=15)
        assert r.status_code == 200
    for chunk in np.array_split(rows[100:], 10):
        assert _oip_binary(stack.url, chunk).status_code == 200
    samples = scrape(worker.metrics_url)
    assert value(samples, "modelserve_worker_drift_window_rows", model_version="1.0.0") == len(rows)
    for column in COLUMNS:
        psi = value(samples, "modelserve_worker_drift_psi", feature=column, model_version="1.0.0")
        ks = value(samples, "modelserve_worker_drift_ks_statistic", feature=column, model_version="1.0.0")
        assert 0 < psi < 0.25 and 0 < ks < 0.2, (column, psi, ks)

    # The same figures reach the front end in the worker's status (what the page shows).
    def model() -> dict:
        # A 503 (no worker status held) while a busy worker's status is late: its TTL is 4 s here.
        for _ in range(20):
            r = requests.get(f"{stack.url}/api/v1/model", timeout=10)
            if r.status_code != 503:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        return r.json()

    wait_for(lambda: model()["drift"].get("rows") == len(rows), 15, "the worker's status to carry the window")
    body = model()
    assert body["drift"]["enabled"] is True and body["drift"]["workers"] == 1
    for column in COLUMNS:
        psi = value(samples, "modelserve_worker_drift_psi", feature=column, model_version="1.0.0")
        assert body["drift"]["columns"][column]["psi"] == pytest.approx(psi, abs=1e-4)
    assert body["age_seconds"] > 0 and body["rows_per_second"] >= 0


# --- the front end's view of the fleet ---------------------------------------------------------


class _Fleet(FakeTaskLayer):
    def __init__(self, statuses: list[dict]) -> None:
        super().__init__()
        self.statuses = statuses

    def fleet(self, wait=0.0):
        base = {
            "state": "serving",
            "consuming": True,
            "version": "1.0.0",
            "trained_at": "2026-11-25T10:45:49+00:00",
        }
        return [{"worker": f"w:{i}", **base, **s} for i, s in enumerate(self.statuses)]


def _model(statuses: list[dict]) -> dict:
    from modelserve.web import create_app

    app = create_app(make_settings(), tasks=_Fleet(statuses))
    r = app.test_client().get("/api/v1/model")
    assert r.status_code == 200
    return r.json


def test_the_fleet_view_averages_the_workers_drift_and_sums_their_throughput():
    def report(psi: float, rows: int = 500) -> dict:
        return {"enabled": True, "rows": rows, "window": 1000, "min_rows": 200,
                "columns": {c: {"psi": psi, "ks": psi / 2} for c in COLUMNS}}  # fmt: skip

    body = _model([
        {"rows_per_second": 10.5, "drift": report(0.1)},
        {"rows_per_second": 4.5, "drift": report(0.3)},
        {"rows_per_second": 1.0, "drift": {**report(0.2, 100), "columns": None}},  # below min rows
        {"version": "2.0.0", "rows_per_second": 7.0, "drift": report(9)},  # another version: not its drift
    ])  # fmt: skip
    assert body["version"] == "1.0.0" and body["age_seconds"] > 0
    assert body["rows_per_second"] == 23.0  # every serving worker's traffic
    drift = body["drift"]
    assert (drift["enabled"], drift["rows"], drift["workers"]) == (True, 1100, 3)
    assert drift["columns"]["glucose"] == {"psi": 0.2, "ks": 0.1}
    assert set(drift["columns"]) == set(COLUMNS)


def test_the_fleet_view_says_why_drift_is_off_and_survives_odd_statuses():
    off = {"enabled": False, "reason": "release 1.0.0 has no drift_profile.json"}
    body = _model([{"drift": off}])
    assert body["drift"] == off and body["rows_per_second"] is None
    body = _model(
        [{"rows_per_second": "fast", "drift": {"enabled": True, "rows": "x", "columns": {"glucose": 3}}}]
    )
    assert body["drift"]["enabled"] is True and body["rows_per_second"] is None
    assert _model([{}])["drift"] == {"enabled": False, "reason": "not reported yet"}
