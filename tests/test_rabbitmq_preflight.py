"""Preflight of the rabbitmq role's cluster settings: an even node count is refused with the reason.

Runs the role's preflight on the controller (connection local, facts gathered); nothing is installed.
"""

import json
import sys

import pytest
from conftest import run_playbook

PLAY = """
- name: rabbitmq preflight only
  hosts: localhost
  connection: local
  gather_facts: true
  gather_subset: [network]
  tasks:
    - name: Preflight
      ansible.builtin.include_role:
        name: modelserve.cluster.rabbitmq
        tasks_from: preflight
"""


def preflight(tmp_path, ansible_bin, ansible_env, **extra):
    evars = {"ansible_python_interpreter": sys.executable, "rabbitmq_listen_address": "127.0.0.1"}
    evars.update(extra)
    return run_playbook(PLAY, tmp_path, ansible_bin, ansible_env, "-i", "localhost,", "-e", json.dumps(evars))


@pytest.mark.parametrize(
    "hosts", [["localhost"], ["localhost", "b2", "b3"], ["localhost", "b2", "b3", "b4", "b5"]]
)
def test_one_or_an_odd_number_of_nodes_passes(tmp_path, ansible_bin, ansible_env, hosts):
    res = preflight(tmp_path, ansible_bin, ansible_env, rabbitmq_cluster_hosts=hosts)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("count", [2, 4])
def test_an_even_number_of_nodes_is_refused_with_the_reason(tmp_path, ansible_bin, ansible_env, count):
    hosts = ["localhost", *(f"b{i}" for i in range(2, count + 1))]
    res = preflight(tmp_path, ansible_bin, ansible_env, rabbitmq_cluster_hosts=hosts)
    assert res.returncode != 0
    assert f"rabbitmq_cluster_hosts has {count} nodes: use an odd number" in res.stdout
    assert "majority" in res.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"rabbitmq_cluster_hosts": ["b1", "b2", "b3"]}, "must list this host"),
        ({"rabbitmq_cluster_hosts": ["localhost", "b2", "b2"]}, "no host twice"),
        ({"rabbitmq_max_message_size": 0}, "rabbitmq_max_message_size must be"),
        # Least privilege: the management API on loopback only, one user per tier, and a task
        # queue outside the names the web may configure and read.
        ({"rabbitmq_management_listen_address": "0.0.0.0"}, "must be a loopback IPv4 address"),
        ({"rabbitmq_worker_user": "modelserve-web"}, "the two users must differ"),
        ({"rabbitmq_task_queue": "modelserve.reply.x"}, "outside the web's own modelserve.reply.*"),
        ({"rabbitmq_web_password": "short"}, "at least 16 characters on one line"),
        ({"rabbitmq_app_password": "x" * 20}, "rabbitmq_app_user and rabbitmq_app_password are gone"),
        # A partition detector slower than the tick (or one lost probe away from a disconnect).
        ({"rabbitmq_partition_detector_probes": 12}, "must stay below 0.75 x rabbitmq_net_ticktime"),
        ({"rabbitmq_partition_detector_probes": 1}, "at least 2"),
    ],
)
def test_bad_cluster_settings_are_refused(tmp_path, ansible_bin, ansible_env, extra, message):
    res = preflight(tmp_path, ansible_bin, ansible_env, **extra)
    assert res.returncode != 0
    assert message in res.stdout, res.stdout
