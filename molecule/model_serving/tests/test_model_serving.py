"""The served app, from outside the host: predictions, readiness, bad input, worker restarts."""

import json
import re
import time
from pathlib import Path

import pytest
import requests

PORT = 8080
WEB_METRICS_PORT = 9800  # model_serving_web_metrics_port's default
ROW = [6, 148, 72, 35, 0, 33.6, 0.627, 50]
# `systemd-analyze security` exposure (0 best .. 10 worst) the units must stay below: the level
# stated in roles/model_serving/README.md ("Service sandbox").
MAX_EXPOSURE = 2.0
UNITS = ("modelserve-web.service", "modelserve-worker@1.service")
# The checked-in lock the wheelhouse is built from (scripts/lock).
LOCK = Path(__file__).resolve().parents[3] / "app" / "requirements" / "web-worker.lock"


def _pins(text):
    """{normalised name: version} of the `name==version` lines of a lock or of `pip freeze`."""
    return {
        re.sub(r"[-_.]+", "-", m[1]).lower(): m[2]
        for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, re.M)
    }


@pytest.fixture(scope="module")
def base_url(host):
    addr = host.interface("eth0").addresses[0]
    return f"http://{addr}:{PORT}"


def _metrics(url, timeout=90):
    """A worker process's /metrics text. It is served from the worker's ready signal on: after a
    restart (test_serves_while_one_worker_process_restarts) that takes a while on a loaded host."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return requests.get(url, timeout=10).text
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _predict(base_url, rows, timeout=10):
    return requests.post(f"{base_url}/api/v1/predict", json={"rows": rows}, timeout=timeout)


def test_services_run_as_the_app_user(host):
    assert host.service("modelserve-web").is_running
    for i in (1, 2):
        assert host.service(f"modelserve-worker@{i}").is_running
    lines = host.check_output("ps -eo user:20,args").splitlines()
    app = [ln.split()[0] for ln in lines if "-m gunicorn" in ln or "-m celery" in ln]
    assert len(app) >= 4  # gunicorn master + 2 workers, 2 Celery processes at least
    assert set(app) == {"modelserve"}


def test_installed_versions_are_exactly_the_lock(host):
    # Web and worker on this host: every locked package at its locked version, nothing else (pip
    # freeze leaves out pip and setuptools, which the venv brings; the app is not in the lock).
    frozen = _pins(host.check_output("/opt/modelserve/venv/bin/python -m pip freeze"))
    assert frozen.pop("modelserve") == "1.0.0"
    locked = _pins(LOCK.read_text())
    locked.pop("pip")
    assert len(locked) > 20
    assert frozen == locked


@pytest.mark.parametrize(("component", "user"), [("web", "modelserve-web"), ("worker", "modelserve-worker")])
def test_each_component_has_its_own_broker_user_in_a_private_file(host, component, user):
    """One broker user per component, each URL in its own file read by that component's units only."""
    env = host.file(f"/etc/modelserve/broker-{component}.env")
    assert env.mode == 0o640 and env.user == "root" and env.group == "modelserve"
    with host.sudo():
        text = env.content_string
    urls = re.findall(r"amqps://([^:]+):", text)
    assert urls and set(urls) == {user}, urls
    assert "amqp://" not in text and "guest" not in text
    unit = "modelserve-web.service" if component == "web" else "modelserve-worker@.service"
    files = host.file(f"/etc/systemd/system/{unit}").content_string
    assert f"EnvironmentFile=/etc/modelserve/broker-{component}.env" in files
    other = "worker" if component == "web" else "web"
    assert f"broker-{other}.env" not in files
    assert "MODELSERVE_BROKER_URL" not in host.file("/etc/modelserve/modelserve.env").content_string


def test_the_running_services_connect_as_their_own_users(host):
    """What the broker sees: the web's connections as the web user, the workers' as the worker user,
    and no connection as the .* user of earlier versions."""
    with host.sudo():
        out = host.check_output("rabbitmqctl --quiet --formatter json list_connections user")
        users = host.check_output("rabbitmqctl --quiet --formatter json list_users")
    connections = json.loads(out)
    by_user = {c["user"] for c in connections}
    assert by_user == {"modelserve-web", "modelserve-worker"}, by_user
    assert "modelserve" not in {u["user"] for u in json.loads(users)}


