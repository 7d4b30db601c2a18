"""Behaviour of the `docker` role: a daemon that really runs containers, with Compose v2.

No registry is reachable, so the test image is built inside the host from busybox-static.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

IMAGE = "modelserve-test/busybox:local"
COMPOSE_DIR = "/root/compose-test"
SCENARIO = Path(__file__).resolve().parent.parent


def test_daemon_json(host):
    daemon = host.file("/etc/docker/daemon.json")
    assert daemon.mode == 0o644
    assert json.loads(daemon.content_string) == {
        "storage-driver": "vfs",
        "log-driver": "json-file",
        "log-opts": {"max-size": "10m", "max-file": "3"},
    }


def test_daemon_uses_the_configuration(host):
    assert host.check_output("docker info --format '{{.Driver}}'") == "vfs"
    assert host.check_output("docker info --format '{{.LoggingDriver}}'") == "json-file"


def test_service_active_and_enabled(host):
    service = host.service("docker")
    assert service.is_running
    assert service.is_enabled


def test_compose_v2_plugin(host):
    out = host.check_output("docker compose version")
    assert out.startswith("Docker Compose version v2."), out
    plugin = host.file("/usr/local/lib/docker/cli-plugins/docker-compose")
    assert plugin.is_symlink
    # The real binary, not the Python wrapper that drops exit codes.
    assert host.run("docker compose no-such-command").rc != 0


def test_docker_users_in_group(host):
    assert "docker" in host.user("deployer").groups
    assert host.run("sudo -u deployer docker info --format '{{.ServerVersion}}'").rc == 0


@pytest.fixture(scope="module")
def image(host):
    """A one-binary image made from busybox-static and `docker import`."""
    host.check_output(
        "set -e; d=$(mktemp -d /var/tmp/rootfs.XXXXXX); mkdir -p $d/bin;"
        " cp /bin/busybox $d/bin/busybox;"
        " for a in sh echo sleep cat httpd; do ln -s busybox $d/bin/$a; done;"
        f" tar -C $d -c . | docker import - {IMAGE}; rm -rf $d"
    )
    yield IMAGE
    host.run(f"docker image rm -f {IMAGE}")


def test_run_a_container(host, image):
    assert host.check_output(f"docker run --rm {image} echo hello") == "hello"


def test_compose_up(host, image):
    compose = (
        "services:\n"
        "  web:\n"
        f"    image: {image}\n"
        "    command: ['sh', '-c', 'echo compose-up; exec sleep 300']\n"
    )
    host.check_output(f'mkdir -p {COMPOSE_DIR} && printf %s "{compose}" > {COMPOSE_DIR}/compose.yaml')
    try:
        host.check_output(f"docker compose --project-directory {COMPOSE_DIR} up -d --wait")
        ps = json.loads(
            host.check_output(f"docker compose --project-directory {COMPOSE_DIR} ps --format json web")
        )
        assert ps["State"] == "running"
        logs = host.check_output(f"docker compose --project-directory {COMPOSE_DIR} logs web")
        assert "compose-up" in logs
    finally:
        host.run(f"docker compose --project-directory {COMPOSE_DIR} down --timeout 1")


def test_docker_repository_source_renders_in_check_mode():
    """docker_source: docker cannot reach download.docker.com here: render it in check mode."""
    result = subprocess.run(
        [
            "ansible-playbook",
            "--inventory",
            os.environ["MOLECULE_INVENTORY_FILE"],
            "--check",
            "--diff",
            str(SCENARIO / "check_docker_source.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in (
        "+Types: deb",
        "+URIs: https://download.docker.com/linux/debian",
        "+Suites: bookworm",
        "+Components: stable",
        "+Architectures: amd64",
        "+Signed-By: /etc/apt/keyrings/docker.asc",
    ):
        assert line in out, out
    assert "+++ after:" in out
    assert "docker.sources" in out
    assert "Fetch Docker's apt signing key" in out  # the task exists, skipped (fetch disabled)
