"""Behaviour of the modelserve.cluster.iot_edge role (standalone runtime) on the emulated arm64 host.

The pipeline runs for real: the simulator's readings go through the router and the RUL classifier
to the upstream bridge, which forwards {deviceId, RUL} to the MQTT sink topic of converge.yml
(molecule/upstream/<deviceId> on the same local broker), and to the Avro writer, whose closed files
are copied to the "uploaded" directory. Content is checked, not just presence.
"""

import json
import re
import time
from pathlib import Path

import pytest

VENV = "/opt/modelserve-edge/venv"
# The checked-in lock the arm64 wheelhouse is built from (scripts/lock).
LOCK = Path(__file__).resolve().parents[3] / "app" / "edge" / "requirements" / "edge.lock"
CONFIG_DIR = "/etc/modelserve-edge"
DATA_DIR = "/var/lib/modelserve-edge"
UPLOADED = f"{DATA_DIR}/uploaded"
USER = "modelserve-edge"
TARGET = "modelserve-edge.target"
MODULES = ["router", "rul-classifier", "avro-writer", "upstream", "simulator"]
SIM_DEVICE_IDS = {"engine-01", "engine-02"}  # iot_edge_simulator_engines: 2
MQTT_SECRETS = f"{CONFIG_DIR}/mqtt"
MONITOR = "molecule-monitor"  # iot_edge_mqtt_extra_users in converge.yml
P = "modelserve/edge"


def unit(module):
    return f"modelserve-edge-{module}.service"


def env_file(host, module):
    with host.sudo():
        text = host.file(f"{CONFIG_DIR}/{module}.env").content_string
    env = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value.strip('"')
    return env


def password(host, user):
    with host.sudo():
        return host.file(f"{MQTT_SECRETS}/{user}.password").content_string.strip()


def login(host, user):
    return f"-h 127.0.0.1 -p 1883 -u {user} -P '{password(host, user)}'"


def test_mosquitto_listens_on_loopback_only(host):
    assert host.service("mosquitto").is_running
    assert host.socket("tcp://127.0.0.1:1883").is_listening
    assert not host.socket("tcp://0.0.0.0:1883").is_listening
    conf = host.file("/etc/mosquitto/conf.d/modelserve-edge.conf").content_string
    assert "listener 1883 127.0.0.1" in conf
    assert "persistence true" in conf
    assert "max_queued_messages 100000" in conf
    assert "allow_anonymous false" in conf
    assert "password_file /etc/mosquitto/modelserve-edge.passwd" in conf
    assert "acl_file /etc/mosquitto/modelserve-edge.acl" in conf


@pytest.mark.parametrize("module", MODULES)
def test_unit_runs_as_unprivileged_user(host, module):
    assert host.service(unit(module)).is_running
    props = host.check_output(f"systemctl show -p User -p Restart -p MainPID -p PartOf {unit(module)}")
    values = dict(line.split("=", 1) for line in props.splitlines())
    assert values["User"] == USER
    assert values["Restart"] == "on-failure"
    assert values["PartOf"] == TARGET
    pid = int(values["MainPID"])
    assert pid > 0
    # The process itself, not just the unit setting: real and effective uid of the main process.
    uids = host.check_output(f"awk '/^Uid:/ {{print $2, $3}}' /proc/{pid}/status").split()
    expected = str(host.user(USER).uid)
    assert uids == [expected, expected]
    assert host.user(USER).uid != 0


def test_pipeline_target_is_enabled_and_pulls_in_every_module(host):
    target = host.service(TARGET)
    assert target.is_enabled
    assert target.is_running
    wants = host.check_output(f"systemctl show -p Wants --value {TARGET}").split()
    assert {unit(module) for module in MODULES} <= set(wants)
    after = host.check_output(f"systemctl show -p After --value {unit('simulator')}").split()
    assert {unit(module) for module in MODULES if module != "simulator"} <= set(after)


