"""cloud-init user-data of every OpenStack machine, rendered by Ansible from the role's template
(the role's `userdata` entry point, the same task list the servers are created with) and checked
with cloud-init's own schema validator; plus the role's cloud-free preflight errors."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import OPENSTACK_INVENTORIES, ROOT, run_playbook

ENVS = OPENSTACK_INVENTORIES
ROLE_GROUPS = ["broker", "frontend", "workers", "development", "monitoring"]
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnly0000000000000000000000 test@modelserve"

RENDER_PLAY = """
- name: Render the user-data of every machine
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Render
      ansible.builtin.include_role:
        name: modelserve.cluster.openstack_vm
        tasks_from: userdata
"""

PREFLIGHT_PLAY = """
- name: Preflight only
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Preflight
      ansible.builtin.include_role:
        name: modelserve.cluster.openstack_vm
        tasks_from: "{{ __tasks_from }}"
      loop: [declare, preflight]
      loop_control:
        loop_var: __tasks_from
"""


def _cloud_init() -> str:
    exe = shutil.which("cloud-init") or "/usr/bin/cloud-init"
    if not Path(exe).exists():
        pytest.skip("cloud-init is not installed (apt-get install cloud-init)")
    return exe


@pytest.fixture(scope="module")
def public_key(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("key") / "id_test.pub"
    path.write_text(PUBLIC_KEY + "\n")
    return path


def _inventory_hosts(env: str, ansible_bin, ansible_env) -> set[str]:
    out = subprocess.run(
        [ansible_bin / "ansible-inventory", "-i", ROOT / "inventories" / env / "hosts.yml", "--list"],
        cwd=ROOT,
        env=ansible_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    inv = yaml.safe_load(out)
    return {h for g in ROLE_GROUPS for h in inv.get(g, {}).get("hosts", [])}


def _render(env, tmp_path, ansible_bin, ansible_env, public_key, *extra) -> Path:
    outdir = tmp_path / "user-data"
    res = run_playbook(
        RENDER_PLAY,
        tmp_path,
        ansible_bin,
        ansible_env,
        "-e",
        f"openstack_vm_userdata_dir={outdir}",
        "-e",
        f"openstack_vm_public_key_file={public_key}",
        *extra,
        inventory=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return outdir


@pytest.mark.parametrize("env", ENVS)
def test_user_data_of_every_machine_passes_cloud_init_schema(
    env, tmp_path, ansible_bin, ansible_env, public_key
):
    cloud_init = _cloud_init()
    outdir = _render(env, tmp_path, ansible_bin, ansible_env, public_key)
    hosts = _inventory_hosts(env, ansible_bin, ansible_env)
    assert hosts, f"inventories/{env} has no host in {ROLE_GROUPS}"
    assert {p.stem for p in outdir.glob("*.yaml")} == hosts
    for host in sorted(hosts):
        path = outdir / f"{host}.yaml"
        text = path.read_text()
        assert text.startswith("#cloud-config\n"), f"{host}: not a cloud-config"
        res = subprocess.run([cloud_init, "schema", "--config-file", path], capture_output=True, text=True)
        assert res.returncode == 0, f"{host}: {res.stdout}{res.stderr}\n{text}"
        assert "Valid cloud-config" in res.stdout + res.stderr, res.stdout + res.stderr
        data = yaml.safe_load(text)
        assert data["hostname"] == host
        (user,) = data["users"]
        assert user["name"] == "debian"
        assert user["ssh_authorized_keys"] == [PUBLIC_KEY]
        assert user["lock_passwd"] is True
        assert data["ssh_pwauth"] is False
        assert data["disable_root"] is True
        assert "python3" in data["packages"]
        # No `apt upgrade` at first boot unless asked.
        assert data["package_upgrade"] is False


def test_package_upgrade_and_extra_config_only_when_asked(tmp_path, ansible_bin, ansible_env, public_key):
    cloud_init = _cloud_init()
    outdir = _render(
        "dev",
        tmp_path,
        ansible_bin,
        ansible_env,
        public_key,
        "-e",
        '{"openstack_vm_package_upgrade": true, "openstack_vm_packages": ["python3", "htop"],'
        ' "openstack_vm_cloud_config_extra": {"ntp": {"enabled": true}}}',
    )
    path = outdir / "dev-frontend-1.yaml"
    res = subprocess.run([cloud_init, "schema", "--config-file", path], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    data = yaml.safe_load(path.read_text())
    assert data["package_upgrade"] is True
    assert data["packages"] == ["python3", "htop"]
    assert data["ntp"] == {"enabled": True}


def test_schema_check_catches_a_broken_config(tmp_path):
    # The validator really validates: a wrong type is refused.
    cloud_init = _cloud_init()
    bad = tmp_path / "bad.yaml"
    bad.write_text("#cloud-config\npackage_upgrade: sometimes\nusers: 5\n")
    res = subprocess.run([cloud_init, "schema", "--config-file", bad], capture_output=True, text=True)
    assert res.returncode != 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"openstack_vm_admin_cidrs": ["10.0.0.300/24"]}, "'10.0.0.300/24'"),
        ({"openstack_vm_admin_cidrs": ["10.0.0.1/16"]}, "address bits beyond the prefix must be zero"),
        ({"openstack_vm_admin_cidrs": ["not-a-network"]}, "is not a network in CIDR notation"),
        ({"openstack_vm_admin_cidrs": []}, "openstack_vm_admin_cidrs must be a non-empty list"),
        ({"openstack_vm_cloud": "no-such-cloud"}, "'no-such-cloud' is not an entry of clouds.yaml"),
        ({"openstack_vm_public_key_file": "/nonexistent/key.pub"}, "openstack_vm_public_key_file must name"),
        # The argument specs (entry points declare and preflight) check the types and choices.
        (
            {"openstack_vm_state": "gone"},
            "value of openstack_vm_state must be one of: present, absent, got: gone",
        ),
        ({"openstack_vm_volume_size": "big"}, "argument 'openstack_vm_volume_size' is of type str"),
    ],
)
def test_preflight_refuses_bad_input_with_a_clear_message(
    extra, message, tmp_path, ansible_bin, ansible_env, public_key
):
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text("clouds: {}\n")
    args = {"openstack_vm_public_key_file": str(public_key), **extra}
    res = run_playbook(
        PREFLIGHT_PLAY,
        tmp_path,
        ansible_bin,
        ansible_env,
        "-e",
        json.dumps(args),
        inventory="dev",
        env={"OS_CLIENT_CONFIG_FILE": str(clouds)},
    )
    assert res.returncode != 0
    assert message in res.stdout, res.stdout[-3000:]
