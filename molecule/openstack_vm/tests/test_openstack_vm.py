"""After site.yml on the local OpenStack (inventories/openstack-local, prod's shape): the cloud holds
exactly what the inventory declares, the servers are real hosts booted by cloud-init, their security
groups hold on the wire, predictions come through the front end's floating IP, and a release pushed
from the development VM is served by every worker, then rolled back.

The tests run in file order; the later ones build on the earlier ones' state.
"""

import base64
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import openstack
import pytest
import requests

EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
SCENARIO = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
# The directory: its group_vars/ are inventories/openstack-local's.
INVENTORY = str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)
PREFIX = "modelserve-openstack-local"
EXPECTED = {
    # host: (role groups, floating IP)
    "osl-broker-1": (["broker"], False),
    "osl-frontend-1": (["frontend"], True),
    "osl-frontend-2": (["frontend"], True),
    "osl-worker-1": (["workers"], False),
    "osl-worker-2": (["workers"], False),
    # The development VM is also the monitoring host here (the local cloud has room for no more VMs).
    "osl-dev-1": (["development", "monitoring"], True),
}
WORKERS = ["osl-worker-1", "osl-worker-2"]
ADMIN_CIDRS = [("IPv4", "10.231.0.1/32")]
NETWORK = "modelserve-test"
ROW = [6, 148, 72, 35, 0, 33.6, 0.627, 50]
WORKDIR = "/home/mlops/models"


@pytest.fixture(scope="module")
def conn():
    return openstack.connect(cloud="local-openstack")


@pytest.fixture(scope="module")
def admin():
    return openstack.connect(cloud="local-openstack-admin")


@pytest.fixture(scope="module")
def servers(conn):
    return {s.name: s for s in conn.compute.servers(details=True)}


@pytest.fixture(scope="module")
def added():
    return json.loads((EPHEMERAL / "added_hosts.json").read_text())


def fixed_ip(server):
    return next(a["addr"] for a in server.addresses[NETWORK] if a["OS-EXT-IPS:type"] == "fixed")


def floating_ip(server):
    return next(a["addr"] for a in server.addresses[NETWORK] if a["OS-EXT-IPS:type"] == "floating")


