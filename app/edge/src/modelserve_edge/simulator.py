"""``modelserve-edge-simulator``: a leaf device sending turbofan-style sensor readings.

A deterministic degradation model (no external dataset), loosely after NASA's C-MAPSS FD001: each
engine runs a sequence of units (a unit is replaced when it fails); a unit has a random life of
``LIFE_MIN``..``LIFE_MAX`` cycles and a health loss ``d(t) = w0 + (1 - w0) (t / life) ** b`` that
reaches 1 at failure. Each of the 21 sensors reads ``base + offset + sensitivity * d(t) +
setting effect + noise``; 6 sensors are flat, as in FD001. Everything is drawn from
``numpy.random.default_rng([seed, engine, unit])``: the same seed gives the same readings.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from modelserve_edge.config import ConfigError, env_float, env_int, env_str, setup_logging

log = logging.getLogger(__name__)

N_SETTINGS = 3
N_SENSORS = 21
LIFE_MIN, LIFE_MAX = 120, 260
OUTPUT = "telemetry"

SENSOR_NAMES = [
    "T2", "T24", "T30", "T50", "P2", "P15", "P30", "Nf", "Nc", "epr", "Ps30",
    "phi", "NRf", "NRc", "BPR", "farB", "htBleed", "Nf_dmd", "PCNfR_dmd", "W31", "W32",
]  # fmt: skip
# Healthy mean, per-cycle noise, change at failure (d = 1).
BASE = np.array([
    518.67, 642.2, 1585.0, 1400.0, 14.62, 21.61, 554.5, 2388.0, 9050.0, 1.30, 47.3,
    522.0, 2388.0, 8135.0, 8.41, 0.03, 391.0, 2388.0, 100.0, 38.95, 23.37,
])  # fmt: skip
NOISE = np.array([
    0.0, 0.45, 5.0, 7.0, 0.0, 0.001, 0.7, 0.06, 8.0, 0.0, 0.2,
    0.6, 0.06, 7.0, 0.03, 0.0, 1.3, 0.0, 0.0, 0.15, 0.09,
])  # fmt: skip
SENSITIVITY = np.array([
    0.0, 1.6, 18.0, 28.0, 0.0, 0.0, -2.8, 0.25, 30.0, 0.0, 0.9,
    -2.2, 0.25, 28.0, 0.12, 0.0, 4.5, 0.0, 0.0, -0.55, -0.33,
])  # fmt: skip
SETTING_SCALE = np.array([0.002, 0.0003, 0.0])
SETTING_BASE = np.array([0.0, 0.0, 100.0])


@dataclass(frozen=True)
class Trajectory:
    engine: int
    unit: int
    life: int
    cycles: np.ndarray  # (life,) 1..life
    settings: np.ndarray  # (life, 3)
    sensors: np.ndarray  # (life, 21)
    health_loss: np.ndarray  # (life,) d(t), 1.0 at failure

    @property
    def rul(self) -> np.ndarray:
        """Cycles left after each reading (0 on the failure cycle)."""
        return self.life - self.cycles


def trajectory(seed: int, engine: int, unit: int) -> Trajectory:
    rng = np.random.default_rng([seed, engine, unit])
    life = int(rng.integers(LIFE_MIN, LIFE_MAX + 1))
    w0 = rng.uniform(0.0, 0.12)
    exponent = rng.uniform(1.4, 2.4)
    offset = rng.normal(0.0, 0.4, N_SENSORS) * NOISE
    cycles = np.arange(1, life + 1)
    d = w0 + (1.0 - w0) * (cycles / life) ** exponent
    settings = SETTING_BASE + rng.normal(0.0, 1.0, (life, N_SETTINGS)) * SETTING_SCALE
    setting_effect = np.outer(settings[:, 0] / SETTING_SCALE[0], 0.3 * NOISE)
    noise = rng.normal(0.0, 1.0, (life, N_SENSORS)) * NOISE
    sensors = BASE + offset + np.outer(d, SENSITIVITY) + setting_effect + noise
    return Trajectory(engine, unit, life, cycles, settings, sensors, d)


def device_name(prefix: str, engine: int) -> str:
    return f"{prefix}-{engine:02d}"


def reading(traj: Trajectory, index: int, device_prefix: str = "engine") -> dict:
    return {
        "deviceId": device_name(device_prefix, traj.engine),
        "engine": traj.engine,
        "unit": traj.unit,
        "cycle": int(traj.cycles[index]),
        "settings": [round(float(v), 6) for v in traj.settings[index]],
        "sensors": [round(float(v), 4) for v in traj.sensors[index]],
    }


def readings(seed: int, engines: int, runs: int = 1, device_prefix: str = "engine") -> Iterator[list[dict]]:
    """One list of readings per cycle tick (one reading per running engine). Each engine runs
    ``runs`` units to failure (0: forever), a new unit starting the tick after a failure."""
    state = {e: (trajectory(seed, e, 1), 0) for e in range(1, engines + 1)}
    while state:
        tick = []
        for engine in sorted(state):
            traj, index = state[engine]
            tick.append(reading(traj, index, device_prefix))
            if index + 1 < traj.life:
                state[engine] = (traj, index + 1)
            elif runs == 0 or traj.unit < runs:
                state[engine] = (trajectory(seed, engine, traj.unit + 1), 0)
            else:
                del state[engine]
        yield tick


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the readings as JSON lines instead")
    args = parser.parse_args(argv)
    setup_logging("simulator")
    try:
        seed = env_int("SIM_SEED", 2026)
        engines = env_int("SIM_ENGINES", 4, minimum=1)
        runs = env_int("SIM_RUNS", 0, minimum=0)
        interval = env_float("SIM_INTERVAL", 1.0, minimum=0.0)
        prefix = env_str("SIM_DEVICE_PREFIX", "engine")
        device_id = env_str("SIM_DEVICE_ID", "turbofan-simulator")
    except ConfigError as exc:
        log.error("configuration: %s", exc)
        return 2
    from modelserve_edge.transport import create_transport, encode

    if args.dry_run:
        for tick in readings(seed, engines, runs or 1, prefix):
            for r in tick:
                sys.stdout.write(encode(r).decode() + "\n")
        return 0

    from modelserve_edge.runtime import stop_event

    stop = stop_event()
    try:
        transport = create_transport("simulator", device_id=device_id)
        transport.start(None)
    except (ConfigError, ConnectionError) as exc:
        log.error("%s", exc)
        return 1
    sent = 0
    try:
        for tick in readings(seed, engines, runs, prefix):
            now_ms = int(time.time() * 1000)
            for r in tick:
                transport.send_json(OUTPUT, {**r, "timestamp": now_ms})
                sent += 1
            if stop.wait(interval):
                break
        if not transport.flush(30.0):
            log.error("not every reading was acknowledged by the broker")
            return 1
    finally:
        transport.close()
    log.info("sent %d readings", sent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