def test_broker_client_certificate_of_the_cluster_ca(host):
    """amqps with verify_peer: this host's client certificate, signed by the cluster CA, key private."""
    env = host.file("/etc/modelserve/modelserve.env").content_string
    assert "MODELSERVE_BROKER_TLS_CA=/etc/modelserve/tls/broker-ca.pem" in env
    key = host.file("/etc/modelserve/tls/broker-client.key.pem")
    assert key.mode == 0o600 and key.user == "modelserve"
    with host.sudo():
        out = host.run(
            "openssl verify -purpose sslclient -CAfile /etc/modelserve/tls/broker-ca.pem"
            " /etc/modelserve/tls/broker-client.pem"
        )
    assert out.rc == 0, out.stderr


def test_current_points_at_the_seed_release(host):
    current = host.file("/srv/modelserve/current")
    assert current.is_symlink
    meta = json.loads(host.file("/srv/modelserve/current/metadata.json").content_string)
    assert current.linked_to.endswith(f"releases/{meta['version']}")


def test_ready_and_predicts_from_the_controller(base_url, host):
    assert requests.get(f"{base_url}/readyz", timeout=10).status_code == 200
    r = _predict(base_url, [ROW, [1, 85, 66, 29, 0, 26.6, 0.351, 31]])
    assert r.status_code == 200, r.text
    body = r.json()
    meta = json.loads(host.file("/srv/modelserve/current/metadata.json").content_string)
    assert body["model_version"] == meta["version"]
    assert len(body["predictions"]) == 2
    for p in body["predictions"]:
        assert 0.0 <= p["probability"] <= 1.0 and p["label"] in (0, 1)


def test_bad_input_is_a_4xx_naming_the_field(base_url):
    r = _predict(base_url, [[1, 2, 3]])
    assert 400 <= r.status_code < 500
    assert "rows[0]" in r.json()["field"]


def test_serves_while_one_worker_process_restarts(base_url, host):
    host.run("systemctl restart modelserve-worker@1")
    deadline = time.monotonic() + 20
    ok = 0
    while time.monotonic() < deadline and ok < 20:
        assert _predict(base_url, [ROW]).status_code == 200
        ok += 1
    assert ok == 20


