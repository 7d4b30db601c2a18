"""Behaviour of the `common` role on a host of the `broker` group.

The controller (where pytest runs) reaches the instance's address on the Molecule Docker network,
so it acts as "another host": SSH logins and firewall reachability are tried from here.
"""

import os
import socket
import subprocess
from pathlib import Path

import pytest

EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent"))
KEY = EPHEMERAL / "id_opsadmin"
SSH_OPTS = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "ConnectTimeout=5",
    "-o",
    "LogLevel=ERROR",
]


@pytest.fixture(scope="module")
def address(host):
    """IPv4 address of the instance on the Molecule network."""
    return host.check_output("hostname -I").split()[0]


def ssh(address, user, *args, env=None, extra=()):
    return subprocess.run(
        ["ssh", *SSH_OPTS, *extra, f"{user}@{address}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def reachable(address, port, timeout=3.0):
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- SSH -----------------------------------------------------------------------------------------


def test_sshd_effective_config(host):
    effective = dict(line.split(" ", 1) for line in host.check_output("sshd -T").splitlines() if " " in line)
    assert effective["permitrootlogin"] == "no"
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["pubkeyauthentication"] == "yes"
    assert effective["authenticationmethods"] == "publickey"


def test_admin_key_login_works_and_has_sudo(address):
    result = ssh(address, "opsadmin", "sudo -n id -un", extra=["-i", str(KEY), "-o", "BatchMode=yes"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "root"


def test_root_key_login_refused(address):
    """root has the admin's key in authorized_keys (prepare): PermitRootLogin no still refuses it."""
    result = ssh(address, "root", "true", extra=["-i", str(KEY), "-o", "BatchMode=yes"])
    assert result.returncode == 255
    assert "Permission denied" in result.stderr


def test_root_password_login_refused(address, tmp_path):
    """root has a password (prepare); sshd offers no password/keyboard-interactive method."""
    askpass = tmp_path / "askpass"
    askpass.write_text("#!/bin/sh\necho molecule-root-pw\n")
    askpass.chmod(0o700)
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
    result = ssh(
        address,
        "root",
        "true",
        env=env,
        extra=[
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "NumberOfPasswordPrompts=1",
        ],
    )
    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr


def test_sshd_running(host):
    assert host.service("ssh").is_running
    assert host.service("ssh").is_enabled


# --- firewall ------------------------------------------------------------------------------------


def test_ruleset_has_ssh_and_group_ports_only(host):
    table = host.check_output("nft list table inet modelserve")
    assert "policy drop" in table
    assert "tcp dport 22 accept" in table
    assert "tcp dport 5672 accept" in table  # group broker (this host)
    assert "tcp dport 9100 accept" in table  # common_firewall_extra_rules
    assert "8080" not in table  # group frontend (not this host)


def test_reload_keeps_foreign_tables(host):
    """A reload replaces only table inet modelserve: no `flush ruleset` (Docker's tables survive)."""
    host.check_output("nft add table ip foreign_docker_like")
    try:
        host.check_output("systemctl reload modelserve-firewall")
        tables = host.check_output("nft list tables")
        assert "table ip foreign_docker_like" in tables
        assert "table inet modelserve" in tables
    finally:
        host.run("nft delete table ip foreign_docker_like")


def test_firewall_unit_loads_table_at_boot(host):
    unit = host.service("modelserve-firewall")
    assert unit.is_enabled
    assert unit.is_running  # oneshot, RemainAfterExit: "active (exited)"
    assert host.file("/etc/nftables.d/modelserve.nft").exists


@pytest.fixture(scope="module")
def listeners(host):
    """TCP listeners on an allowed, a closed and a localhost-only port."""
    ports = {5672: True, 8080: False, 15672: False}
    for port in ports:
        host.run(f"systemctl stop probe-{port} 2>/dev/null; systemctl reset-failed probe-{port} 2>/dev/null")
        host.check_output(f"systemd-run --unit=probe-{port} python3 -m http.server {port} --bind 0.0.0.0")
    for port in ports:
        host.check_output(
            f"timeout 10 sh -c 'until ss -Hltn sport = :{port} | grep -q .; do sleep 0.2; done'"
        )
    yield ports
    for port in ports:
        host.run(f"systemctl stop probe-{port}")


def test_allowed_port_reachable_closed_ports_dropped(address, listeners):
    result = {port: reachable(address, port) for port in listeners}
    assert result == listeners


def test_localhost_only_port_answers_locally(host, listeners):
    assert host.run("curl -fsS -o /dev/null http://127.0.0.1:15672/").rc == 0


# --- users, time -----------------------------------------------------------------------------------


def test_app_user(host):
    user = host.user("modelserve")
    assert user.exists
    assert user.group == "modelserve"
    assert user.home == "/srv/modelserve"
    assert user.shell == "/usr/sbin/nologin"
    assert user.uid < 1000
    home = host.file("/srv/modelserve")
    assert home.is_directory
    assert home.user == "modelserve"
    assert home.mode == 0o755


def test_admin_users_and_sudoers(host):
    assert host.user("opsadmin").exists
    assert host.user("auditor").exists
    sudoers = host.file("/etc/sudoers.d/modelserve-admins")
    assert sudoers.mode == 0o440
    assert "opsadmin ALL=(ALL:ALL) NOPASSWD: ALL" in sudoers.content_string
    assert "auditor" not in sudoers.content_string


def test_timesyncd_installed_not_started_in_container(host):
    assert host.package("systemd-timesyncd").is_installed
    assert not host.service("systemd-timesyncd").is_running


# --- node exporter ---------------------------------------------------------------------------------


def test_node_exporter_serves_host_metrics_through_the_firewall(host, address):
    # converge.yml opens 9100 to the Docker networks (common_firewall_extra_rules): the controller
    # scrapes it as Prometheus on the cluster network would.
    assert host.service("prometheus-node-exporter").is_enabled
    assert host.service("prometheus-node-exporter").is_running
    assert "--web.listen-address=:9100" in host.file("/etc/default/prometheus-node-exporter").content_string
    with socket.create_connection((address, 9100), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        body = b""
        while chunk := sock.recv(65536):
            body += chunk
    text = body.decode(errors="replace")
    assert text.startswith("HTTP/1.0 200") or text.startswith("HTTP/1.1 200"), text[:200]
    assert "node_filesystem_avail_bytes" in text and "node_load1 " in text
