"""The front door from the controller, through the VIP: TLS verified against the internal CA, plain
HTTP redirected, keys checked by hash, limits answered 429, health endpoints closed to outsiders,
and the VIP moving when the holder's HAProxy stops."""

import itertools
import json
import os
import subprocess
import tempfile
import threading
import time

import pytest
import requests
import testinfra.utils.ansible_runner

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
EPHEMERAL = os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]
runner = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
VIP = runner.get_variables("fd-1")["frontdoor_test_vip"]
BASE = f"https://{VIP}"


def _host(name):
    return runner.get_host(name)


def _key(name):
    with open(os.path.join(EPHEMERAL, f"key-{name}")) as f:
        return f.read().split()[0]


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    path.write_text(_host("fd-1").file("/etc/modelserve/pki/molecule-ca.pem").content_string)
    return str(path)


def _holder():
    held = [n for n in ("fd-1", "fd-2") if VIP in _host(n).check_output("ip -4 -o addr show")]
    assert len(held) == 1, f"VIP on {held}"
    return held[0]


def test_tls_through_the_vip_verified_by_the_internal_ca(ca):
    r = requests.get(f"{BASE}/api/v1/model", verify=ca, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Strict-Transport-Security"].startswith("max-age=")


def test_plain_http_is_redirected_to_https():
    r = requests.get(f"http://{VIP}/api/v1/model", allow_redirects=False, timeout=10)
    assert r.status_code == 308 and r.headers["Location"] == f"https://{VIP}/api/v1/model", r.headers


def test_a_key_is_required_and_checked(ca):
    url = f"{BASE}/api/v1/echo"
    missing = requests.get(url, verify=ca, timeout=10)
    bad = requests.get(url, verify=ca, headers={"X-API-Key": "x" * 48}, timeout=10)
    good = requests.get(url, verify=ca, headers={"X-API-Key": _key("tester")}, timeout=10)
    # converge.yml's "comma" key is the file's word and ",x"; only the whole of it is valid.
    comma = requests.get(url, verify=ca, headers={"X-API-Key": _key("comma") + ",x"}, timeout=10)
    half = requests.get(url, verify=ca, headers={"X-API-Key": _key("comma")}, timeout=10)
    for r in (missing, bad, half):
        assert r.status_code == 401 and "API key" in r.json()["error"], r.text
    assert good.status_code == 200, good.text
    assert comma.status_code == 200, comma.text


def test_only_hashes_are_on_the_hosts():
    key = _key("tester")
    for name in ("fd-1", "fd-2"):
        host = _host(name)
        assert host.run(f"grep -rqF {key} /etc/haproxy").rc == 1, f"the key itself is on {name}"
        assert " tester" in host.file("/etc/haproxy/api-keys.map").content_string


def test_the_client_name_is_logged_not_the_key(ca):
    requests.get(f"{BASE}/api/v1/echo", verify=ca, headers={"X-API-Key": _key("tester")}, timeout=10)
    logs = _host(_holder()).check_output("journalctl -t haproxy --since -2min --no-pager")
    assert "key=tester" in logs and _key("tester") not in logs


def test_over_the_key_limit_is_429(ca):
    headers = {"X-API-Key": _key("limited")}
    url = f"{BASE}/api/v1/echo"
    codes = [requests.get(url, verify=ca, headers=headers, timeout=10).status_code for _ in range(8)]
    assert codes[:5] == [200] * 5 and 429 in codes[5:], codes


def test_body_over_the_limit_is_413(ca):
    r = requests.post(
        f"{BASE}/api/v1/echo", verify=ca, headers={"X-API-Key": _key("tester")}, data=b"x" * 5000, timeout=10
    )
    assert r.status_code == 413, r.text


def test_health_endpoints_are_closed_to_outsiders(ca):
    r = requests.get(f"{BASE}/readyz", verify=ca, timeout=10)
    assert r.status_code == 404, r.text


def test_the_vip_moves_when_haproxy_stops(ca):
    holder = _holder()
    other = "fd-2" if holder == "fd-1" else "fd-1"
    _host(holder).run("systemctl stop haproxy")
    try:
        deadline = time.monotonic() + 20
        while VIP not in _host(other).check_output("ip -4 -o addr show") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _holder() == other
        r = requests.get(f"{BASE}/api/v1/model", verify=ca, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        _host(holder).run("systemctl start haproxy")


def _load(ca, stop, results, rate=20.0, limit=2000):
    """One client: a new connection per request, `rate` a second at most, at most `limit` requests."""
    key = _key("tester")
    while not stop.is_set() and len(results) < limit:
        started = time.monotonic()
        try:
            r = requests.get(f"{BASE}/api/v1/echo", verify=ca, headers={"X-API-Key": key}, timeout=5)
            results.append((started, time.monotonic(), r.status_code, r.text))
        except requests.RequestException as exc:
            results.append((started, time.monotonic(), type(exc).__name__, ""))
        time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - started)))


def test_killing_the_vip_holder_under_load(ca):
    """The holder of the VIP killed (SIGKILL: no VRRP goodbye) under a steady load of 20 req/s.

    Answers that arrive must be right (200, a backend's body); failures only connection errors.
    Failed requests and the gap go to a report file (figures, not assertions).
    """
    holder = _holder()
    other = "fd-2" if holder == "fd-1" else "fd-1"
    stop, results = threading.Event(), []
    thread = threading.Thread(target=_load, args=(ca, stop, results), daemon=True)
    thread.start()
    try:
        time.sleep(5)
        killed_at = time.monotonic()
        subprocess.run(["docker", "kill", holder], check=True, capture_output=True)
        time.sleep(12)
    finally:
        stop.set()
        thread.join(timeout=10)
        subprocess.run(["docker", "start", holder], check=True, capture_output=True)
    ok = [r for r in results if r[2] == 200]
    failed = [r for r in results if r[2] != 200]
    ends = [killed_at, *sorted(r[1] for r in ok if r[1] >= killed_at)]
    gap = max(b - a for a, b in itertools.pairwise(ends))
    figures = {
        "scenario": "frontdoor",
        "killed": holder,
        "requests": len(results),
        "failed": len(failed),
        "failed_kinds": sorted({str(r[2]) for r in failed}),
        "gap_seconds": round(gap, 2),
    }
    report = os.environ.get("MODELSERVE_FAILOVER_REPORT") or os.path.join(
        tempfile.gettempdir(), "modelserve-failover-frontdoor.jsonl"
    )
    with open(report, "a") as f:
        f.write(json.dumps(figures) + "\n")
    print("FAILOVER", json.dumps(figures))
    assert VIP in _host(other).check_output("ip -4 -o addr show"), figures
    assert all('"host"' in r[3] for r in ok), "a wrong answer"
    assert all(r[2] in ("ConnectionError", "ReadTimeout", "ConnectTimeout") for r in failed), figures
    assert ok and ok[-1][0] > killed_at + 5, figures
