"""compose mode: the same app, as containers built on the host from the controller's wheels."""

import json
import os

import pytest
import requests

PORT = 8080
ROW = [6, 148, 72, 35, 0, 33.6, 0.627, 50]
PROJECT_DIR = "/opt/modelserve/compose"


@pytest.fixture(scope="module")
def base_url(host):
    return f"http://{host.interface('eth0').addresses[0]}:{PORT}"


@pytest.fixture(scope="module")
def containers(host):
    out = host.check_output(f"docker compose --project-directory {PROJECT_DIR} ps --all --format json")
    # One JSON object per line (Compose >= 2.21).
    found = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {c["Service"]: c for c in found}


def inspect(host, name):
    return json.loads(host.check_output(f"docker inspect {name}"))[0]


def test_web_and_each_worker_process_run_as_a_container(containers):
    assert set(containers) == {"web", "worker1", "worker2"}
    assert all(c["State"] == "running" for c in containers.values()), containers


def test_workers_know_their_account(host, containers):
    # Celery warns (and may refuse) when the uid/gid have no entry in the image.
    logs = host.check_output(f"docker logs {containers['worker1']['Name']} 2>&1")
    assert "SecurityWarning" not in logs
    meta = json.loads(host.file("/srv/modelserve/current/metadata.json").content_string)
    assert f"model {meta['version']} loaded" in logs


def test_no_systemd_units_of_the_other_mode(host):
    assert not host.service("modelserve-web").is_running
    assert not host.service("modelserve-worker@1").is_running
    assert not host.file("/opt/modelserve/venv").exists


def test_containers_run_unprivileged_and_read_only(host, containers):
    user = host.user("modelserve")
    for c in containers.values():
        cfg = inspect(host, c["Name"])
        assert cfg["Config"]["User"] == f"{user.uid}:{user.gid}"
        assert cfg["HostConfig"]["ReadonlyRootfs"] is True
        assert cfg["HostConfig"]["CapDrop"] == ["ALL"]
        mounts = {m["Destination"]: m for m in cfg["Mounts"]}
        assert mounts["/srv/modelserve"]["RW"] is False


def test_settings_change_is_tracked_by_a_label(host, containers):
    # Compose recreates a container whose config changed: the label carries the env file's checksum.
    sha1 = host.check_output("sha1sum /etc/modelserve/modelserve.env").split()[0]
    for name, c in containers.items():
        labels = inspect(host, c["Name"])["Config"]["Labels"]
        assert labels["modelserve.env-sha1"] == sha1
        # and its own broker URL's (broker-web.env or broker-worker.env: one broker user each)
        component = "web" if name == "web" else "worker"
        with host.sudo():
            broker = host.check_output(f"sha1sum /etc/modelserve/broker-{component}.env").split()[0]
        assert labels["modelserve.broker-env-sha1"] == broker


def test_image_holds_the_app_without_an_index(host, containers):
    image = containers["web"]["Image"]
    out = host.check_output(f"docker run --rm --network none {image} modelserve-release --help")
    assert "validate" in out


def test_earlier_builds_of_the_app_image_are_removed(host, containers):
    # prepare built modelserve/app:older-build with the role's label; only the image in use stays.
    fmt = "{{.Repository}}:{{.Tag}}"
    images = host.check_output(f"docker image ls --filter label=modelserve.app --format '{fmt}'").split()
    assert "modelserve/app:older-build" not in images
    assert set(images) == {c["Image"] for c in containers.values()}
    # images without the label are left alone (the base image the app builds on)
    base = os.environ.get("MOLECULE_IMAGE", "modelserve/debian-systemd:bookworm-amd64")
    assert host.run(f"docker image inspect {base}").rc == 0


def test_predicts_from_the_controller(base_url, host):
    r = requests.post(f"{base_url}/api/v1/predict", json={"rows": [ROW]}, timeout=10)
    assert r.status_code == 200, r.text
    meta = json.loads(host.file("/srv/modelserve/current/metadata.json").content_string)
    assert r.json()["model_version"] == meta["version"]
    bad = requests.post(f"{base_url}/api/v1/predict", json={"rows": [[1, 2, 3]]}, timeout=10)
    assert 400 <= bad.status_code < 500 and "rows[0]" in bad.json()["field"]


def test_serves_while_a_worker_container_restarts(base_url, host, containers):
    host.check_output(f"docker restart {containers['worker1']['Name']}")
    for _ in range(20):
        r = requests.post(f"{base_url}/api/v1/predict", json={"rows": [ROW]}, timeout=10)
        assert r.status_code == 200, r.text
