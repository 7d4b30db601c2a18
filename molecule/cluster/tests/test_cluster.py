"""The cluster from the controller: a real prediction over HTTPS through the VIP with an API key,
and every worker host consuming; the front end holding the VIP killed under load.

Runs twice: after converge (one worker host) and after side_effect added the spare host to the
workers group. The second time, the spare host must answer requests on its own.
"""

import itertools
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest
import requests
import testinfra.utils.ansible_runner

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
runner = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
ROW = [6, 148, 72, 35, 0, 33.6, 0.627, 50]
# molecule.yml's inventory overrides the wiring default (8080), as an environment may.
HTTP_PORT = runner.get_variables("cl-frontend")["modelserve_http_port"]
VIP = runner.get_variables("cl-frontend")["modelserve_vip"]
FRONTENDS = ["cl-frontend", "cl-frontend2"]
EPHEMERAL = os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]


def _host(name):
    return runner.get_host(name)


def _key(name):
    # Made by the password lookup in molecule.yml's inventory (the key is the file's first word).
    with open(os.path.join(EPHEMERAL, f"key-{name}")) as f:
        return f.read().split()[0]


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    # The internal CA's certificate, from its host (the first broker): what a client trusts.
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    path.write_text(_host("cl-broker").file("/etc/modelserve/pki/modelserve-ca.pem").content_string)
    return str(path)


@pytest.fixture(scope="module")
def url():
    return f"https://{VIP}"


def _holder():
    held = [n for n in FRONTENDS if VIP in _host(n).check_output("ip -4 -o addr show")]
    assert len(held) == 1, f"the VIP is on {held}"
    return held[0]


def _worker_hosts():
    names = ["cl-worker1", "cl-spare"]
    return [n for n in names if _host(n).service("modelserve-worker@1").is_running]


def _predict(url, key="load", timeout=15):
    ca_file = os.path.join(EPHEMERAL, "ca.pem")
    if not os.path.exists(ca_file):
        with open(ca_file, "w") as f:
            f.write(_host("cl-broker").file("/etc/modelserve/pki/modelserve-ca.pem").content_string)
    headers = {"X-API-Key": _key(key)} if key else {}
    return requests.post(
        f"{url}/api/v1/predict", json={"rows": [ROW]}, headers=headers, timeout=timeout, verify=ca_file
    )


def test_prediction_over_https_through_the_vip_with_a_key(url):
    r = _predict(url)
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert 0.0 <= pred["probability"] <= 1.0


def test_no_key_or_a_bad_key_is_401_with_a_json_body(url, ca):
    missing = requests.post(f"{url}/api/v1/predict", json={"rows": [ROW]}, verify=ca, timeout=15)
    bad = requests.post(
        f"{url}/api/v1/predict", json={"rows": [ROW]}, headers={"X-API-Key": "y" * 48}, verify=ca, timeout=15
    )
    for r in (missing, bad):
        assert r.status_code == 401 and r.headers["Content-Type"] == "application/json", r.text
        assert "API key" in r.json()["error"]


def test_over_the_key_limit_is_429(url):
    # "limited" may make 5 requests per 10 s (molecule.yml); then 429 with a JSON body.
    codes = [_predict(url, key="limited").status_code for _ in range(8)]
    assert codes[:5] == [200] * 5 and codes[5:] == [429] * 3, codes


def test_plain_http_is_redirected_to_https():
    r = requests.get(f"http://{VIP}/", allow_redirects=False, timeout=10)
    assert r.status_code == 308 and r.headers["Location"] == f"https://{VIP}/", r.headers


def test_gunicorn_listens_on_the_cluster_address_only():
    for name in FRONTENDS:
        frontend = _host(name)
        addr = frontend.interface("eth0").addresses[0]
        assert not frontend.socket(f"tcp://0.0.0.0:{HTTP_PORT}").is_listening, name
        assert frontend.socket(f"tcp://{addr}:{HTTP_PORT}").is_listening, name
        assert frontend.socket("tcp://0.0.0.0:443").is_listening, name


def test_the_inventory_override_of_the_http_port_reaches_the_hosts():
    assert HTTP_PORT != 8080, "molecule.yml should override modelserve_http_port"
    frontend = _host("cl-frontend")
    table = frontend.check_output("nft list table inet modelserve")
    # gunicorn to the cluster network only; HTTPS and the redirect to the world.
    rule = next(ln for ln in table.splitlines() if f"tcp dport {HTTP_PORT} accept" in ln)
    assert all(c in rule for c in runner.get_variables("cl-frontend")["modelserve_cluster_cidrs"]), rule
    assert "tcp dport 443 accept" in table and "tcp dport 80 accept" in table
    assert "meta l4proto vrrp accept" in table
    assert "dport 8080" not in table
    # The release switch (git_deploy, on the first worker) waits on the same port.
    deploy = _host("cl-worker1").file("/etc/modelserve-deploy/deploy.json").content_string
    assert f":{HTTP_PORT}/api/v1/model" in deploy


