"""What openstack_vm derives from an inventory, run by Ansible without a cloud: the security groups
(the role's own template, with the inputs playbooks/provision.yml wires in) and the connection
variables of the servers it adds to the in-memory inventory."""

import json
import os
import shlex
from pathlib import Path

import pytest
from conftest import OPENSTACK_INVENTORIES, ROOT, run_playbook
from test_playbooks import role_inputs_set_by_plays, role_vars_set_by_plays

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnly0000000000000000000000 test@modelserve"
TEMPLATE = ROOT / "roles" / "openstack_vm" / "templates" / "security-group-rules.json.j2"

RULES_PLAY = """
- name: The security-group rules of every role group
  hosts: localhost
  connection: local
  gather_facts: false
  roles:
    - role: modelserve.cluster.modelserve_defaults
  vars: {wired}
  tasks:
    - name: Declare the machines
      ansible.builtin.include_role:
        name: modelserve.cluster.openstack_vm
        tasks_from: declare
        public: true

    - name: Show the rules
      ansible.builtin.debug:
        msg: "RULES {{{{ {{'group': __openstack_vm_group,
          'rules': lookup('ansible.builtin.template', '{template}') | from_json}} | to_json }}}}"
      loop: "{{{{ __openstack_vm_used_groups }}}}"
      loop_control:
        loop_var: __openstack_vm_group
"""


def _rules(env, tmp_path, ansible_bin, ansible_env) -> dict[str, list[dict]]:
    # The openstack_vm inputs provision.yml derives from modelserve_* values, as play vars.
    wired = {
        name: role_vars_set_by_plays()[name][1]
        for name, (playbook, wiring) in role_inputs_set_by_plays().items()
        if playbook == "provision.yml" and name.startswith("openstack_vm_") and wiring
    }
    key = tmp_path / "id_test.pub"
    key.write_text(PUBLIC_KEY + "\n")
    play = RULES_PLAY.format(wired=json.dumps(wired), template=TEMPLATE)
    res = run_playbook(
        play, tmp_path, ansible_bin, ansible_env, "-e", f"openstack_vm_public_key_file={key}", inventory=env
    )
    assert res.returncode == 0, res.stdout + res.stderr
    found = {}
    for line in res.stdout.splitlines():
        if '"msg": "RULES ' in line:
            got = json.loads(json.loads(line.split('"msg": ', 1)[1]).removeprefix("RULES "))
            found[got["group"]] = got["rules"]
    return found


def _ssh_from_groups(rules: list[dict]) -> set[str]:
    return {r["remote_group"] for r in rules if r.get("port_range_min") == 22 and "remote_group" in r}


@pytest.mark.parametrize("env", OPENSTACK_INVENTORIES)
def test_workers_admit_ssh_from_workers_only_where_needed(env, tmp_path, ansible_bin, ansible_env):
    # git_deploy's post-receive hook fans a push out by SSH from the repository worker to the other
    # workers: the workers' group must admit SSH from itself, and no other group from the workers.
    rules = _rules(env, tmp_path, ansible_bin, ansible_env)
    assert set(rules) == {"broker", "frontend", "workers", "development", "monitoring"}, rules
    prefix = f"modelserve-{env}-"
    workers = _ssh_from_groups(rules["workers"])
    assert workers == {prefix + "development", prefix + "workers"}, rules["workers"]
    for group in ("broker", "frontend", "monitoring"):
        assert _ssh_from_groups(rules[group]) == {prefix + "development"}, rules[group]
    assert _ssh_from_groups(rules["development"]) == set(), rules["development"]
    for group, group_rules in rules.items():
        ssh = [r for r in group_rules if r.get("port_range_min") == 22]
        assert all(r["protocol"] == "tcp" and r["port_range_max"] == 22 for r in ssh), group


ADD_HOSTS_PLAY = """
- name: Add two servers the way the role does once they exist
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Add them
      ansible.builtin.include_role:
        name: modelserve.cluster.openstack_vm
        tasks_from: inventory
      vars:
        openstack_vm_wait_for_ssh: false
        openstack_vm_ssh_jump_host: jump-1
        __openstack_vm_servers:
          - {name: jump-1, admin_user: debian, inventory_groups: [development]}
          - {name: worker-1, admin_user: debian, inventory_groups: [workers]}
        __openstack_vm_addresses:
          jump-1: {floating: 203.0.113.10, fixed: 10.0.0.10, id: a}
          worker-1: {floating: "", fixed: 10.0.0.11, id: b}

    - name: Show the SSH arguments
      ansible.builtin.debug:
        msg: "ARGS {{ hostvars['worker-1'].ansible_ssh_common_args }}"
"""


def _proxy_command(tmp_path, ansible_bin, ansible_env, jump_vars: dict, env: dict) -> list[str]:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(json.dumps({"all": {"hosts": {"jump-1": jump_vars, "worker-1": {}}}}))
    run_env = {k: v for k, v in ansible_env.items() if k != "ANSIBLE_PRIVATE_KEY_FILE"} | env
    res = run_playbook(ADD_HOSTS_PLAY, tmp_path, ansible_bin, run_env, "-i", str(inventory))
    assert res.returncode == 0, res.stdout + res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if '"msg": "ARGS ' in ln]
    args = shlex.split(json.loads(line.split('"msg": ', 1)[1]).removeprefix("ARGS "))
    (proxy,) = [a.removeprefix("ProxyCommand=") for a in args if a.startswith("ProxyCommand=")]
    # ssh runs the ProxyCommand with the user's shell: split it as a shell does.
    return shlex.split(proxy)


@pytest.mark.parametrize(
    ("jump_vars", "env", "key"),
    [
        ({"ansible_ssh_private_key_file": "~/keys/my key"}, {}, "~/keys/my key"),
        ({"ansible_private_key_file": "/k/id_test"}, {"ANSIBLE_PRIVATE_KEY_FILE": "/k/other"}, "/k/id_test"),
        ({}, {"ANSIBLE_PRIVATE_KEY_FILE": "/k/from env"}, "/k/from env"),
        ({}, {}, None),
    ],
)
def test_the_jump_gets_ansibles_private_key(jump_vars, env, key, tmp_path, ansible_bin, ansible_env):
    # The ProxyCommand's own ssh does not get Ansible's key: a key that is not one of ssh's defaults
    # must be passed to it, or the jump to the hosts without a floating IP fails.
    proxy = _proxy_command(tmp_path, ansible_bin, ansible_env, jump_vars, env)
    assert proxy[0] == "ssh" and proxy[-3:] == ["-W", "%h:%p", "debian@203.0.113.10"], proxy
    if key is None:
        assert "-i" not in proxy, proxy
    else:
        assert proxy[1:3] == ["-i", os.path.expanduser(key)], proxy
        assert Path(proxy[2]).is_absolute()
