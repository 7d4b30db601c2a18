"""Types and choices live in each role's meta/argument_specs.yml, not in its preflight: Ansible
validates the role's variables against them before the role's first task, and a wrong type or a
value outside the choices fails there, naming the variable.

The play runs each role on the controller with a tag no task carries, in check mode: only the
validation (tagged always) and the roles' always-tagged fact gathering can run, nothing is installed.
"""

import json
import sys

import pytest
from conftest import INVENTORIES, run_playbook

PLAY = """
- name: Argument validation of {role}
  hosts: localhost
  connection: local
  # Some defaults the specs validate come from facts (iot_edge_litert_enabled, rabbitmq_listen_address).
  gather_facts: true
  gather_subset: [min]
  roles:
    - role: modelserve.cluster.{role}
"""

# (role, variables, what the failure must say): one wrong type and one wrong choice per role.
CASES = [
    ("rabbitmq", {"rabbitmq_amqp_port": "amqp"}, "argument 'rabbitmq_amqp_port' is of type str"),
    (
        "rabbitmq",
        {"rabbitmq_service_state": "running"},
        "value of rabbitmq_service_state must be one of: started, stopped, got: running",
    ),
    ("rabbitmq", {"rabbitmq_heartbeat": "often"}, "argument 'rabbitmq_heartbeat' is of type str"),
    ("common", {"common_ssh_port": "ssh"}, "argument 'common_ssh_port' is of type str"),
    (
        "common",
        {"common_ssh_permit_root_login": "yes"},
        "value of common_ssh_permit_root_login must be one of: no, prohibit-password, forced-commands-only",
    ),
    (
        "common",
        {"common_admin_users": [{"name": "ops", "sudo": "maybe"}]},
        "argument 'sudo' is of type str found in 'common_admin_users'",
    ),
    (
        "common",
        {"common_firewall_extra_rules": [{"port": 80, "proto": "icmp"}]},
        "value of proto must be one of: tcp, udp, vrrp, got: icmp found in common_firewall_extra_rules",
    ),
    (
        "common",
        {"common_firewall_extra_rules": [{"proto": "udp"}]},
        "missing required arguments: port found in",
    ),
    ("docker", {"docker_daemon_options": ["debug"]}, "argument 'docker_daemon_options' is of type list"),
    (
        "docker",
        {"docker_source": "snap"},
        "value of docker_source must be one of: distribution, docker, got: snap",
    ),
    ("docker", {"docker_service_enabled": "sometimes"}, "argument 'docker_service_enabled' is of type str"),
    (
        "iot_edge",
        {"iot_edge_runtime": "docker"},
        "value of iot_edge_runtime must be one of: standalone, azure",
    ),
    ("iot_edge", {"iot_edge_mosquitto_port": "mqtt"}, "argument 'iot_edge_mosquitto_port' is of type str"),
    (
        "iot_edge",
        {"iot_edge_pki_mode": "borrowed"},
        "value of iot_edge_pki_mode must be one of: generate, supplied",
    ),
]


def run_role(role, tmp_path, ansible_bin, ansible_env, **evars):
    evars = {"ansible_python_interpreter": sys.executable, **evars}
    return run_playbook(
        PLAY.format(role=role),
        tmp_path,
        ansible_bin,
        ansible_env,
        "-i",
        "localhost,",
        "--check",
        "--tags",
        "argument-validation-only",
        "-e",
        json.dumps(evars),
    )


@pytest.mark.parametrize(("role", "evars", "message"), CASES, ids=[next(iter(c[1])) for c in CASES])
def test_wrong_type_or_choice_fails_naming_the_variable(
    role, evars, message, tmp_path, ansible_bin, ansible_env
):
    res = run_role(role, tmp_path, ansible_bin, ansible_env, **evars)
    out = " ".join(res.stdout.split())
    assert res.returncode != 0, out
    assert "Validation of arguments failed" in out, out
    assert message in out, out


@pytest.mark.parametrize("role", sorted({c[0] for c in CASES}))
def test_the_defaults_pass_validation(role, tmp_path, ansible_bin, ansible_env):
    # The control for the cases above: without a bad value the same play passes.
    res = run_role(role, tmp_path, ansible_bin, ansible_env)
    assert res.returncode == 0, res.stdout + res.stderr


INVENTORY_PLAY = """
- name: Every role's argument specs against each host's values
  hosts: all
  gather_facts: true
  gather_subset: [min]
  tasks:
    - name: Validate
      ansible.builtin.include_role:
        name: modelserve.cluster.{{ __role }}
      loop: [common, docker, rabbitmq, model_serving, git_deploy, iot_edge]
      loop_control:
        loop_var: __role
      tags: [always]

- name: The OpenStack machines' declaration
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Validate
      ansible.builtin.include_role:
        name: modelserve.cluster.openstack_vm
        tasks_from: declare
      tags: [always]
"""


@pytest.mark.parametrize("env", INVENTORIES)
def test_every_inventory_passes_the_argument_specs(env, tmp_path, ansible_bin, ansible_env):
    # Values wired in group_vars ("{{ modelserve_http_port }}" for an int) pass the specs as templated.
    # Each host is validated on the controller (connection local), as every role: only validation runs.
    res = run_playbook(
        INVENTORY_PLAY,
        tmp_path,
        ansible_bin,
        ansible_env,
        "--check",
        "--tags",
        "argument-validation-only",
        "-e",
        json.dumps({"ansible_connection": "local", "ansible_python_interpreter": sys.executable}),
        inventory=env,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert out.count("Validating arguments against arg spec") >= 7, out