def test_worker_metrics_are_open_to_the_cluster_network_only():
    name = _worker_hosts()[0]
    worker, variables = _host(name), runner.get_variables(name)
    port = variables.get("modelserve_worker_metrics_port", 9810)  # the wiring default unless overridden
    rules = [
        ln
        for ln in worker.check_output("nft list table inet modelserve").splitlines()
        if f"dport {port} " in ln
    ]
    assert rules and all(any(c in ln for c in variables["modelserve_cluster_cidrs"]) for ln in rules), rules
    # A Prometheus on the cluster network (here: the front end) reads the worker's own /metrics.
    url = f"http://{worker.interface('eth0').addresses[0]}:{port}/metrics"
    read = f"import urllib.request; print(urllib.request.urlopen('{url}', timeout=10).read().decode())"
    text = _host("cl-frontend").check_output(f'python3 -c "{read}"')
    assert "modelserve_worker_model_info{model_version=" in text


def test_broker_refuses_guest_and_listens_on_the_cluster_network():
    broker = _host("cl-broker")
    out = broker.check_output("rabbitmqctl -q list_users --no-table-headers")
    users = {line.split()[0] for line in out.splitlines() if line.strip()}
    # One user per tier (least privilege); no guest, no single .* user.
    assert {"modelserve-web", "modelserve-worker"} <= users and not users & {"guest", "modelserve"}, users
    # AMQP over TLS only: the front end reaches 5671, and nothing answers on plain 5672.
    probe = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()"
    broker_ip = broker.interface("eth0").addresses[0]
    frontend = _host("cl-frontend")
    assert frontend.run("python3 -c %s %s 5671", probe, broker_ip).rc == 0
    assert frontend.run("python3 -c %s %s 5672", probe, broker_ip).rc != 0


def test_every_worker_host_consumes_on_its_own(url):
    workers = _worker_hosts()
    assert workers, "no worker host runs modelserve-worker@1"
    for alone in workers:
        others = [w for w in workers if w != alone]
        for o in others:
            _host(o).run("systemctl stop 'modelserve-worker@*'")
        try:
            deadline = time.monotonic() + 30
            while True:
                r = _predict(url)
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert r.status_code == 200, f"{alone} alone did not answer: {r.status_code} {r.text}"
            assert alone in r.headers.get("X-Modelserve-Worker", ""), r.headers
        finally:
            for o in others:
                _host(o).run("systemctl start modelserve-worker@1")


def _after_side_effect():
    return _host("cl-spare").file("/etc/systemd/system/modelserve-worker@.service").exists


def test_spare_host_joined_after_side_effect():
    spare = _host("cl-spare")
    if not _after_side_effect():
        pytest.skip("before side_effect: the spare host is not a worker yet")
    assert spare.service("modelserve-worker@1").is_running
    with spare.sudo():
        env = spare.file("/etc/modelserve/broker-worker.env").content_string
    assert "amqps://modelserve-worker:" in env and not spare.file("/etc/modelserve/broker-web.env").exists
    broker_ip = _host("cl-broker").interface("eth0").addresses[0]
    assert "amqps://" in env and (f"@{broker_ip}:5671/" in env or "@cl-broker:5671/" in env)


# Growing the cluster re-runs site.yml on every host (side_effect); on the hosts that were there
# it may change only what lists the cluster's hosts. That run is also this scenario's idempotence
# proof for those hosts (no separate idempotence step): Ansible's junit callback (molecule.yml)
# records each changed task as a failed test case, "[host] play: task".
HOST_LISTS = (
    "monitoring : configure | Write each scrape job's targets from the inventory groups",
    "git_deploy : repository | Hook configuration",  # the hosts a release fans out to
    "git_deploy : repository | Trust the other hosts' real host keys",
)


def test_growing_the_cluster_changes_only_the_new_host_and_the_lists_of_hosts():
    if not _after_side_effect():
        pytest.skip("before side_effect: the cluster has not grown yet")
    reports = sorted(Path(EPHEMERAL, "junit").glob("side_effect-*.xml"), key=lambda p: p.stat().st_mtime)
    assert reports, f"no junit report of side_effect in {EPHEMERAL}/junit"
    changed = {}
    for case in ElementTree.parse(reports[-1]).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            host, task = case.get("name").removeprefix("[").split("] ", 1)
            changed.setdefault(host, []).append(task)
    print(json.dumps(changed, indent=1))
    assert changed.get("cl-spare"), "side_effect changed nothing on the new host"
    had = {host: tasks for host, tasks in changed.items() if host != "cl-spare"}
    unexpected = {host: [t for t in tasks if not t.endswith(HOST_LISTS)] for host, tasks in had.items()}
    assert not any(unexpected.values()), f"growing the cluster changed more on the hosts it had: {unexpected}"


