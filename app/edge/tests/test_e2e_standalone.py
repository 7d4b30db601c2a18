"""The standalone runtime end to end: five module processes around a real (private) Mosquitto,
upstream to a second Mosquitto standing in for the cloud."""

import json
import signal
from collections import defaultdict

import numpy as np
import pytest
from conftest import wait_until
from modelserve_edge import simulator
from modelserve_edge.avro_store import read_records
from modelserve_edge.rul_model import NumpyRulModel, default_model_dir, features

pytestmark = pytest.mark.mosquitto

P = "modelserve/edge"
SEED, ENGINES = 11, 2
THRESHOLD = 60.0
RECEIVERS = ["router", "rul_classifier", "avro_writer", "$upstream"]


def expected():
    """deviceId -> (cycles, RUL predicted by the committed model) for the simulated run."""
    model = NumpyRulModel(default_model_dir())
    out = {}
    for e in range(1, ENGINES + 1):
        t = simulator.trajectory(SEED, e, 1)
        rows = [simulator.reading(t, i) for i in range(t.life)]
        out[simulator.device_name("engine", e)] = (
            [r["cycle"] for r in rows],
            model.predict(np.array([features(r) for r in rows])),
        )
    return out


def shipped_records(upload_dir):
    return [r for p in sorted(upload_dir.glob("*.avro")) for r in read_records(p)]


