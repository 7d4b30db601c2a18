"""Behaviour of the modelserve.cluster.rabbitmq role on the Molecule broker hosts (a 3-node cluster).

The AMQP checks connect from the controller (py-amqp, in the project's venv) to the containers'
addresses on the Molecule docker network, i.e. the way a Celery worker on another host does.
"""

import hashlib
import json
import os
import urllib.request
import uuid

import amqp
import pytest
import testinfra

SECRET_FILE = "/etc/rabbitmq/modelserve-app.secret"
COOKIE_FILE = "/var/lib/rabbitmq/.erlang.cookie"
FIRST_SECRET_SHA256 = "/root/molecule-first-secret.sha256"
APP_USER = "modelserve"
VHOST = "modelserve"
AMQP_PORT = 5672
MANAGEMENT_PORT = 15672
PROMETHEUS_PORT = 15692
BROKERS = ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
NODES = sorted(f"rabbit@{name}" for name in BROKERS)


def broker(name):
    """Another broker of the scenario (the `host` fixture is the one under test)."""
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")


def sha256_of(host, path):
    """Of the secret in a file without surrounding whitespace (Erlang ignores a trailing newline)."""
    with host.sudo():
        return hashlib.sha256(host.file(path).content_string.strip().encode()).hexdigest()


def address_of(host):
    facts = host.ansible("setup", "gather_subset=network", check=False)["ansible_facts"]
    return facts["ansible_default_ipv4"]["address"]


@pytest.fixture(scope="module")
def cluster_ip(host):
    """The host's default IPv4 address: the one the role binds the AMQP listener to."""
    return address_of(host)


@pytest.fixture(scope="module")
def app_password(host):
    with host.sudo():
        return host.file(SECRET_FILE).content_string.strip()


def rabbitmqctl_json(host, *args):
    with host.sudo():
        out = host.check_output("rabbitmqctl --quiet --formatter json " + " ".join(args))
    return json.loads(out)


def amqp_connect(address, userid, password, vhost=VHOST):
    conn = amqp.Connection(
        host=f"{address}:{AMQP_PORT}",
        userid=userid,
        password=password,
        virtual_host=vhost,
        connect_timeout=10,
    )
    conn.connect()
    return conn


def test_service_running_and_enabled(host):
    service = host.service("rabbitmq-server")
    assert service.is_running
    assert service.is_enabled


def test_amqp_listens_on_cluster_ip_only(host, cluster_ip):
    assert host.socket(f"tcp://{cluster_ip}:{AMQP_PORT}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{AMQP_PORT}").is_listening
    assert not host.socket(f"tcp://:::{AMQP_PORT}").is_listening
    assert not host.socket(f"tcp://127.0.0.1:{AMQP_PORT}").is_listening


def test_management_not_listening_by_default(host):
    assert not host.socket(f"tcp://{MANAGEMENT_PORT}").is_listening
    enabled = host.file("/etc/rabbitmq/enabled_plugins")
    assert not enabled.exists or "rabbitmq_management" not in enabled.content_string


def test_prometheus_plugin_serves_the_node_metrics_on_the_cluster_ip(host, cluster_ip):
    # rabbitmq_prometheus, read from the controller as a Prometheus on the cluster network would.
    assert "rabbitmq_prometheus" in host.file("/etc/rabbitmq/enabled_plugins").content_string
    assert host.socket(f"tcp://{cluster_ip}:{PROMETHEUS_PORT}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{PROMETHEUS_PORT}").is_listening
    with urllib.request.urlopen(f"http://{cluster_ip}:{PROMETHEUS_PORT}/metrics", timeout=10) as r:
        text = r.read().decode()
    node = host.backend.get_hostname()
    assert "rabbitmq_identity_info{" in text and f'rabbitmq_node="rabbit@{node}"' in text


def test_guest_deleted_app_user_present(host):
    users = {u["user"]: u["tags"] for u in rabbitmqctl_json(host, "list_users")}
    assert "guest" not in users
    assert users[APP_USER] == []


def test_app_user_permissions(host):
    perms = rabbitmqctl_json(host, "list_user_permissions", APP_USER)
    assert perms == [{"vhost": VHOST, "configure": ".*", "write": ".*", "read": ".*"}]


