"""Edge pipeline figures: classifier latency (LiteRT vs numpy), Avro writer throughput (fsync per
batch), and, when mosquitto is installed, end-to-end throughput of the standalone pipeline.
Prints figures; asserts nothing.

    .venv/bin/python bench/bench_edge.py [--readings 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "app" / "edge" / "src"
sys.path.insert(0, str(SRC))

from modelserve_edge import simulator  # noqa: E402
from modelserve_edge.avro_store import RotatingAvroWriter, read_records, to_record  # noqa: E402
from modelserve_edge.rul_model import features, litert_available, load_model  # noqa: E402


def row(label: str, value: str) -> None:
    print(f"{label:<52} {value:>14}")


def readings(n: int) -> list[dict]:
    out = []
    for tick in simulator.readings(123, 8, runs=0):
        out.extend(tick)
        if len(out) >= n:
            return out[:n]
    return out


def bench_classifier(rows: list[dict]) -> None:
    x = np.array([features(r) for r in rows])
    for backend in ("litert", "numpy"):
        if backend == "litert" and not litert_available():
            row("classifier litert", "not installed")
            continue
        model = load_model(None, backend)
        model.predict(x[:1])
        t0 = time.perf_counter()
        for r in x[:500]:
            model.predict(r)
        single = (time.perf_counter() - t0) / min(500, len(x))
        t0 = time.perf_counter()
        model.predict(x)
        batch = (time.perf_counter() - t0) / len(x)
        row(f"classifier {backend}: one row per call", f"{single * 1e6:9.1f} us/row")
        row(f"classifier {backend}: batch of {len(x)}", f"{batch * 1e6:9.2f} us/row")


def bench_avro(rows: list[dict]) -> None:
    model = load_model(None, "numpy")
    msgs = [{**r, "RUL": float(model.predict(features(r))[0]), "timestamp": 0} for r in rows]
    records = [to_record(m, 0) for m in msgs]
    with tempfile.TemporaryDirectory() as d:
        w = RotatingAvroWriter(d, max_bytes=1 << 20)
        t0 = time.perf_counter()
        for r in records:
            w.write([r])  # what the module does: one fsync per message
        w.close()
        per = (time.perf_counter() - t0) / len(records)
        size = sum(p.stat().st_size for p in Path(d).glob("*.avro"))
        n = sum(len(read_records(p)) for p in Path(d).glob("*.avro"))
        row("avro writer: fsync per record", f"{per * 1e6:9.0f} us/rec")
        row("avro file size per record (deflate, 1 block each)", f"{size / n:9.0f} B")


def bench_pipeline(n_engines: int) -> None:
    mosquitto = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if not mosquitto:
        row("pipeline", "no mosquitto")
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        conf = d / "m.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n")
        broker = subprocess.Popen([mosquitto, "-c", str(conf)], stderr=subprocess.DEVNULL)
        env = {**os.environ, "PYTHONPATH": str(SRC), "EDGE_TRANSPORT": "mqtt", "MQTT_PORT": str(port),
               "EDGE_LOG_LEVEL": "WARNING"}  # fmt: skip
        procs = []
        try:
            time.sleep(0.5)
            mods = {
                "router": {},
                "rul_classifier": {},
                "avro_writer": {"AVRO_DIR": str(d / "avro"), "AVRO_MAX_AGE_SECONDS": "0.5"},
            }
            for mod, extra in mods.items():
                procs.append(
                    subprocess.Popen([sys.executable, "-m", f"modelserve_edge.{mod}"], env={**env, **extra})
                )
            time.sleep(4)  # let them subscribe (a benchmark, not a test)
            total = sum(simulator.trajectory(7, e, 1).life for e in range(1, n_engines + 1))
            t0 = time.perf_counter()
            sim_env = {
                **env,
                "SIM_SEED": "7",
                "SIM_ENGINES": str(n_engines),
                "SIM_RUNS": "1",
                "SIM_INTERVAL": "0",
            }
            subprocess.run([sys.executable, "-m", "modelserve_edge.simulator"], env=sim_env, check=True)
            sent = time.perf_counter() - t0
            deadline = time.monotonic() + 120
            n = 0
            while time.monotonic() < deadline:
                n = sum(len(read_records(p)) for p in (d / "avro").glob("*.avro"))
                if n >= total:
                    break
                time.sleep(0.1)
            done = time.perf_counter() - t0
            row("pipeline: readings simulated", f"{total:14d}")
            row("pipeline: simulator publish rate", f"{total / sent:9.0f} msg/s")
            row("pipeline: readings in closed Avro files", f"{n:14d}")
            row("pipeline: end to end (incl. <=0.5 s rotation)", f"{total / done:9.0f} msg/s")
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
            broker.terminate()
            broker.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readings", type=int, default=2000)
    ap.add_argument("--engines", type=int, default=4)
    a = ap.parse_args()
    rows = readings(a.readings)
    row("measure", "value")
    bench_classifier(rows)
    bench_avro(rows[:500])
    bench_pipeline(a.engines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
