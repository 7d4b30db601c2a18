"""The front door from the controller, through the VIP: TLS verified against the internal CA, plain
HTTP redirected, keys checked by hash, limits answered 429, health endpoints closed to outsiders,
and the VIP moving when the holder's HAProxy stops. The holder killed under load, with the real
gunicorns behind it, is molecule/cluster's (test_killing_the_front_end_holding_the_vip_under_load)."""

import os
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