def test_client_ids_are_set_per_unit_and_unique(host):
    ids = [env_file(host, module)["MQTT_CLIENT_ID"] for module in MODULES]
    assert len(set(ids)) == len(MODULES)
    assert env_file(host, "rul-classifier")["RUL_BACKEND"] == "auto"


def test_env_files_are_not_world_readable(host):
    for module in MODULES:
        f = host.file(f"{CONFIG_DIR}/{module}.env")
        assert f.user == "root"
        assert f.group == USER
        assert f.mode == 0o640


def test_package_installed_from_wheels(host):
    out = host.check_output(f"{VENV}/bin/python -m pip list --format=json")
    installed = {p["name"].lower(): p["version"] for p in json.loads(out)}
    assert installed["modelserve-edge"] == "1.0.0"
    assert "ai-edge-litert" in installed  # arm64: the litert extra


def _pins(text):
    return {
        re.sub(r"[-_.]+", "-", m[1]).lower(): m[2]
        for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, re.M)
    }


def test_installed_versions_are_exactly_the_lock(host):
    # pip freeze leaves pip out (bootstrapped from the locked wheel all the same).
    frozen = _pins(host.check_output(f"{VENV}/bin/python -m pip freeze"))
    assert frozen.pop("modelserve-edge") == "1.0.0"
    locked = _pins(LOCK.read_text())
    assert locked.pop("pip") == _pins(host.check_output(f"{VENV}/bin/python -m pip freeze --all"))["pip"]
    assert len(locked) > 5
    assert frozen == locked


def test_pipeline_sends_rul_upstream(host):
    """{deviceId, RUL} arrive at the upstream sink, one topic per device, with plausible RULs."""
    out = host.check_output(f"mosquitto_sub {login(host, MONITOR)} -t 'molecule/upstream/#' -v -C 6 -W 120")
    messages = []
    for line in out.splitlines():
        topic, _, payload = line.partition(" ")
        body = json.loads(payload)
        assert topic == f"molecule/upstream/{body['deviceId']}"
        messages.append(body)
    assert len(messages) == 6
    for body in messages:
        assert set(body) == {"deviceId", "RUL"}
        assert body["deviceId"] in SIM_DEVICE_IDS
        assert isinstance(body["RUL"], float | int)
        assert -50.0 <= body["RUL"] <= 400.0


def test_upstream_queue_is_on_disk(host):
    queue = host.file(f"{DATA_DIR}/upstream-queue.sqlite3")
    assert queue.exists
    assert queue.user == USER


READ_AVRO = """
import glob, json, sys
import fastavro
records = []
files = sorted(glob.glob(sys.argv[1] + "/*.avro"))
for path in files:
    with open(path, "rb") as f:
        reader = fastavro.reader(f)
        records.extend(reader)
print(json.dumps({"files": files, "schema": reader.writer_schema["name"], "records": records}))
"""


def test_avro_files_hold_the_predictions(host):
    """Closed Avro files (rotated after 20 s) are uploaded and hold classifier records."""
    deadline = time.monotonic() + 180
    while True:
        files = host.check_output(f"find {UPLOADED} -maxdepth 1 -name '*.avro' -size +0").split()
        if files or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert files, f"no .avro file in {UPLOADED}"
    with host.sudo():
        out = host.check_output(f"{VENV}/bin/python -c '{READ_AVRO}' {UPLOADED}")
    data = json.loads(out)
    assert data["schema"].endswith("RulPrediction")
    records = data["records"]
    assert records
    for record in records:
        assert record["deviceId"] in SIM_DEVICE_IDS
        assert len(record["sensors"]) == 21
        assert len(record["settings"]) == 3
        assert record["cycle"] >= 1
        assert -50.0 <= record["RUL"] <= 400.0
        assert record["writtenAt"] > 0
    for path in data["files"]:
        assert host.file(path).user == USER