def start_pipeline(tmp_path, local, cloud, processes, collectors, avro_env=None):
    online = collectors(local.port, [f"{P}/+/status"])
    common = {"MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(local.port), "EDGE_LOG_LEVEL": "INFO"}
    avro = {
        **common,
        "AVRO_DIR": str(tmp_path / "avro"),
        "AVRO_UPLOAD_DIR": str(tmp_path / "uploaded"),
        "AVRO_MAX_BYTES": "8192",
        "AVRO_MAX_AGE_SECONDS": "1",
        "AVRO_UPLOAD_INTERVAL": "0.2",
        **(avro_env or {}),
    }
    procs = {
        "router": processes(
            "router", "modelserve_edge.router", {**common, "RUL_ALERT_THRESHOLD": str(THRESHOLD)}
        ),
        "classifier": processes(
            "classifier", "modelserve_edge.rul_classifier", {**common, "RUL_BACKEND": "litert"}
        ),
        "avro": processes("avro", "modelserve_edge.avro_writer", avro),
        "upstream": processes(
            "upstream",
            "modelserve_edge.upstream",
            {
                **common,
                "UPSTREAM_URL": f"mqtt://127.0.0.1:{cloud.port}/cloud/rul/{{deviceId}}",
                "UPSTREAM_QUEUE_PATH": str(tmp_path / "upstream.sqlite3"),
                "UPSTREAM_RETRY_MAX_SECONDS": "1",
            },
        ),
    }

    def all_online():
        for name, p in procs.items():
            if p.proc.poll() is not None:
                pytest.fail(f"{name} exited with {p.proc.returncode}:\n{p.output()}")
        status = {}
        for topic, payload in online.snapshot():
            status[topic] = payload
        return all(status.get(f"{P}/{m}/status") == b"online" for m in RECEIVERS)

    wait_until(all_online, 60, "router, classifier, avro writer and upstream to subscribe")
    return procs, online


def run_simulator(processes, local, interval="0.002"):
    sim = processes(
        "simulator",
        "modelserve_edge.simulator",
        {"MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(local.port), "SIM_SEED": str(SEED),
         "SIM_ENGINES": str(ENGINES), "SIM_RUNS": "1", "SIM_INTERVAL": interval},
    )  # fmt: skip
    return sim


def test_simulator_to_avro_files_and_upstream(tmp_path, broker_factory, processes, collectors):
    local = broker_factory("local").start()
    cloud = broker_factory("cloud").start()
    cloud_rx = collectors(cloud.port, ["cloud/rul/#"])
    procs, _ = start_pipeline(tmp_path, local, cloud, processes, collectors)
    want = expected()
    total = sum(len(c) for c, _ in want.values())

    sim = run_simulator(processes, local)
    assert sim.proc.wait(60) == 0, sim.output()

    def all_shipped():
        records = shipped_records(tmp_path / "uploaded")
        return (
            records
            if {(r["deviceId"], r["cycle"]) for r in records}
            >= {(d, c) for d, (cycles, _) in want.items() for c in cycles}
            else None
        )

    records = wait_until(all_shipped, 60, f"{total} records in shipped Avro files")
    assert len(records) == total  # no loss, no duplicates on a clean run
    assert len(list((tmp_path / "uploaded").glob("*.avro"))) > 1  # rotated by size
    assert list((tmp_path / "avro").glob("*.avro")) == []  # shipped files were deleted locally

    by_device = defaultdict(dict)
    for r in records:
        by_device[r["deviceId"]][r["cycle"]] = r
    for device, (cycles, rul) in want.items():
        got = by_device[device]
        got_rul = np.array([got[c]["RUL"] for c in cycles])
        assert np.allclose(got_rul, rul, atol=1e-2), device  # the committed model's answer, via LiteRT
        # a degrading engine: the predicted RUL falls over its life, to near 0 at failure
        assert got_rul[:10].mean() > 90 and got_rul[-10:].mean() < 25
        assert np.polyfit(cycles[len(cycles) // 3 :], got_rul[len(cycles) // 3 :], 1)[0] < -0.5
        assert all(got[c]["modelVersion"] == "1.0.0" and len(got[c]["sensors"]) == 21 for c in cycles)

    # upstream got {deviceId, RUL}, only below the threshold, one per such reading
    want_alerts = sorted(
        (d, round(float(x), 4)) for d, (_, rul) in want.items() for x in rul if x < THRESHOLD
    )
    assert want_alerts, "the run should produce alerts"

    def alerts():
        msgs = cloud_rx.snapshot()
        return msgs if len(msgs) >= len(want_alerts) else None

    msgs = wait_until(alerts, 30, f"{len(want_alerts)} upstream messages")
    bodies = [json.loads(p) for _, p in msgs]
    assert all(set(b) == {"deviceId", "RUL"} for b in bodies)
    assert {t for t, _ in msgs} == {f"cloud/rul/{d}" for d in want}
    got_alerts = sorted((b["deviceId"], b["RUL"]) for b in bodies)
    assert len(got_alerts) == len(want_alerts)
    assert np.allclose([r for _, r in got_alerts], [r for _, r in want_alerts], atol=1e-2)

    for name, p in procs.items():
        assert p.stop() == 0, f"{name}:\n{p.output()}"
        assert "Traceback" not in p.output(), p.output()


def test_killed_avro_writer_loses_no_record(tmp_path, broker_factory, processes, collectors):
    local = broker_factory("local").start()
    cloud = broker_factory("cloud").start()
    procs, _ = start_pipeline(
        tmp_path,
        local,
        cloud,
        processes,
        collectors,
        avro_env={"AVRO_MAX_BYTES": "1000000", "AVRO_MAX_AGE_SECONDS": "600"},
    )
    want = expected()
    total = sum(len(c) for c, _ in want.values())
    sim = run_simulator(processes, local, interval="0.02")

    # kill -9 the writer while its file is still open (.part) and messages keep coming
    wait_until(lambda: list((tmp_path / "avro").glob("*.avro.part")), 30, "an open .part file")
    wait_until(lambda: next((tmp_path / "avro").glob("*.part")).stat().st_size > 3000, 30, "some records")
    procs["avro"].stop(signal.SIGKILL)
    assert list((tmp_path / "avro").glob("*.part")), "the kill should leave a partial file"
    assert sim.proc.poll() is None, "the simulator should still be sending when the writer dies"
    assert sim.proc.wait(60) == 0, sim.output()  # the rest queues on the broker (persistent session)

    restarted = processes(
        "avro2",
        "modelserve_edge.avro_writer",
        {
            "MQTT_HOST": "127.0.0.1",
            "MQTT_PORT": str(local.port),
            "AVRO_DIR": str(tmp_path / "avro"),
            "AVRO_UPLOAD_DIR": str(tmp_path / "uploaded"),
            "AVRO_MAX_AGE_SECONDS": "1",
            "AVRO_UPLOAD_INTERVAL": "0.2",
        },
    )

    def complete():
        keys = {(r["deviceId"], r["cycle"]) for r in shipped_records(tmp_path / "uploaded")}
        return len(keys) == total

    wait_until(complete, 60, f"all {total} records after the restart")
    assert "recovered" in restarted.output()
    assert not list((tmp_path / "avro").glob("*.part"))
    assert all(p.name.endswith(".avro") for p in (tmp_path / "uploaded").iterdir())  # never a .part
    assert restarted.stop() == 0, restarted.output()
