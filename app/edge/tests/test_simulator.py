import json
import subprocess
import sys

import numpy as np
import pytest
from modelserve_edge import simulator as sim

INFORMATIVE = np.flatnonzero(sim.SENSITIVITY != 0)


def health_indicator(traj: sim.Trajectory) -> np.ndarray:
    """Sensor drift toward failure, in noise units, averaged over the informative sensors."""
    z = (traj.sensors[:, INFORMATIVE] - sim.BASE[INFORMATIVE]) / sim.NOISE[INFORMATIVE]
    return (z * np.sign(sim.SENSITIVITY[INFORMATIVE])).mean(axis=1)


def test_same_seed_same_readings_other_seed_differs():
    a = [r for tick in sim.readings(7, 3, runs=1) for r in tick]
    b = [r for tick in sim.readings(7, 3, runs=1) for r in tick]
    c = [r for tick in sim.readings(8, 3, runs=1) for r in tick]
    assert a == b
    assert a != c
    assert json.dumps(a)  # JSON-serialisable as sent


@pytest.mark.parametrize("engine", [1, 2, 3, 4])
def test_unit_runs_to_failure_with_degrading_sensors(engine):
    t = sim.trajectory(2026, engine, 1)
    assert sim.LIFE_MIN <= t.life <= sim.LIFE_MAX
    assert list(t.cycles) == list(range(1, t.life + 1))
    assert t.rul[0] == t.life - 1 and t.rul[-1] == 0
    assert np.all(np.diff(t.health_loss) > 0) and t.health_loss[-1] == pytest.approx(1.0)
    assert t.sensors.shape == (t.life, sim.N_SENSORS) and t.settings.shape == (t.life, sim.N_SETTINGS)
    hi = health_indicator(t)
    assert hi[-20:].mean() - hi[:20].mean() > 3.0  # clearly degraded, in noise units
    # monotone trend through the noise: rank correlation with the cycle
    rank_corr = np.corrcoef(np.argsort(np.argsort(hi)), t.cycles)[0, 1]
    assert rank_corr > 0.8
    flat = np.flatnonzero(sim.NOISE == 0)
    assert np.ptp(t.sensors[:, flat], axis=0).max() == pytest.approx(0.0)


def test_units_differ_between_engines():
    lives = {sim.trajectory(1, e, 1).life for e in range(1, 9)}
    assert len(lives) > 4


def test_readings_replace_a_failed_unit_and_stop_after_runs():
    ticks = list(sim.readings(3, 2, runs=2))
    per_engine = {1: [], 2: []}
    for tick in ticks:
        for r in tick:
            per_engine[r["engine"]].append(r)
    for engine, rows in per_engine.items():
        lives = [sim.trajectory(3, engine, u).life for u in (1, 2)]
        assert len(rows) == sum(lives)
        assert [r["unit"] for r in rows] == [1] * lives[0] + [2] * lives[1]
        assert [r["cycle"] for r in rows] == list(range(1, lives[0] + 1)) + list(range(1, lives[1] + 1))
        assert all(r["deviceId"] == f"engine-{engine:02d}" for r in rows)
    r = ticks[0][0]
    assert len(r["settings"]) == 3 and len(r["sensors"]) == 21


def test_dry_run_prints_readings():
    out = subprocess.run(
        [sys.executable, "-m", "modelserve_edge.simulator", "--dry-run"],
        env={
            "SIM_SEED": "5",
            "SIM_ENGINES": "1",
            "SIM_RUNS": "1",
            "PYTHONPATH": sim.__file__.rsplit("/", 2)[0],
        },
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(out) == sim.trajectory(5, 1, 1).life
    assert json.loads(out[-1])["cycle"] == len(out)
