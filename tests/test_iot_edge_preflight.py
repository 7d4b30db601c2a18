"""Preflight of iot_edge (standalone): data leaves the device over TLS only, storage bounds and broker
users are checked. Runs the role's preflight on the controller (connection local, Debian 12 facts);
nothing is installed."""

import json
import sys

import pytest
from conftest import run_playbook

PLAY = """
- name: iot_edge preflight only
  hosts: localhost
  connection: local
  gather_facts: true
  gather_subset: [min]
  tasks:
    - name: Preflight
      ansible.builtin.include_role:
        name: modelserve.cluster.iot_edge
        tasks_from: preflight
"""


def preflight(tmp_path, ansible_bin, ansible_env, **extra):
    evars = {"ansible_python_interpreter": sys.executable, "iot_edge_runtime": "standalone", **extra}
    return run_playbook(PLAY, tmp_path, ansible_bin, ansible_env, "-i", "localhost,", "-e", json.dumps(evars))


@pytest.mark.parametrize(
    "extra",
    [
        {"iot_edge_upstream_url": "mqtt://127.0.0.1:1883/local/{deviceId}"},
        {
            "iot_edge_upstream_url": "http://localhost:8080/rul",
            "iot_edge_avro_upload_url": "http://[::1]/avro",
        },
        {"iot_edge_upstream_url": "mqtts://user:secret@mqtt.example.com/edge/{deviceId}"},
        {
            "iot_edge_upstream_url": "https://ingest.example.com/rul",
            "iot_edge_avro_upload_url": "https://x.example/a",
        },
        {"iot_edge_mqtt_extra_users": [{"name": "dashboard", "read": ["modelserve/edge/#"]}]},
    ],
)
def test_local_plain_or_remote_tls_passes(tmp_path, ansible_bin, ansible_env, extra):
    res = preflight(tmp_path, ansible_bin, ansible_env, **extra)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"iot_edge_upstream_url": "mqtt://user:s3cret-pw@mqtt.example.com/edge/{deviceId}"},
            "iot_edge_upstream_url (plain, to a non-local host)",
        ),
        (
            {"iot_edge_upstream_url": "http://10.0.0.5/rul"},
            "iot_edge_upstream_url (plain, to a non-local host)",
        ),
        (
            {"iot_edge_avro_upload_url": "http://ingest.example.com/avro"},
            "iot_edge_avro_upload_url (plain, to a non-local host)",
        ),
        ({"iot_edge_avro_store_max_bytes": 1000}, "iot_edge_avro_store_max_bytes 0 or at least"),
        ({"iot_edge_mqtt_extra_users": [{"name": "modelserve-edge-router"}]}, "that are not module users"),
        # The argument specs (validated for tasks_from preflight too) require each user's name.
        ({"iot_edge_mqtt_extra_users": [{"read": ["modelserve/#"]}]}, "missing required arguments: name"),
        ({"iot_edge_mqtt_password_bytes": 8}, "iot_edge_mqtt_password_bytes >= 16"),
    ],
)
def test_bad_input_is_refused_by_name(tmp_path, ansible_bin, ansible_env, extra, message):
    res = preflight(tmp_path, ansible_bin, ansible_env, **extra)
    assert res.returncode != 0
    out = " ".join(res.stdout.split())
    assert message in out, out
    assert "s3cret-pw" not in res.stdout + res.stderr  # the URL's credentials are never printed
