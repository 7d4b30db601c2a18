"""After converge: the cloud holds exactly what the inventory declares (checked through
openstacksdk, as the project's member and as admin), and the in-memory inventory pointed at it."""

import base64
import json
import os
import subprocess
from pathlib import Path

import openstack
import pytest
import yaml

EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
SCENARIO = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
# The directory: its group_vars/ hold the scenario's inventory variables.
INVENTORY = str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)
PREFIX = "modelserve-molecule"
EXPECTED = {
    # host: (role groups, flavor, floating IP)
    "mol-broker-1": (["broker"], "m1.tiny", False),
    "mol-frontend-1": (["frontend"], "m1.tiny", True),
    "mol-worker-1": (["workers"], "m1.small", False),
    "mol-dev-1": (["development"], "m1.tiny", True),
}
ADMIN_CIDRS = [("IPv4", "192.0.2.0/24"), ("IPv6", "2001:db8::/32")]
NETWORK = "modelserve-test"


@pytest.fixture(scope="module")
def conn():
    return openstack.connect(cloud="local-openstack")


@pytest.fixture(scope="module")
def admin():
    return openstack.connect(cloud="local-openstack-admin")


@pytest.fixture(scope="module")
def servers(conn):
    return {s.name: s for s in conn.compute.servers(details=True)}


def _ansible_playbook(*args):
    exe = Path(os.environ.get("VIRTUAL_ENV", PROJECT / ".venv")) / "bin" / "ansible-playbook"
    if not exe.exists():
        exe = PROJECT / ".venv" / "bin" / "ansible-playbook"
    return subprocess.run([exe, "-i", INVENTORY, *args], capture_output=True, text=True, cwd=PROJECT)


def test_exactly_the_declared_servers_are_active(servers, conn):
    assert set(servers) == set(EXPECTED)
    image = conn.image.find_image("debian-12-fake")
    for name, (groups, flavor, _) in EXPECTED.items():
        server = servers[name]
        assert server.status == "ACTIVE", name
        assert server.flavor.name == flavor, name
        assert server.image.id == image.id, name
        assert server.key_name == PREFIX, name
        assert sorted(sg["name"] for sg in server.security_groups) == [f"{PREFIX}-{g}" for g in groups]
        assert server.metadata["modelserve_groups"] == ",".join(groups)
        assert server.metadata["modelserve_environment"] == "molecule"
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
    expected = {
        "broker": admin_ssh | from_dev | {("ingress", "IPv4", "tcp", 5672, 5672, "10.99.0.0/24")} | EGRESS,
        "frontend": admin_ssh
        | from_dev
        | {
            ("ingress", "IPv4", "tcp", 8080, 8080, "0.0.0.0/0"),
            ("ingress", "IPv6", "tcp", 8080, 8080, "::/0"),
        }
        | EGRESS,
        # git_deploy's fan-out: the workers SSH to each other (modelserve_ssh_within_groups).
        "workers": admin_ssh | from_dev | {_ssh("IPv4", f"group:{PREFIX}-workers")} | EGRESS,
        "development": admin_ssh | EGRESS,
    }
    groups = {sg.name: sg for sg in conn.network.security_groups()}
    assert set(groups) == {"default"} | {f"{PREFIX}-{g}" for g in expected}
    for group, rules in expected.items():
        assert _rules(conn, groups[f"{PREFIX}-{group}"]) == rules, group


def test_floating_ips_are_bound_to_the_servers_ports(conn, servers):
    fips = list(conn.network.ips())
    wanted = [n for n, (_, _, fip) in EXPECTED.items() if fip]
    assert len(fips) == len(wanted)
    by_port = {f.port_id: f for f in fips}
    for name in wanted:
        (port,) = conn.network.ports(device_id=servers[name].id)
        fip = by_port[port.id]
        assert fip.status == "ACTIVE"
        assert fip.fixed_ip_address == port.fixed_ips[0]["ip_address"]
        floating = [a["addr"] for a in servers[name].addresses[NETWORK] if a["OS-EXT-IPS:type"] == "floating"]
        assert floating == [fip.floating_ip_address]
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


def test_in_memory_inventory_pointed_at_the_servers(servers):
    added = json.loads((EPHEMERAL / "added_hosts.json").read_text())
    assert set(added) == set(EXPECTED)
    jump = next(
        a["addr"] for a in servers["mol-dev-1"].addresses[NETWORK] if a["OS-EXT-IPS:type"] == "floating"
    )
    for name, (groups, _, has_fip) in EXPECTED.items():
        addrs = {a["OS-EXT-IPS:type"]: a["addr"] for a in servers[name].addresses[NETWORK]}
        host = added[name]
        assert host["modelserve_cluster_address"] == addrs["fixed"]
        assert host["ansible_host"] == (addrs["floating"] if has_fip else addrs["fixed"])
        assert host["openstack_vm_server_id"] == servers[name].id
        assert set(groups) <= set(host["group_names"])
        if has_fip:
            assert "ProxyCommand" not in host["ansible_ssh_common_args"]
        else:
            assert f"debian@{jump}" in host["ansible_ssh_common_args"]


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


def test_shipped_dynamic_inventory_finds_the_servers(servers, tmp_path):
    # inventories/dev/openstack.yml, pointed at this cloud and this scenario's server tag.
    config = yaml.safe_load((PROJECT / "inventories" / "dev" / "openstack.yml").read_text())
    config["only_clouds"] = ["local-openstack"]
    config["server_filters"]["tags"] = PREFIX
    source = tmp_path / "openstack.yml"
    source.write_text(yaml.safe_dump(config))
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
    for name, (groups, _, has_fip) in EXPECTED.items():
        addrs = {a["OS-EXT-IPS:type"]: a["addr"] for a in servers[name].addresses[NETWORK]}
        assert hostvars[name]["ansible_host"] == (addrs["floating"] if has_fip else addrs["fixed"])
        assert hostvars[name]["modelserve_cluster_address"] == addrs["fixed"]
        for group in groups:
            assert name in inv[group]["hosts"], (name, group)
    assert set(inv["serving"]["hosts"]) == {"mol-broker-1", "mol-frontend-1", "mol-worker-1"}