def test_secret_file_root_only(host, app_password):
    secret = host.file(SECRET_FILE)
    assert secret.is_file
    assert secret.user == "root"
    assert secret.group == "root"
    assert secret.mode == 0o600
    assert len(app_password) == 32
    assert app_password.isalnum()


def test_erlang_cookie(host):
    cookie = host.file(COOKIE_FILE)
    assert cookie.is_file
    assert cookie.user == "rabbitmq"
    assert cookie.group == "rabbitmq"
    assert cookie.mode == 0o400


def test_password_unchanged_by_second_converge(host, app_password):
    with host.sudo():
        first = host.file(FIRST_SECRET_SHA256).content_string.strip()
    assert hashlib.sha256(app_password.encode()).hexdigest() == first


def test_amqp_login_app_user_round_trip(cluster_ip, app_password):
    conn = amqp_connect(cluster_ip, APP_USER, app_password)
    try:
        channel = conn.channel()
        queue, _, _ = channel.queue_declare(exclusive=True, auto_delete=True)
        channel.basic_publish(amqp.Message(b"ping"), exchange="", routing_key=queue)
        message = None
        for _ in range(50):
            message = channel.basic_get(queue, no_ack=True)
            if message is not None:
                break
        assert message is not None
        assert message.body == b"ping"
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("userid", "password", "vhost"),
    [
        ("guest", "guest", "/"),
        ("guest", "guest", VHOST),
        (APP_USER, "not-the-password", VHOST),
    ],
)
def test_amqp_login_refused(cluster_ip, userid, password, vhost):
    with pytest.raises(amqp.exceptions.AccessRefused):
        amqp_connect(cluster_ip, userid, password, vhost)


def test_every_node_sees_the_whole_cluster_running(host):
    status = rabbitmqctl_json(host, "cluster_status")
    assert sorted(status["disk_nodes"]) == NODES
    assert sorted(status["running_nodes"]) == NODES
    assert status["partitions"] == {} or not status["partitions"]


def test_partition_handling_and_message_size(host):
    get_env = "rabbitmqctl --quiet eval 'application:get_env(rabbit, {}).'"
    with host.sudo():
        handling = host.check_output(get_env.format("cluster_partition_handling"))
        size = host.check_output(get_env.format("max_message_size"))
    assert handling.strip() == "{ok,pause_minority}"
    assert size.strip() == "{ok,8388608}"


def test_one_cookie_and_one_password_for_the_cluster(host):
    # The seed's, taken by the nodes that joined (and a cluster of different cookies could not form).
    assert sha256_of(host, COOKIE_FILE) == sha256_of(broker(BROKERS[0]), COOKIE_FILE)
    assert sha256_of(host, SECRET_FILE) == sha256_of(broker(BROKERS[0]), SECRET_FILE)


def test_a_quorum_queue_is_replicated_on_every_node(host, cluster_ip, app_password):
    """Declared and published on this node, read from the next one: one queue, three members."""
    name = f"molecule.quorum.{uuid.uuid4().hex[:8]}"
    other = broker(BROKERS[(BROKERS.index(host.backend.get_hostname()) + 1) % len(BROKERS)])
    conn = amqp_connect(cluster_ip, APP_USER, app_password)
    try:
        channel = conn.channel()
        channel.queue_declare(name, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
        channel.basic_publish(amqp.Message(b"replicated"), exchange="", routing_key=name)
        with host.sudo():
            status = f"rabbitmq-queues --quiet --formatter json quorum_status {name} --vhost {VHOST}"
            members = host.check_output(status)
        assert sorted(m["Node Name"] for m in json.loads(members)) == NODES
        other_conn = amqp_connect(address_of(other), APP_USER, app_password)
        try:
            other_channel, message = other_conn.channel(), None
            for _ in range(50):
                message = other_channel.basic_get(name, no_ack=True)
                if message is not None:
                    break
            assert message is not None and message.body == b"replicated"
        finally:
            other_conn.close()
    finally:
        conn.channel().queue_delete(name)
        conn.close()