def _load(url, stop, results, rate=10.0, limit=1000):
    """One client: a new connection per prediction, `rate` a second at most, at most `limit` requests."""
    while not stop.is_set() and len(results) < limit:
        started = time.monotonic()
        try:
            r = _predict(url, timeout=5)
            prob = r.json()["predictions"][0]["probability"] if r.status_code == 200 else None
            results.append((started, time.monotonic(), r.status_code, prob))
        except requests.RequestException as exc:
            kind = type(exc).__name__
            # A handshake cut by the failover is an SSLError (a ConnectionError a client retries); a
            # certificate the CA does not vouch for is a defect, never counted as retryable.
            if isinstance(exc, requests.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
                kind = "CertificateVerifyFailed"
            results.append((started, time.monotonic(), kind, None))
        time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - started)))


def _wait_systemd(name, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["docker", "exec", name, "systemctl", "is-system-running"], capture_output=True, text=True
        ).stdout.strip()
        if out in ("running", "degraded"):
            return
        time.sleep(1)
    raise AssertionError(f"{name}: systemd did not come back")


def test_killing_the_front_end_holding_the_vip_under_load(url):
    """Two clients at 10 req/s each; the VIP's holder is killed (SIGKILL, no goodbye) after 5 s.

    Every answer that arrives must be a right one (200 and a probability); the failures must be
    connection errors a client can retry (refused, reset, a TLS handshake cut short: CI saw 8 of 364
    requests fail, some as SSLError), never an HTTP error or a certificate the CA does not vouch
    for. Failed requests and the gap are reported, not asserted.
    Once per scenario, on the final shape (after side_effect): a kill and a restart cost minutes.
    """
    if not _after_side_effect():
        pytest.skip("runs once, after side_effect")
    holder = _holder()
    other = next(n for n in FRONTENDS if n != holder)
    stop, results, threads = threading.Event(), [[], []], []
    for res in results:
        threads.append(threading.Thread(target=_load, args=(url, stop, res), daemon=True))
        threads[-1].start()
    try:
        time.sleep(5)
        killed_at = time.monotonic()
        subprocess.run(["docker", "kill", holder], check=True, capture_output=True)
        time.sleep(15)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        subprocess.run(["docker", "start", holder], check=True, capture_output=True)
    every = sorted(r for res in results for r in res)
    ok = [r for r in every if r[2] == 200]
    failed = [r for r in every if r[2] != 200]
    # The gap: the longest time without a successful answer from the kill on.
    ends = [killed_at, *sorted(r[1] for r in ok if r[1] >= killed_at)]
    gap = max(b - a for a, b in itertools.pairwise(ends)) if len(ends) > 1 else float("inf")
    figures = {
        "killed": holder,
        "vip_now_on": _holder_after(other),
        "requests": len(every),
        "failed": len(failed),
        "failed_kinds": sorted({str(r[2]) for r in failed}),
        "gap_seconds": round(gap, 2),
    }
    report = os.environ.get("MODELSERVE_FAILOVER_REPORT") or os.path.join(
        tempfile.gettempdir(), "modelserve-failover-cluster.jsonl"
    )
    with open(report, "a") as f:
        f.write(json.dumps(figures) + "\n")
    print("FAILOVER", json.dumps(figures))
    _wait_systemd(holder)
    assert figures["vip_now_on"] == other, figures
    assert all(0.0 <= r[3] <= 1.0 for r in ok), "a wrong answer"
    retryable = ("ConnectionError", "SSLError", "Timeout", "ReadTimeout", "ConnectTimeout")
    assert all(r[2] in retryable for r in failed), figures
    assert ok and ok[-1][0] > killed_at + 5, f"no success well after the kill: {figures}"
    # Back in the pool: the killed front end's services start again on their own (enabled units).
    # Bounded generously: a container's boot under CI's load can take minutes; passing costs seconds.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if _host(holder).run("systemctl is-active haproxy keepalived modelserve-web").rc == 0:
            break
        time.sleep(2)
    assert _host(holder).run("systemctl is-active haproxy keepalived modelserve-web").rc == 0


def _holder_after(expected, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if VIP in _host(expected).check_output("ip -4 -o addr show"):
            return expected
        time.sleep(0.5)
    return None
