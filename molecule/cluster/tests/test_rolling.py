"""Rolling upgrades of the serving tier, run for real from the controller (playbooks/upgrade.yml).

Once per scenario each: a front end that does not come back healthy stops the play (before
side_effect, with one worker host), and a full rolling upgrade under a steady load through the VIP
(after side_effect: two worker hosts, two front ends) with zero failed requests.
"""

import csv
import io
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_cluster import FRONTENDS, VIP, _after_side_effect, _host, _load, _predict, _worker_hosts

ROOT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY") or Path(__file__).resolve().parents[3])
URL = f"https://{VIP}"
# HAProxy's admin socket, read with the host's python3 (no socat on the front ends).
SHOW_STAT = (
    "import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/haproxy/admin.sock');"
    " s.sendall(b'show stat\\n'); print(b''.join(iter(lambda: s.recv(65536), b'')).decode())"
)


def _playbook(name, *args, extra_inventory=None, timeout=1500):
    """A collection playbook on this scenario's hosts, as a user runs it (-i: with its group_vars)."""
    inventory = str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)
    cmd = ["ansible-playbook", "-i", inventory]
    if extra_inventory:
        cmd += ["-i", extra_inventory]
    cmd += [str(ROOT / "playbooks" / name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _inventory_file(tmp_path, data):
    path = tmp_path / "extra-inventory.yml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _unit(name, unit):
    """MainPID and the monotonic times (µs, one kernel clock for every container) it last went down and up."""
    props = ["MainPID", "ActiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic"]
    out = _host(name).check_output(f"systemctl show -p {','.join(props)} {unit}")
    values = dict(line.split("=", 1) for line in out.splitlines())
    return {p: int(values[p]) for p in props}


def _pool_status(proxy, server):
    """This server's status in the gunicorn backend of one front end's HAProxy (UP, MAINT, DRAIN...)."""
    text = _host(proxy).check_output(f'python3 -c "{SHOW_STAT}"').lstrip("# ")
    stat = csv.DictReader(io.StringIO(text))
    rows = [r for r in stat if (r["pxname"], r["svname"]) == ("gunicorn", server)]
    assert len(rows) == 1, text
    return rows[0]["status"]


def test_a_front_end_that_does_not_come_back_healthy_stops_the_play(tmp_path):
    """cl-frontend gets a task queue its broker user may not use (the broker URL is the tier's own
    file, broker-web.env): restarted first, its /readyz stays 503, so the play
    stops before cl-frontend2's batch. Meanwhile cl-frontend is out of every proxy's pool and the VIP
    still answers; a run with the setting gone puts it back.
    """
    if _after_side_effect():
        pytest.skip("runs once, before side_effect")
    broken, other = FRONTENDS
    before = {n: _unit(n, "modelserve-web")["MainPID"] for n in FRONTENDS}
    no_queue = {"model_serving_extra_env": {"MODELSERVE_TASK_QUEUE": "modelserve.nowhere"}}
    inventory = _inventory_file(tmp_path, {"all": {"hosts": {broken: no_queue}}})
    # Only the broker (the credentials play) and the front ends: the workers keep running untouched.
    limit = ",".join(["cl-broker", *FRONTENDS])
    res = _playbook(
        "upgrade.yml",
        "--limit", limit, "-e", "model_serving_serial=1", "-e", "model_serving_ready_timeout=10",
        extra_inventory=inventory,
    )  # fmt: skip
    try:
        assert res.returncode != 0, (res.stdout + res.stderr)[-3000:]
        # It failed on the health gate: the broken host's /readyz answered 503. (Failures go to
        # stderr under Molecule's Ansible settings, display_failed_stderr.)
        out = res.stdout + res.stderr
        assert f"fatal: [{broken}]" in out, out[-3000:]
        fatal = out[out.index(f"fatal: [{broken}]") :][:3000]
        assert "/readyz" in fatal and '"status": 503' in fatal, fatal
        assert _unit(broken, "modelserve-web")["MainPID"] != before[broken]  # it was restarted...
        assert _unit(other, "modelserve-web")["MainPID"] == before[other], "the next batch ran"
        # ...and left out of the pools (maintenance), so the VIP answers from the other front end.
        assert [_pool_status(p, broken) for p in FRONTENDS] == ["MAINT", "MAINT"]
        r = _predict(URL)
        assert r.status_code == 200, r.text
    finally:
        repaired = _playbook("serving.yml", "--limit", f"cl-broker,{broken}")
    assert repaired.returncode == 0, (repaired.stdout + repaired.stderr)[-3000:]
    assert [_pool_status(p, broken) for p in FRONTENDS] == ["UP", "UP"]


def test_a_full_rolling_upgrade_under_load_fails_no_request(tmp_path):
    """Three clients at 4 predictions/s each through the VIP while playbooks/upgrade.yml restarts every
    worker and front end: every request must succeed with a right answer. Each host's units must
    have restarted, the two worker hosts one after the other, then the two front ends one after the
    other. Requests, failures, the worst latency and the duration are reported.
    """
    if not _after_side_effect():
        pytest.skip("runs once, after side_effect (two worker hosts)")
    workers = _worker_hosts()
    assert len(workers) == 2, workers
    # side_effect added the spare host to the workers by group_by; the user's inventory would list it.
    inventory = _inventory_file(
        tmp_path, {"all": {"children": {g: {"hosts": {"cl-spare": {}}} for g in ("serving", "workers")}}}
    )
    units = [(n, "modelserve-worker@1") for n in workers] + [(n, "modelserve-web") for n in FRONTENDS]
    before = {u: _unit(*u) for u in units}
    stop, results, threads = threading.Event(), [[], [], []], []
    for res in results:
        threads.append(threading.Thread(target=_load, args=(URL, stop, res, 4.0, 5000), daemon=True))
        threads[-1].start()
    try:
        time.sleep(3)
        started = time.monotonic()
        run = _playbook("upgrade.yml", extra_inventory=inventory)
        ended = time.monotonic()
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    after = {u: _unit(*u) for u in units}
    every = sorted(r for res in results for r in res)
    during = [r for r in every if r[0] >= started and r[1] <= ended]
    failed = [r for r in every if r[2] != 200 or not 0.0 <= r[3] <= 1.0]
    figures = {
        "requests": len(every),
        "requests_during_upgrade": len(during),
        "failed": len(failed),
        "failed_kinds": sorted({str(r[2]) for r in failed}),
        "max_latency_during_upgrade_s": round(max((r[1] - r[0] for r in during), default=0.0), 3),
        "upgrade_seconds": round(ended - started, 1),
    }
    report = os.environ.get("MODELSERVE_ROLLING_REPORT") or os.path.join(
        tempfile.gettempdir(), "modelserve-rolling-cluster.jsonl"
    )
    with open(report, "a") as f:
        f.write(json.dumps(figures) + "\n")
    print("ROLLING", json.dumps(figures))
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    # The load ran through the whole upgrade (no client reached its request limit early).
    assert all(res and res[-1][0] > ended - 2 for res in results), figures
    assert figures["failed"] == 0, figures
    for u in units:
        assert after[u]["MainPID"] not in (0, before[u]["MainPID"]), f"{u} did not restart"

    def down(u):  # from the moment the unit began to stop to the moment it was started again
        return after[u]["ActiveExitTimestampMonotonic"], after[u]["ActiveEnterTimestampMonotonic"]

    # In batches: never both worker hosts down at once, nor both front ends; workers first.
    for group in (units[:2], units[2:]):
        first, second = sorted(down(u) for u in group)
        assert first[1] < second[0], f"{group} restarted together: {[down(u) for u in group]}"
    assert max(down(u)[1] for u in units[:2]) < min(down(u)[0] for u in units[2:])