def ssh(added, name, command, timeout=300):
    """Run a command on a server as Ansible reaches it (through the jump host where it has no FIP)."""
    host = added[name]
    argv = [
        "ssh",
        "-i",
        os.environ["ANSIBLE_PRIVATE_KEY_FILE"],
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        *shlex.split(host["ansible_ssh_common_args"]),
        f"{host['ansible_user']}@{host['ansible_host']}",
        command,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def tcp_open(added, src, dst_ip, port, as_root=False):
    """Whether a TCP connection from server `src` to dst_ip:port is accepted within 3 s."""
    probe = f"python3 -c 'import socket; socket.create_connection((\"{dst_ip}\", {port}), timeout=3)'"
    res = ssh(added, src, f"sudo {probe}" if as_root else probe)
    return res.returncode == 0


def _ansible_playbook(*args):
    exe = PROJECT / ".venv" / "bin" / "ansible-playbook"
    return subprocess.run([exe, "-i", INVENTORY, *args], capture_output=True, text=True, cwd=PROJECT)


# --- the cloud holds what the inventory declares ------------------------------------------------
def test_exactly_the_declared_servers_are_active(servers, conn):
    assert set(servers) == set(EXPECTED)
    image = conn.image.find_image("debian-12-cloud")
    for name, (groups, _) in EXPECTED.items():
        server = servers[name]
        assert server.status == "ACTIVE", name
        assert server.flavor.name == "m1.small", name
        assert server.image.id == image.id, name
        assert server.key_name == PREFIX, name
        assert sorted(sg["name"] for sg in server.security_groups) == [f"{PREFIX}-{g}" for g in groups]
        assert server.metadata["modelserve_groups"] == ",".join(groups)
        assert server.metadata["modelserve_environment"] == "openstack-local"
        assert server.tags == [PREFIX], name


def test_keypair_is_the_users_public_key(conn):
    key = conn.compute.get_keypair(PREFIX)
    mine = (EPHEMERAL / "id_ed25519.pub").read_text().split()[:2]
    assert key.public_key.split()[:2] == mine


def _rules(conn, sg):
    out = set()
    for r in conn.network.security_group_rules(security_group_id=sg.id):
        remote = r.remote_ip_prefix
        if r.remote_group_id:
            remote = "group:" + conn.network.get_security_group(r.remote_group_id).name
        out.add((r.direction, r.ether_type, r.protocol, r.port_range_min, r.port_range_max, remote))
    return out


def _ssh(ethertype, remote):
    return ("ingress", ethertype, "tcp", 22, 22, remote)


EGRESS = {("egress", "IPv4", None, None, None, None), ("egress", "IPv6", None, None, None, None)}


def test_security_groups_hold_exactly_the_intended_rules(conn):
    admin_ssh = {_ssh(e, c) for e, c in ADMIN_CIDRS}
    from_dev = {_ssh("IPv4", f"group:{PREFIX}-development")}
    cluster = "10.99.0.0/24"

    def scraped(*ports):
        # What the monitoring hosts scrape or reach: from the cluster network only (node exporter on all).
        return {("ingress", "IPv4", "tcp", p, p, cluster) for p in (*ports, 9100)}

    expected = {
        "broker": admin_ssh
        | from_dev
        | {("ingress", "IPv4", "tcp", 5671, 5671, "10.99.0.0/24")}
        | scraped(15692)
        | EGRESS,
        "frontend": admin_ssh
        | from_dev
        | {
            # gunicorn from the cluster network (the front ends' proxies); HTTPS and the redirect
            # from anywhere.
            ("ingress", "IPv4", "tcp", 8080, 8080, "10.99.0.0/24"),
            ("ingress", "IPv4", "tcp", 443, 443, "0.0.0.0/0"),
            ("ingress", "IPv6", "tcp", 443, 443, "::/0"),
            ("ingress", "IPv4", "tcp", 80, 80, "0.0.0.0/0"),
            ("ingress", "IPv6", "tcp", 80, 80, "::/0"),
        }
        | scraped(9800)
        | EGRESS,
        # git_deploy's fan-out: the repository worker reaches the other workers; the workers'
        # metrics (modelserve_worker_metrics_port) from the cluster network only.
        "workers": admin_ssh | from_dev | {_ssh("IPv4", f"group:{PREFIX}-workers")} | scraped(9810) | EGRESS,
        "development": admin_ssh | scraped() | EGRESS,
        # Prometheus and Alertmanager (operators: an SSH tunnel through the development VM).
        "monitoring": admin_ssh | from_dev | scraped(9090, 9093) | EGRESS,
    }
    groups = {sg.name: sg for sg in conn.network.security_groups()}
    assert set(groups) == {"default"} | {f"{PREFIX}-{g}" for g in expected}
    for group, rules in expected.items():
        assert _rules(conn, groups[f"{PREFIX}-{group}"]) == rules, group


def test_floating_ips_only_for_frontend_and_development(conn, servers):
    fips = list(conn.network.ips())
    wanted = [n for n, (_, fip) in EXPECTED.items() if fip]
    assert len(fips) == len(wanted)
    by_port = {f.port_id: f for f in fips}
    for name in wanted:
        (port,) = conn.network.ports(device_id=servers[name].id)
        fip = by_port[port.id]
        assert fip.status == "ACTIVE"
        assert fip.fixed_ip_address == port.fixed_ips[0]["ip_address"]
        assert floating_ip(servers[name]) == fip.floating_ip_address
    for name in set(EXPECTED) - set(wanted):
        assert all(a["OS-EXT-IPS:type"] == "fixed" for a in servers[name].addresses[NETWORK])


def test_user_data_is_the_rendered_template(admin, servers, tmp_path):
    res = _ansible_playbook(
        str(SCENARIO / "render_userdata.yml"), "-e", f"openstack_vm_userdata_dir={tmp_path}"
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for name, server in servers.items():
        stored = admin.compute.get_server(server.id).user_data
        assert stored, name
        assert base64.b64decode(stored).decode() == (tmp_path / f"{name}.yaml").read_text(), name


def test_in_memory_inventory_reaches_hosts_without_fip_through_the_development_vm(servers, added):
    assert set(added) == set(EXPECTED)
    jump = floating_ip(servers["osl-dev-1"])
    for name, (groups, has_fip) in EXPECTED.items():
        host = added[name]
        assert host["modelserve_cluster_address"] == fixed_ip(servers[name])
        assert host["ansible_host"] == (floating_ip(servers[name]) if has_fip else fixed_ip(servers[name]))
        assert host["openstack_vm_server_id"] == servers[name].id
        assert set(groups) <= set(host["group_names"])
        if has_fip:
            assert "ProxyCommand" not in host["ansible_ssh_common_args"]
        else:
            assert f"debian@{jump}" in host["ansible_ssh_common_args"]


def test_shipped_dynamic_inventory_finds_the_servers(servers):
    source = PROJECT / "inventories" / "openstack-local" / "openstack.yml"
    exe = PROJECT / ".venv" / "bin" / "ansible-inventory"
    res = subprocess.run(
        [exe, "-i", source, "--list"], capture_output=True, text=True, cwd=PROJECT, check=True
    )
    inv = json.loads(res.stdout)
    # ansible-inventory's JSON marks templated (unsafe) values as {"__ansible_unsafe": value}.
    hostvars = {
        host: {
            k: v["__ansible_unsafe"] if isinstance(v, dict) and "__ansible_unsafe" in v else v
            for k, v in hv.items()
        }
        for host, hv in inv["_meta"]["hostvars"].items()
    }
    assert set(hostvars) == set(EXPECTED)
    for name, (groups, has_fip) in EXPECTED.items():
        want = floating_ip(servers[name]) if has_fip else fixed_ip(servers[name])
        assert hostvars[name]["ansible_host"] == want
        assert hostvars[name]["modelserve_cluster_address"] == fixed_ip(servers[name])
        for group in groups:
            assert name in inv[group]["hosts"], (name, group)
    assert set(inv["serving"]["hosts"]) == {"osl-broker-1", "osl-frontend-1", "osl-frontend-2", *WORKERS}


# --- the servers are hosts that booted as a cloud's do ------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_server_booted_by_cloud_init_from_nova_metadata(added, admin, conn, servers, name):
    # The seed the guest read is nova's: the user-data byte for byte, the keypair's key.
    seed = ssh(added, name, "cat /var/lib/cloud/seed/nocloud/user-data")
    stored = admin.compute.get_server(servers[name].id).user_data
    assert seed.returncode == 0 and seed.stdout == base64.b64decode(stored).decode(), name
    meta = ssh(added, name, "cat /var/lib/cloud/seed/nocloud/meta-data").stdout
    assert conn.compute.get_keypair(PREFIX).public_key.strip() in meta
    res = ssh(added, name, "hostname; cloud-init status; cat /run/cloud-init/instance-data.json")
    assert res.returncode == 0, res.stderr
    hostname, status, data = res.stdout.split("\n", 2)
    assert hostname == name
    assert status == "status: done"
    meta = json.loads(data)
    assert meta["v1"]["instance_id"] == servers[name].id
    assert meta["v1"]["platform"] == "nocloud"
    # The admin user and its key came from the user-data, through cloud-init.
    users = ssh(added, name, "getent passwd debian; sudo -n true && echo sudo-ok")
    assert "modelserve admin (Ansible)" in users.stdout and "sudo-ok" in users.stdout


def _api_key():
    # Made on the controller by molecule/openstack_vm/api_keys.yml (extra vars, as a Vault's).
    return (EPHEMERAL / "api-key").read_text().split()[0]


def _predict_through_the_front_ends_floating_ip(servers):
    # HTTPS through the front door with a key; the certificate names the hosts' fixed addresses, not
    # the floating IPs (a real service names its DNS name in modelserve_tls_server_names).
    for name in ("osl-frontend-1", "osl-frontend-2"):
        url = f"https://{floating_ip(servers[name])}/api/v1/predict"
        r = requests.post(
            url, json={"rows": [ROW, ROW]}, headers={"X-API-Key": _api_key()}, timeout=30, verify=False
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 2
        no_key = requests.post(url, json={"rows": [ROW]}, timeout=30, verify=False)
        assert no_key.status_code == 401, no_key.text


def test_prediction_through_the_front_ends_floating_ip(servers):
    _predict_through_the_front_ends_floating_ip(servers)


# --- security groups on the wire ----------------------------------------------------------------
def test_security_groups_admit_exactly_what_they_say(added, servers):
    worker1, broker = fixed_ip(servers["osl-worker-1"]), fixed_ip(servers["osl-broker-1"])
    assert tcp_open(added, "osl-dev-1", worker1, 22)  # from the development group
    assert tcp_open(added, "osl-worker-2", worker1, 22)  # the fan-out, worker to worker
    assert tcp_open(added, "osl-worker-1", broker, 5671)  # AMQP over TLS from the cluster network
    assert not tcp_open(added, "osl-frontend-1", worker1, 22)  # not from the front end
    assert not tcp_open(added, "osl-worker-1", broker, 22)  # workers may not SSH elsewhere
    assert not tcp_open(added, "osl-frontend-1", broker, 25672)  # nothing else is open


def test_root_in_a_guest_can_neither_see_nor_lift_the_security_groups(added, servers):
    worker1 = fixed_ip(servers["osl-worker-1"])
    # The guest's own firewall (common) gone on both ends: the cloud's rules still hold.
    for name in ("osl-frontend-1", "osl-worker-1"):
        res = ssh(
            added, name, "sudo nft flush ruleset && sudo iptables-save 2>/dev/null; sudo nft list ruleset"
        )
        assert res.returncode == 0, res.stderr
        assert "msos" not in res.stdout and "physdev" not in res.stdout
    try:
        assert not tcp_open(added, "osl-frontend-1", worker1, 22, as_root=True)
    finally:
        for name in ("osl-frontend-1", "osl-worker-1"):
            assert ssh(added, name, "sudo systemctl restart modelserve-firewall").returncode == 0


def _wait_for(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(1)
    return check()


def test_rule_and_membership_changes_reach_the_wire(conn, added, servers):
    worker1 = fixed_ip(servers["osl-worker-1"])
    workers = conn.network.find_security_group(f"{PREFIX}-workers")
    frontend = conn.network.find_security_group(f"{PREFIX}-frontend")
    rule = conn.network.create_security_group_rule(
        security_group_id=workers.id,
        direction="ingress",
        ethertype="IPv4",
        protocol="tcp",
        port_range_min=22,
        port_range_max=22,
        remote_group_id=frontend.id,
    )
    try:
        assert _wait_for(lambda: tcp_open(added, "osl-frontend-1", worker1, 22)), "new rule not applied"
    finally:
        conn.network.delete_security_group_rule(rule)
    assert _wait_for(lambda: not tcp_open(added, "osl-frontend-1", worker1, 22)), "deleted rule still applied"
    # Membership: the front end's port joins the workers' group, so the worker-to-worker rule admits it.
    (port,) = conn.network.ports(device_id=servers["osl-frontend-1"].id)
    conn.network.update_port(port, security_groups=[frontend.id, workers.id])
    try:
        assert _wait_for(lambda: tcp_open(added, "osl-frontend-1", worker1, 22)), "membership not applied"
    finally:
        conn.network.update_port(port, security_groups=[frontend.id])
    assert _wait_for(lambda: not tcp_open(added, "osl-frontend-1", worker1, 22)), "old membership applied"


def _container_running(server_id):
    res = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Running}}", f"nova-{server_id}"], capture_output=True, text=True
    )
    return res.stdout.strip() == "true"


def test_a_stopped_worker_is_down_and_comes_back_on_start(conn, added, servers):
    server = servers["osl-worker-2"]
    conn.compute.stop_server(server)
    conn.compute.wait_for_server(conn.compute.get_server(server.id), status="SHUTOFF", wait=120)
    assert not _container_running(server.id)
    assert not tcp_open(added, "osl-dev-1", fixed_ip(server), 22)
    conn.compute.start_server(server)
    conn.compute.wait_for_server(conn.compute.get_server(server.id), status="ACTIVE", wait=120)
    assert _container_running(server.id)
    assert _wait_for(lambda: tcp_open(added, "osl-dev-1", fixed_ip(server), 22), timeout=60)


def test_a_rebooted_worker_comes_back_on_its_port_and_serves(conn, added, servers):
    server = servers["osl-worker-2"]
    conn.compute.reboot_server(server, "SOFT")
    conn.compute.wait_for_server(conn.compute.get_server(server.id), status="ACTIVE", wait=120)
    assert _wait_for(
        lambda: (
            ssh(added, "osl-worker-2", "systemctl is-system-running --wait", timeout=60).stdout.strip()
            in ("running", "degraded")
        ),
        timeout=120,
    )
    assert ssh(added, "osl-worker-2", "cat /proc/1/stat").returncode == 0
    assert not tcp_open(added, "osl-frontend-1", fixed_ip(server), 22)  # its filter is back too
    _predict_through_the_front_ends_floating_ip(servers)


# --- model delivery from the development VM -----------------------------------------------------
def _served(servers):
    url = f"https://{floating_ip(servers['osl-frontend-1'])}/api/v1/model"
    return requests.get(url, timeout=10, verify=False).json()["version"]


def _current(added, name):
    return ssh(added, name, "readlink /srv/modelserve/current").stdout.strip()


def dev(added, cmd):
    """A shell command as the data scientist in the training project on the development VM."""
    return ssh(added, "osl-dev-1", f"sudo su - mlops -c {shlex.quote(f'cd {WORKDIR} && {cmd}')}", timeout=900)


def test_release_pushed_from_the_development_vm_is_served_by_every_worker(added, servers):
    assert _served(servers) == "1.0.0"
    out = dev(added, "sed -i 's/^MODEL_VERSION=.*/MODEL_VERSION=1.1.0/' params.env && ./train.sh")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    out = dev(added, "git add -A && git commit -q -m 'Model 1.1.0' && git push production HEAD:main 2>&1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert _wait_for(lambda: _served(servers) == "1.1.0", timeout=30)
    for name in WORKERS:
        assert _current(added, name).endswith("releases/1.1.0"), name


def test_rollback_returns_every_worker_to_the_previous_release(added, servers):
    out = ssh(added, "osl-worker-1", "sudo /usr/local/sbin/modelserve-rollback")
    assert out.returncode == 0, out.stdout + out.stderr
    assert _wait_for(lambda: _served(servers) == "1.0.0", timeout=30)
    for name in WORKERS:
        assert _current(added, name).endswith("releases/1.0.0"), name


# --- bad input is refused before anything changes -----------------------------------------------
@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("openstack_vm_image", "no-such-image", "openstack_vm_image 'no-such-image' matches 0 images"),
        ("openstack_vm_flavor", "m9.huge", "openstack_vm_flavor 'm9.huge' is not a flavor"),
        ("openstack_vm_network", "no-such-net", "network 'no-such-net' (openstack_vm_network"),
    ],
)
def test_preflight_names_unknown_cloud_resources(var, value, message):
    res = _ansible_playbook(str(PROJECT / "playbooks" / "provision.yml"), "-e", f"{var}={value}")
    out = " ".join((res.stdout + res.stderr).split())
    assert res.returncode != 0
    assert message in out, out[-3000:]
    # It stopped before changing anything.
    assert "changed=0" in out
