"""The cluster from the controller: a real prediction over HTTP, and every worker host consuming.

Runs twice: after converge (one worker host) and after side_effect added the spare host to the
workers group. The second time, the spare host must answer requests on its own.
"""

import os
import time

import pytest
import requests
import testinfra.utils.ansible_runner

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
runner = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
ROW = [6, 148, 72, 35, 0, 33.6, 0.627, 50]
# molecule.yml's inventory overrides the wiring default (8080), as an environment may.
HTTP_PORT = runner.get_variables("cl-frontend")["modelserve_http_port"]


def _host(name):
    return runner.get_host(name)


@pytest.fixture(scope="module")
def url():
    addr = _host("cl-frontend").interface("eth0").addresses[0]
    return f"http://{addr}:{HTTP_PORT}"


def _worker_hosts():
    names = ["cl-worker1", "cl-spare"]
    return [n for n in names if _host(n).service("modelserve-worker@1").is_running]


def _predict(url):
    return requests.post(f"{url}/api/v1/predict", json={"rows": [ROW]}, timeout=15)


def test_prediction_over_http_from_the_controller(url):
    r = _predict(url)
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert 0.0 <= pred["probability"] <= 1.0


def test_the_inventory_override_of_the_http_port_reaches_the_hosts():
    assert HTTP_PORT != 8080, "molecule.yml should override modelserve_http_port"
    frontend = _host("cl-frontend")
    assert frontend.socket(f"tcp://0.0.0.0:{HTTP_PORT}").is_listening
    table = frontend.check_output("nft list table inet modelserve")
    assert f"tcp dport {HTTP_PORT} accept" in table
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
    users = broker.check_output("rabbitmqctl -q list_users")
    assert "guest" not in users and "modelserve" in users
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


def test_spare_host_joined_after_side_effect():
    spare = _host("cl-spare")
    if not spare.file("/etc/systemd/system/modelserve-worker@.service").exists:
        pytest.skip("before side_effect: the spare host is not a worker yet")
    assert spare.service("modelserve-worker@1").is_running
    env = spare.file("/etc/modelserve/modelserve.env").content_string
    broker_ip = _host("cl-broker").interface("eth0").addresses[0]
    assert "amqps://" in env and (f"@{broker_ip}:5671/" in env or "@cl-broker:5671/" in env)
