"""Against a REAL private RabbitMQ, real Celery worker processes and a real gunicorn."""

from __future__ import annotations

import threading
import time
from collections import Counter

import ms_devstack as devstack
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelserve import release
from ms_support import requires_rabbitmq

pytestmark = [pytest.mark.integration, requires_rabbitmq]

ROWS = [[6, 148, 72, 35, 0, 33.6, 0.627, 50], [1, 85, 66, 29, 0, 26.6, 0.351, 31]]


def test_predictions_round_trip(live_stack):
    r = requests.post(f"{live_stack.url}/api/v1/predict", json={"rows": ROWS}, timeout=15)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "1.0.0"
    assert [p["label"] for p in body["predictions"]] == [1, 0]
    assert body["predictions"][0]["probability"] > 0.5 > body["predictions"][1]["probability"]
    assert r.headers["X-Modelserve-Worker"]
    # the same numbers as the model computed in-process
    from modelserve.model import LoadedModel

    local = LoadedModel(live_stack.model_dir / "current").predict(ROWS)["probabilities"]
    assert [p["probability"] for p in body["predictions"]] == pytest.approx(local, abs=1e-5)


def test_concurrent_single_rows_are_batched_and_each_gets_its_own_answer(live_stack):
    rows = [[i % 10, 60 + i, 70, 20, 80, 20 + i % 30, 0.4, 21 + i % 50] for i in range(120)]
    from modelserve.model import LoadedModel

    expected = LoadedModel(live_stack.model_dir / "current").predict(rows)["probabilities"]
    results: dict[int, float] = {}

    def one(i: int) -> None:
        with requests.Session() as s:
            for j in range(i, len(rows), 12):
                r = s.post(f"{live_stack.url}/api/v1/predict", json={"row": rows[j]}, timeout=15)
                assert r.status_code == 200
                results[j] = r.json()["prediction"]["probability"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(rows)
    assert [results[i] for i in range(len(rows))] == pytest.approx(expected, abs=1e-5)  # no mix-ups
    metrics = requests.get(f"{live_stack.url}/metrics", timeout=5).text
    assert "modelserve_queue_roundtrip_seconds_count" in metrics


def test_model_ready_and_metrics(live_stack):
    r = requests.get(f"{live_stack.url}/api/v1/model", timeout=15)
    assert r.status_code == 200
    info = r.json()
    assert info["version"] == "1.0.0" and info["loaded"] is True and info["loaded_at"]
    r = requests.get(f"{live_stack.url}/readyz", timeout=5)
    assert r.status_code == 200 and r.json()["ready"] is True
    assert requests.get(f"{live_stack.url}/healthz", timeout=5).status_code == 200
    r = requests.get(f"{live_stack.url}/api/v1/openapi.json", timeout=5)
    assert r.json()["openapi"].startswith("3.")


def test_bad_input_on_the_live_stack(live_stack):
    r = requests.post(f"{live_stack.url}/api/v1/predict", json={"rows": [ROWS[0], [1, 2]]}, timeout=5)
    assert r.status_code == 422 and r.json()["field"] == "rows[1]"
    r = requests.post(f"{live_stack.url}/api/v1/predict", data=b"nope", timeout=5)
    assert r.status_code == 415  # no Content-Type: not declared JSON
    json_header = {"Content-Type": "application/json"}
    r = requests.post(f"{live_stack.url}/api/v1/predict", data=b"nope", headers=json_header, timeout=5)
    assert r.status_code == 400
    r = requests.post(
        f"{live_stack.url}/api/v1/predict",
        data=b'{"row": [1,2,3,4,5,6,0.1,8]}',
        headers={"Content-Type": "text/plain"},
        timeout=5,
    )
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    assert r.json()["request_id"] == r.headers["X-Request-Id"]
    r = requests.post(f"{live_stack.url}/api/v1/predict", json={"rows": [ROWS[0]] * 1001}, timeout=5)
    assert r.status_code == 413


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
any_json = st.recursive(
    scalars,
    lambda i: st.lists(i, max_size=9) | st.dictionaries(st.text(max_size=6), i, max_size=9),
    max_leaves=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.builds(
        lambda r: {"rows": r},
        st.lists(st.lists(st.floats() | st.integers(), min_size=8, max_size=8), max_size=4),
    )
    | any_json
)
def test_property_live_stack_never_5xx(live_stack, body):
    import json

    r = requests.post(
        f"{live_stack.url}/api/v1/predict",
        data=json.dumps(body),
        timeout=15,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code < 500, r.text


class Load:
    """Closed-loop load: N client threads posting single rows until stopped; records every answer."""

    def __init__(self, url: str, clients: int = 8) -> None:
        self.url = url
        self.results: list[tuple[float, int, str, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        with requests.Session() as s:
            n = 0
            while not self._stop.is_set() and n < 5000:
                n += 1
                row = [i % 5, 100 + n % 80, 70, 20, 80, 30, 0.5, 40]
                try:
                    r = s.post(f"{self.url}/api/v1/predict", json={"row": row}, timeout=30)
                except requests.RequestException as exc:
                    self.errors.append(repr(exc))
                    continue
                version = r.json().get("model_version", "") if r.status_code == 200 else r.text
                self.results.append(
                    (time.monotonic(), r.status_code, version, r.headers.get("X-Modelserve-Worker", ""))
                )

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def test_sigkill_of_a_worker_under_load_loses_no_request(make_stack):
    stack = make_stack(workers=2, MODELSERVE_WORKER_PREFETCH="8")
    stack.wait_ready()
    ids = stack.worker_ids()
    assert len(ids) == 2, stack.logs()
    victim = stack.workers[0]
    victim_id = next(w for w in ids if w.endswith(f":{victim.pid}"))
    with Load(stack.url, clients=12) as load:
        time.sleep(2.0)
        before = len(load.results)
        stack.kill_worker(victim)
        killed_at = time.monotonic()
        time.sleep(3.0)
    statuses = Counter(status for _, status, _, _ in load.results)
    assert not load.errors, load.errors[:3]
    assert statuses == {200: len(load.results)}, (statuses, stack.logs())
    served_by = Counter(worker for _, _, _, worker in load.results)
    assert served_by[victim_id] > 0  # the victim was really serving when it died
    assert before > 50 and len(load.results) > before + 50  # load went on after the kill
    assert all(w != victim_id for t, _, _, w in load.results if t > killed_at + 0.5)


def test_release_switch_under_load_drops_nothing(make_stack, seed_release):
    stack = make_stack(workers=2)
    stack.wait_ready()
    devstack.install_release(stack.model_dir, seed_release, "1.0.1")
    with Load(stack.url, clients=8) as load:
        time.sleep(1.5)
        release.activate(stack.model_dir, "1.0.1")
        switched_at = time.monotonic()
        time.sleep(2.5)
    statuses = Counter(status for _, status, _, _ in load.results)
    assert statuses == {200: len(load.results)}, statuses
    versions = [v for _, _, v, _ in load.results]
    assert {"1.0.0", "1.0.1"} <= set(versions)
    late = [v for t, _, v, _ in load.results if t > switched_at + 1.0]
    assert late and set(late) == {"1.0.1"}  # every worker switched within check interval + a task
    info = requests.get(f"{stack.url}/api/v1/model", timeout=10).json()
    assert info["version"] == "1.0.1"


def test_no_worker_gives_503_in_bounded_time(make_stack):
    stack = make_stack(workers=0, MODELSERVE_TASK_TIMEOUT="2", MODELSERVE_READY_TIMEOUT="0.5")
    t0 = time.monotonic()
    r = requests.post(f"{stack.url}/api/v1/predict", json={"row": ROWS[0]}, timeout=30)
    elapsed = time.monotonic() - t0
    # No worker ever started: the task queue does not exist, and the web may not declare it.
    assert r.status_code == 503 and "no worker has started yet" in r.json()["error"], r.text
    assert elapsed < 4
    r = requests.get(f"{stack.url}/readyz", timeout=10)
    assert r.status_code == 503
    assert any(reason.startswith("worker:") for reason in r.json()["reasons"])
    assert requests.get(f"{stack.url}/api/v1/model", timeout=30).status_code == 503
    # a worker that comes up later makes the stack ready, and the expired task was not kept around
    stack.start_worker()
    stack.wait_ready(30)
    assert requests.post(f"{stack.url}/api/v1/predict", json={"row": ROWS[0]}, timeout=15).status_code == 200


def test_broker_down_gives_503_in_bounded_time(make_stack):
    dead = f"amqp://nobody:nothing@127.0.0.1:{devstack.free_port()}/none"
    stack = make_stack(
        workers=0, broker_urls={"web": dead, "worker": dead}, MODELSERVE_BROKER_CONNECT_TIMEOUT="1"
    )
    for _ in range(3):
        t0 = time.monotonic()
        r = requests.post(f"{stack.url}/api/v1/predict", json={"row": ROWS[0]}, timeout=30)
        assert r.status_code == 503, r.text
        assert "broker" in r.json()["error"] or "no worker" in r.json()["error"]
        assert time.monotonic() - t0 < 6
    r = requests.get(f"{stack.url}/readyz", timeout=10)
    assert r.status_code == 503
    assert any(reason.startswith("broker:") for reason in r.json()["reasons"]), r.json()


def test_broker_outage_answers_503_fast_and_recovers(tmp_path):
    """Own RabbitMQ node (so the shared one stays up): stop_app drops every connection."""
    from conftest import Stack

    node = devstack.RabbitMQ(tmp_path / "rabbitmq").start()
    stack = Stack(node.urls(), tmp_path / "stack", MODELSERVE_TASK_TIMEOUT="3")
    try:
        stack.start_worker()
        stack.start_web()
        stack.wait_ready()
        s = requests.Session()
        url = f"{stack.url}/api/v1/predict"
        assert s.post(url, json={"row": ROWS[0]}, timeout=10).status_code == 200
        node.ctl("stop_app")
        for _ in range(3):
            t0 = time.monotonic()
            r = s.post(url, json={"row": ROWS[0]}, timeout=10)
            assert r.status_code == 503 and "broker" in r.json()["error"]
            assert time.monotonic() - t0 < 4
        # Each gunicorn process caches its probe for MODELSERVE_READY_CACHE_SECONDS (1 s) and notices
        # the dropped connection on its next probe: every process reports it within a few seconds.
        # Ten 503s in a row (new connections, so both processes answer some).
        deadline, in_a_row = time.monotonic() + 6, 0
        while in_a_row < 10:
            r = requests.get(f"{stack.url}/readyz", timeout=10)
            in_a_row = in_a_row + 1 if r.status_code == 503 else 0
            assert time.monotonic() < deadline, "/readyz not steadily 503 6 s after the broker went away"
            time.sleep(0.1)
        assert r.json()["checks"]["broker"] is False
        node.ctl("start_app")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if s.post(url, json={"row": ROWS[0]}, timeout=10).status_code == 200:
                break
            time.sleep(0.5)
        # web and worker reconnected by themselves: every request succeeds again
        assert [s.post(url, json={"row": ROWS[0]}, timeout=10).status_code for _ in range(30)] == [
            200
        ] * 30, stack.logs()
    finally:
        stack.stop()
        node.stop()


def _broken_model_dir(stack, seed_release, name: str):
    """A model dir for one worker, its active release's model.tflite corrupted (fails its checksum)."""
    root = stack.base / name
    devstack.install_release(root, seed_release)
    release.activate(root, "1.0.0")
    tflite = root / "releases" / "1.0.0" / "model.tflite"
    tflite.chmod(0o644)
    tflite.write_bytes(b"\0corrupt" + tflite.read_bytes()[8:])
    return root, tflite


def _wait_fleet(stack, until, timeout: float = 30) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    fleet = stack.fleet()
    while not until(fleet):
        assert time.monotonic() < deadline, (fleet, stack.logs())
        time.sleep(0.3)
        fleet = stack.fleet()
    return fleet


def _readyz_codes(stack, n: int = 20) -> list[int]:
    """n calls over ~3 s (past the readiness cache), on new connections (both gunicorn processes)."""
    codes = []
    for _ in range(n):
        codes.append(requests.get(f"{stack.url}/readyz", timeout=10).status_code)
        time.sleep(0.15)
    return codes


def test_a_worker_without_a_loadable_model_takes_no_tasks(make_stack, seed_release):
    stack = make_stack(workers=1)
    broken_dir, tflite = _broken_model_dir(stack, seed_release, "broken-models")
    broken = stack.start_worker(MODELSERVE_MODEL_DIR=str(broken_dir))
    fleet = _wait_fleet(stack, lambda f: len(f) == 2)
    broken_id = next(w for w in fleet if w.endswith(f":{broken.pid}"))
    healthy_id = next(w for w in fleet if w != broken_id)
    # The fleet view lists both, the broken one with its reason (no path of the host in it).
    assert fleet[healthy_id]["state"] == "serving" and fleet[healthy_id]["version"] == "1.0.0"
    status = fleet[broken_id]
    assert status["state"] == "no_model" and status["consuming"] is False, status
    assert "release 1.0.0 cannot be loaded" in status["reason"] and "model.tflite" in status["reason"]
    assert str(stack.base) not in status["reason"]
    model = requests.get(f"{stack.url}/api/v1/model", timeout=10).json()
    assert model["version"] == "1.0.0" and model["versions"] == {"1.0.0": 1}
    # Readiness: one worker can answer, so ready, on every call.
    assert _readyz_codes(stack) == [200] * 20
    ready = requests.get(f"{stack.url}/readyz", timeout=10).json()
    assert ready["consumers"] == 1 and ready["model_version"] == "1.0.0"
    with Load(stack.url, clients=6) as load:
        time.sleep(3.0)
    assert not load.errors and len(load.results) > 50
    assert Counter(status for _, status, _, _ in load.results) == {200: len(load.results)}
    assert {worker for _, _, _, worker in load.results} == {healthy_id}  # the broken one took none

    # Repaired in place: the worker's bounded backoff retries, it loads and consumes again.
    tflite.write_bytes((seed_release / "model.tflite").read_bytes())
    fleet = _wait_fleet(stack, lambda f: f.get(broken_id, {}).get("consuming"), timeout=45)
    assert fleet[broken_id]["state"] == "serving" and fleet[broken_id]["reason"] is None
    deadline = time.monotonic() + 5  # counted about once a second, cached a second
    while requests.get(f"{stack.url}/readyz", timeout=10).json()["consumers"] != 2:
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.2)
    with Load(stack.url, clients=6) as load:
        time.sleep(3.0)
    assert {worker for _, _, _, worker in load.results} == {healthy_id, broken_id}


def test_readiness_is_steadily_503_when_no_worker_has_a_model(make_stack, seed_release):
    stack = make_stack(workers=0, MODELSERVE_TASK_TIMEOUT="2")
    for name in ("a", "b"):
        stack.start_worker(MODELSERVE_MODEL_DIR=str(_broken_model_dir(stack, seed_release, name)[0]))
    fleet = _wait_fleet(stack, lambda f: len(f) == 2)
    assert {s["state"] for s in fleet.values()} == {"no_model"}
    assert _readyz_codes(stack) == [503] * 20
    r = requests.get(f"{stack.url}/readyz", timeout=10)
    assert r.json()["consumers"] == 0 and r.json()["checks"]["broker"] is True
    r = requests.get(f"{stack.url}/api/v1/model", timeout=10)
    assert r.status_code == 503 and len(r.json()["workers"]) == 2
    assert all("cannot be loaded" in w["reason"] for w in r.json()["workers"])
    r = requests.post(f"{stack.url}/api/v1/predict", json={"row": ROWS[0]}, timeout=15)
    assert r.status_code == 503  # nobody consumes: the task's TTL ends it