def test_failed_module_is_restarted(host):
    """Restart=on-failure: a killed router comes back with a new process."""
    show = f"systemctl show -p MainPID --value {unit('router')}"
    old = int(host.check_output(show))
    with host.sudo():
        host.run(f"kill -9 {old}")
    deadline = time.monotonic() + 90
    new = 0
    while time.monotonic() < deadline:
        new = int(host.check_output(show))
        if new not in (0, old) and host.service(unit("router")).is_running:
            break
        time.sleep(3)
    assert new not in (0, old)


def test_anonymous_clients_are_refused(host):
    sub = host.run("mosquitto_sub -h 127.0.0.1 -p 1883 -t '#' -C 1 -W 10")
    assert sub.rc != 0
    assert "not authori" in (sub.stdout + sub.stderr).lower()  # not authorised (CONNACK 5)
    pub = host.run("mosquitto_pub -h 127.0.0.1 -p 1883 -t molecule/anon -m x")
    assert pub.rc != 0
    wrong = host.run(f"mosquitto_pub -h 127.0.0.1 -p 1883 -u {MONITOR} -P wrong -t molecule/x -m x")
    assert wrong.rc != 0


def test_each_module_logs_in_as_its_own_user_with_a_root_only_password(host):
    secrets = host.file(MQTT_SECRETS)
    assert (secrets.user, secrets.group, secrets.mode) == ("root", "root", 0o700)
    with host.sudo():
        hashed = host.file("/etc/mosquitto/modelserve-edge.passwd").content_string
    users = dict(line.split(":", 1) for line in hashed.splitlines() if line)
    for module in MODULES:
        env = env_file(host, module)
        assert env["MQTT_USERNAME"] == f"modelserve-edge-{module}"
        with host.sudo():
            f = host.file(f"{MQTT_SECRETS}/{env['MQTT_USERNAME']}.password")
            assert (f.user, f.mode) == ("root", 0o600)
        assert env["MQTT_PASSWORD"] == password(host, env["MQTT_USERNAME"])
        assert len(env["MQTT_PASSWORD"]) >= 40  # 32 random bytes, URL-safe base64
        assert users[env["MQTT_USERNAME"]].startswith("$7$")  # hashed, never the password itself
        assert env["MQTT_PASSWORD"] not in hashed


def test_a_module_user_cannot_publish_outside_its_acl(host):
    """The simulator (a leaf device) may publish its readings and status, not a module's output: the
    broker drops the forbidden publish (MQTT 3.1.1 has no error for it), the allowed one arrives."""
    sim = "modelserve-edge-simulator"
    allowed, denied = f"{P}/devices/turbofan-simulator/status", f"{P}/router/output/classify"
    out = host.check_output(
        f"(mosquitto_sub {login(host, MONITOR)} -t '{allowed}' -t '{denied}' -v -W 8 & "
        f"sleep 2; "
        f"mosquitto_pub {login(host, sim)} -q 1 -t '{denied}' -m acl-probe-denied; "
        f"mosquitto_pub {login(host, sim)} -q 1 -t '{allowed}' -m acl-probe-allowed; "
        f"wait) 2>&1 || true"
    )
    assert f"{allowed} acl-probe-allowed" in out
    assert "acl-probe-denied" not in out
    # ... nor read another module's topics: the subscription is refused, nothing arrives.
    sub = host.run(f"mosquitto_sub {login(host, 'modelserve-edge-avro-writer')} -t '{denied}' -v -C 1 -W 8")
    assert f"{denied} " not in sub.stdout


def test_storage_bounds_reach_the_modules(host):
    assert env_file(host, "upstream")["UPSTREAM_QUEUE_MAX_BYTES"] == "1048576"
    assert env_file(host, "upstream")["UPSTREAM_QUEUE_MAX_AGE_SECONDS"] == "604800"
    assert env_file(host, "avro-writer")["AVRO_STORE_MAX_BYTES"] == "8388608"
    assert env_file(host, "avro-writer")["AVRO_RETENTION_SECONDS"] == "2592000"
