"""Behaviour of the modelserve.cluster.rabbitmq role on the Molecule broker hosts (a 3-node cluster).

The AMQP checks connect from the controller (py-amqp, in the project's venv) to the containers'
addresses on the Molecule docker network over TLS, i.e. the way a Celery worker on another host
does, with a client certificate of the cluster's CA that the converge issued on the seed.
"""

import datetime
import hashlib
import json
import os
import socket
import ssl
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
AMQP_PORT = 5671  # amqps, the only AMQP listener off loopback
PLAIN_PORT = 5672
CA_FILE = "/etc/modelserve/pki/modelserve-ca.pem"
SERVER_CERT = "/etc/rabbitmq/tls/server.pem"
CLIENT_DIR = "/root/molecule-client"
SHORT_SERIAL = "/root/molecule-short-serial"
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


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """The cluster CA and the tests' client certificate and key, copied from the seed."""
    seed, out = broker(BROKERS[0]), tmp_path_factory.mktemp("tls")
    with seed.sudo():
        files = {"ca": CA_FILE, "cert": f"{CLIENT_DIR}/client.pem", "key": f"{CLIENT_DIR}/client.key.pem"}
        for name, path in files.items():
            (out / name).write_text(seed.file(path).content_string)
    return {name: str(out / name) for name in ("ca", "cert", "key")}


def tls_options(tls_files, address, client_cert=True):
    """py-amqp's ssl options: the broker's certificate checked against the CA and its address."""
    options = {"ca_certs": tls_files["ca"], "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": address}
    if client_cert:
        options.update(certfile=tls_files["cert"], keyfile=tls_files["key"])
    return options


def rabbitmqctl_json(host, *args):
    with host.sudo():
        out = host.check_output("rabbitmqctl --quiet --formatter json " + " ".join(args))
    return json.loads(out)


def amqp_connect(address, userid, password, vhost=VHOST, ssl_options=None):
    conn = amqp.Connection(
        host=f"{address}:{AMQP_PORT}",
        userid=userid,
        password=password,
        virtual_host=vhost,
        connect_timeout=10,
        ssl=ssl_options if ssl_options is not None else tls_options(TLS_FILES, address),
    )
    conn.connect()
    return conn


def test_service_running_and_enabled(host):
    service = host.service("rabbitmq-server")
    assert service.is_running
    assert service.is_enabled


# The tls_files of the module, for amqp_connect's default TLS options (set by the fixture below).
TLS_FILES = {}


@pytest.fixture(autouse=True)
def _tls_files_for_amqp_connect(tls_files):
    TLS_FILES.update(tls_files)


def test_amqps_listens_on_cluster_ip_only_and_plain_amqp_nowhere(host, cluster_ip):
    assert host.socket(f"tcp://{cluster_ip}:{AMQP_PORT}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{AMQP_PORT}").is_listening
    assert not host.socket(f"tcp://:::{AMQP_PORT}").is_listening
    assert not host.socket(f"tcp://127.0.0.1:{AMQP_PORT}").is_listening
    # rabbitmq_amqp_plain_loopback is off: no plain listener at all (not even on loopback).
    assert not host.socket(f"tcp://{PLAIN_PORT}").is_listening


def _tcp_from(other, address, port):
    """Whether `other` (another container of the network) can open a TCP connection to address:port."""
    probe = (
        "import socket,sys\n"
        "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()\n"
        "except OSError:\n sys.exit(1)\n"
    )
    return other.run("python3 -c %s %s %s", probe, address, str(port)).rc == 0


def test_plain_amqp_unreachable_from_another_container(host, cluster_ip):
    other = broker(BROKERS[(BROKERS.index(host.backend.get_hostname()) + 1) % len(BROKERS)])
    assert _tcp_from(other, cluster_ip, AMQP_PORT)  # the probe works: amqps answers
    assert not _tcp_from(other, cluster_ip, PLAIN_PORT)


def test_tls_handshake_verifies_the_broker_by_ca_and_address(cluster_ip, tls_files):
    """The broker's certificate is the CA's, for this address; and the broker wants ours."""
    context = ssl.create_default_context(cafile=tls_files["ca"])
    context.load_cert_chain(tls_files["cert"], tls_files["key"])
    with (
        socket.create_connection((cluster_ip, AMQP_PORT), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=cluster_ip) as tls,
    ):
        assert tls.version() in ("TLSv1.3", "TLSv1.2")
        assert ("IP Address", cluster_ip) in tls.getpeercert()["subjectAltName"]
    # Without the CA (the system's public ones) the broker is not trusted.
    with (
        socket.create_connection((cluster_ip, AMQP_PORT), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname=cluster_ip)
    # Under another name the certificate does not match.
    with (
        socket.create_connection((cluster_ip, AMQP_PORT), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="not-a-broker.invalid")


def test_client_without_certificate_refused(cluster_ip, tls_files, app_password):
    """verify_peer + fail_if_no_peer_cert: the right password without a client certificate fails."""
    with pytest.raises((OSError, amqp.exceptions.AMQPError)):
        no_cert = tls_options(tls_files, cluster_ip, client_cert=False)
        amqp_connect(cluster_ip, APP_USER, app_password, ssl_options=no_cert)
    amqp_connect(cluster_ip, APP_USER, app_password).close()  # with one it works


def _served_certificate(address, tls_files):
    context = ssl.create_default_context(cafile=tls_files["ca"])
    context.load_cert_chain(tls_files["cert"], tls_files["key"])
    with (
        socket.create_connection((address, AMQP_PORT), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=address) as tls,
    ):
        return tls.getpeercert()


def test_served_certificate_is_the_files_and_long_valid(host, cluster_ip, tls_files):
    """After side_effect (rabbitmq-3 served a 5-day certificate, then the role ran): renewed."""
    served = _served_certificate(cluster_ip, tls_files)
    with host.sudo():
        pem = host.file(SERVER_CERT).content_string
        on_disk = host.check_output(f"openssl x509 -noout -serial -enddate -in {SERVER_CERT}")
        short = host.file(SHORT_SERIAL)
        short_serial = short.content_string.strip() if short.exists else None
    assert "BEGIN CERTIFICATE" in pem
    serial = on_disk.split("serial=")[1].split()[0].upper()
    assert served["serialNumber"].upper() == serial  # the node serves the file's certificate
    not_after = datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(served["notAfter"]), datetime.UTC)
    assert not_after - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=300)
    if short_serial is None:
        pytest.skip("before side_effect: no short-lived certificate served yet")
    assert int(short_serial) != int(serial, 16)  # x509_certificate_info's decimal, openssl's hex


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