@pytest.mark.parametrize("unit", UNITS)
def test_units_are_sandboxed_below_the_stated_exposure(host, unit):
    props = host.check_output(
        f"systemctl show {unit} -p ProtectSystem -p PrivateTmp -p PrivateDevices -p NoNewPrivileges"
        " -p CapabilityBoundingSet -p RestrictAddressFamilies -p MemoryMax -p TasksMax -p ReadOnlyPaths"
    )
    shown = dict(line.split("=", 1) for line in props.splitlines())
    assert shown["ProtectSystem"] == "strict" and shown["PrivateTmp"] == "yes"
    assert shown["PrivateDevices"] == "yes" and shown["NoNewPrivileges"] == "yes"
    assert shown["CapabilityBoundingSet"] == ""
    assert set(shown["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert shown["MemoryMax"] != "infinity" and shown["TasksMax"] != "infinity"
    assert "/srv/modelserve" in shown["ReadOnlyPaths"]
    report = host.run(f"systemd-analyze security --no-pager {unit}")
    print(report.stdout)  # the full table, in the verify log
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)", report.stdout)
    assert match, report.stdout + report.stderr
    exposure = float(match.group(1))
    print(f"{unit}: exposure {exposure} (must be below {MAX_EXPOSURE})")
    assert exposure < MAX_EXPOSURE


def test_sandboxed_worker_computes_with_litert_and_numpy(base_url, host):
    """Under the system call filter: a batch big enough for LiteRT's thread pool, same as in-process."""
    rows = [[i % 10, 80 + i, 70, 20, 80, 25 + i % 20, 0.5, 21 + i % 40] for i in range(300)]
    r = _predict(base_url, rows, timeout=30)
    assert r.status_code == 200, r.text
    probs = [p["probability"] for p in r.json()["predictions"]]
    assert len(probs) == 300 and len(set(probs)) > 10  # real numbers, not one constant
    # Nothing was refused by the filter: the kernel would log a SECCOMP audit record only when
    # killing; with SystemCallErrorNumber=EPERM the units' logs are where a refusal shows.
    for unit in UNITS:
        log = host.check_output(f"journalctl -u {unit} --no-pager -o cat -n 200 || true")
        assert "Operation not permitted" not in log, log[-2000:]


def test_metrics_are_one_view_per_service_with_the_model_version(base_url, host):
    """The web's counts cover both gunicorn processes (no pid label); each worker process serves its
    own /metrics on the host's address (instance i on 9810 + i - 1), from its RuntimeDirectory."""
    for _ in range(5):
        assert _predict(base_url, [ROW]).status_code == 200
    addr = host.interface("eth0").addresses[0]
    # The web's: on their own port, served by the gunicorn master; not on the clients' port.
    assert requests.get(f"{base_url}/metrics", timeout=10).status_code == 404
    web = requests.get(f"http://{addr}:{WEB_METRICS_PORT}/metrics", timeout=10).text
    assert "pid=" not in web
    assert re.search(r'^modelserve_predictions_total\{model_version="[^"]+"\} \d', web, re.M), web[-2000:]
    meta = json.loads(host.file("/srv/modelserve/current/metadata.json").content_string)
    for i in (1, 2):
        assert host.file(f"/run/modelserve-worker-{i}").is_directory
        text = _metrics(f"http://{addr}:{9810 + i - 1}/metrics")
        assert f'modelserve_worker_model_info{{model_version="{meta["version"]}"}} 1.0' in text, text[-2000:]
        assert f'modelserve_worker_model_age_seconds{{model_version="{meta["version"]}"}}' in text


def test_workers_report_drift_against_the_seed_release_profile(base_url, host):
    """The seed release's drift_profile.json was installed with it; each worker process compares its
    window of live rows with it and reports PSI and KS per feature and for the score."""
    env = host.file("/etc/modelserve/modelserve.env").content_string
    assert "MODELSERVE_DRIFT_WINDOW=1000" in env and "MODELSERVE_DRIFT_MIN_ROWS=200" in env
    meta = json.loads(host.file("/srv/modelserve/current/metadata.json").content_string)
    assert host.file("/srv/modelserve/current/drift_profile.json").is_file
    version, addr = meta["version"], host.interface("eth0").addresses[0]
    rows = [[i % 10, 80 + i % 90, 70, 20, 80, 25 + i % 20, 0.5, 21 + i % 40] for i in range(250)]
    urls = [f"http://{addr}:{9810 + i - 1}/metrics" for i in (1, 2)]
    pattern = rf'^modelserve_worker_drift_window_rows\{{model_version="{re.escape(version)}"\}} (\S+)'

    def window_rows(url):
        match = re.search(pattern, _metrics(url), re.M)
        return float(match.group(1)) if match else 0.0

    for _ in range(12):  # bounded: batches go to either process until both windows hold 200 rows
        if min(window_rows(url) for url in urls) >= 200:
            break
        assert _predict(base_url, rows, timeout=30).status_code == 200
    for url in urls:
        text = _metrics(url)
        assert f'modelserve_worker_drift_enabled{{model_version="{version}"}} 1.0' in text, text[-2000:]
        for feature in (*meta["features"], "score"):
            labels = f'{{feature="{feature}",model_version="{version}"}}'
            assert re.search(rf"^modelserve_worker_drift_psi{re.escape(labels)} \d", text, re.M), feature
            assert re.search(rf"^modelserve_worker_drift_ks_statistic{re.escape(labels)} \d", text, re.M)
    # The front end's fleet view carries it from the workers' status messages (what the page shows).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        drift = requests.get(f"{base_url}/api/v1/model", timeout=10).json()["drift"]
        if drift.get("workers") == 2 and len(drift.get("columns") or {}) == 9:
            break
        time.sleep(1)
    assert drift["enabled"] is True and drift["workers"] == 2 and len(drift["columns"]) == 9, drift
