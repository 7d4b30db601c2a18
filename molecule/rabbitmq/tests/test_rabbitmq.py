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
import time
import urllib.request
import uuid

import amqp
import pytest
import testinfra

SECRET_FILES = {
    "web": "/etc/rabbitmq/modelserve-web.secret",
    "worker": "/etc/rabbitmq/modelserve-worker.secret",
}
LEGACY_SECRET_FILE = "/etc/rabbitmq/modelserve-app.secret"
COOKIE_FILE = "/var/lib/rabbitmq/.erlang.cookie"
FIRST_SECRET_SHA256 = "/root/molecule-first-secret-{}.sha256"
USERS = {"web": "modelserve-web", "worker": "modelserve-worker"}
LEGACY_USER = "modelserve"  # the single .* user of earlier versions (the converge makes one)
VHOST = "modelserve"
TASK_QUEUE = "modelserve.predict"  # rabbitmq_task_queue's default
# The permissions the role gives, written out: what each tier may configure, write and read.
PERMISSIONS = {
    "web": {
        "configure": r"^modelserve\.(reply|status)\..+$",
        "write": r"^(modelserve\.predict|modelserve\.status\..+)$",
        "read": r"^(modelserve\.predict\.status|modelserve\.(reply|status)\..+)$",
    },
    "worker": {
        "configure": r"^modelserve\.predict(\.dead|\.status)?$",
        "write": r"^(amq\.default|modelserve\.predict(\.dead|\.status)?)$",
        "read": r"^modelserve\.predict(\.dead)?$",
    },
}
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
def passwords(host):
    with host.sudo():
        return {tier: host.file(path).content_string.strip() for tier, path in SECRET_FILES.items()}


def login(address, passwords, tier, **kwargs):
    return amqp_connect(address, USERS[tier], passwords[tier], **kwargs)


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


def test_client_without_certificate_refused(cluster_ip, tls_files, passwords):
    """verify_peer + fail_if_no_peer_cert: the right password without a client certificate fails."""
    with pytest.raises((OSError, amqp.exceptions.AMQPError)):
        no_cert = tls_options(tls_files, cluster_ip, client_cert=False)
        login(cluster_ip, passwords, "worker", ssl_options=no_cert)
    login(cluster_ip, passwords, "worker").close()  # with one it works


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


def test_guest_and_the_earlier_user_deleted_the_tiers_users_present(host):
    users = {u["user"]: u["tags"] for u in rabbitmqctl_json(host, "list_users")}
    assert "guest" not in users
    # The converge made the single .* user of earlier versions; unused, the role deleted it.
    assert LEGACY_USER not in users
    assert not host.file(LEGACY_SECRET_FILE).exists
    assert users[USERS["web"]] == [] and users[USERS["worker"]] == []  # no tags: no management UI


@pytest.mark.parametrize("tier", ["web", "worker"])
def test_each_tier_has_exactly_its_permissions(host, tier):
    perms = rabbitmqctl_json(host, "list_user_permissions", USERS[tier])
    assert perms == [{"vhost": VHOST, **PERMISSIONS[tier]}]


@pytest.mark.parametrize("tier", ["web", "worker"])
def test_secret_files_root_only(host, passwords, tier):
    secret = host.file(SECRET_FILES[tier])
    assert secret.is_file
    assert secret.user == "root"
    assert secret.group == "root"
    assert secret.mode == 0o600
    assert len(passwords[tier]) == 32
    assert passwords[tier].isalnum()
    assert passwords["web"] != passwords["worker"]


def test_erlang_cookie(host):
    cookie = host.file(COOKIE_FILE)
    assert cookie.is_file
    assert cookie.user == "rabbitmq"
    assert cookie.group == "rabbitmq"
    assert cookie.mode == 0o400


@pytest.mark.parametrize("tier", ["web", "worker"])
def test_passwords_unchanged_by_second_converge(host, passwords, tier):
    with host.sudo():
        first = host.file(FIRST_SECRET_SHA256.format(tier)).content_string.strip()
    assert hashlib.sha256(passwords[tier].encode()).hexdigest() == first


def _get(channel, queue):
    for _ in range(50):
        message = channel.basic_get(queue, no_ack=True)
        if message is not None:
            return message
        time.sleep(0.1)
    return None


@pytest.fixture
def task_queue(cluster_ip, passwords):
    """The task queue as the workers declare it (their user may), with a task in it, deleted after."""
    conn = login(cluster_ip, passwords, "worker")
    channel = conn.channel()
    channel.exchange_declare(TASK_QUEUE, "direct", durable=True, auto_delete=False)
    channel.queue_declare(TASK_QUEUE, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(TASK_QUEUE, TASK_QUEUE, TASK_QUEUE)
    yield channel
    channel.queue_delete(TASK_QUEUE)
    conn.close()


def test_the_rpc_path_works_with_the_two_users(cluster_ip, passwords, task_queue):
    """What a prediction does: the web publishes a task, a worker takes it and answers on the web's
    exclusive reply queue through amq.default."""
    web = login(cluster_ip, passwords, "web")
    try:
        web_channel = web.channel()
        reply = f"modelserve.reply.molecule.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        web_channel.queue_declare(reply, exclusive=True, auto_delete=True)
        web_channel.basic_publish(
            amqp.Message(b"task", reply_to=reply), exchange=TASK_QUEUE, routing_key=TASK_QUEUE
        )
        task = _get(task_queue, TASK_QUEUE)
        assert task is not None and task.body == b"task"
        task_queue.basic_publish(
            amqp.Message(b"answer"), exchange="", routing_key=task.properties["reply_to"]
        )
        answer = _get(web_channel, reply)
        assert answer is not None and answer.body == b"answer"
    finally:
        web.close()


def _purge(channel):
    channel.queue_purge(TASK_QUEUE)


def _delete(channel):
    channel.queue_delete(TASK_QUEUE)


def _consume(channel):
    channel.basic_consume(TASK_QUEUE, callback=lambda m: None)


def _get_task(channel):
    channel.basic_get(TASK_QUEUE)


def _declare(channel):
    channel.queue_declare(TASK_QUEUE, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})


def _siphon(channel):
    """A queue of the web's own names bound to the task exchange would receive a copy of every task."""
    name = f"modelserve.status.thief.{uuid.uuid4().hex[:8]}"
    channel.queue_declare(name, exclusive=True, auto_delete=True)
    channel.queue_bind(name, exchange=TASK_QUEUE, routing_key=TASK_QUEUE)


def _publish_to(exchange):
    def publish(channel):
        channel.basic_publish(amqp.Message(b"{}"), exchange=exchange, routing_key=TASK_QUEUE)
        channel.queue_declare(TASK_QUEUE, passive=True)  # synchronous: the refusal arrives first

    publish.__name__ = f"publish_to_{exchange or 'amq.default'}"
    return publish


@pytest.mark.parametrize(
    ("tier", "action"),
    [
        # A front end cannot empty, delete, drain, redeclare or copy the prediction queue ...
        ("web", _purge),
        ("web", _delete),
        ("web", _consume),
        ("web", _get_task),
        ("web", _declare),
        ("web", _siphon),
        # ... nor answer in a worker's place, nor send Celery remote-control commands ...
        ("web", _publish_to("")),
        ("web", _publish_to("celery.pidbox")),
        # ... and remote control is off for the workers' user too (rabbitmq_celery_remote_control).
        ("worker", _publish_to("celery.pidbox")),
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_what_a_tier_does_not_do_is_refused(cluster_ip, passwords, task_queue, tier, action):
    task_queue.basic_publish(amqp.Message(b"task"), exchange=TASK_QUEUE, routing_key=TASK_QUEUE)
    conn = login(cluster_ip, passwords, tier)
    try:
        with pytest.raises(amqp.exceptions.AccessRefused):
            action(conn.channel())
    finally:
        conn.close()
    # The queue and its task are still there, for the workers.
    task = _get(task_queue, TASK_QUEUE)
    assert task is not None and task.body == b"task"


@pytest.mark.parametrize(
    ("userid", "password", "vhost"),
    [
        ("guest", "guest", "/"),
        ("guest", "guest", VHOST),
        (USERS["web"], "not-the-password", VHOST),
        (USERS["worker"], "not-the-password", VHOST),
        (LEGACY_USER, "legacy-password-of-before", VHOST),
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


def test_the_partition_detector_runs_and_probes_the_other_two(host):
    detector = host.service("rabbitmq-partition-detector")
    assert detector.is_running and detector.is_enabled
    with host.sudo():
        journal = host.check_output("journalctl -u rabbitmq-partition-detector -b --no-pager -q -o cat")
    # The last membership it read from the node: the other two (a cluster of one, before they joined).
    peers = [line for line in journal.splitlines() if line.startswith("peers: ")]
    name = host.check_output("hostname -s")
    assert peers and peers[-1] == "peers: " + ", ".join(f"rabbit@{b}" for b in BROKERS if b != name), journal
    # Its helper node is connected to the broker, ready to disconnect a peer without starting a VM.
    pid = host.check_output("systemctl show --property MainPID --value rabbitmq-partition-detector")
    with host.sudo():
        hidden = host.check_output("rabbitmqctl --quiet eval 'nodes(hidden).'")
    assert f"rabbitmq-partition-detector-{pid}@{name}" in hidden, (hidden, journal)


def test_the_running_net_ticktime_is_the_roles(host):
    # The running tick, not the configured one: rabbitmq.conf's reached the environment and not the
    # VM (3.10.8); the role sets it as a VM argument (rabbitmq_net_ticktime, default 15).
    with host.sudo():
        tick = host.check_output("rabbitmqctl --quiet eval 'net_kernel:get_net_ticktime().'")
    assert tick.strip() == "15"


def test_one_cookie_and_one_password_per_user_for_the_cluster(host):
    # The seed's, taken by the nodes that joined (and a cluster of different cookies could not form).
    assert sha256_of(host, COOKIE_FILE) == sha256_of(broker(BROKERS[0]), COOKIE_FILE)
    for path in SECRET_FILES.values():
        assert sha256_of(host, path) == sha256_of(broker(BROKERS[0]), path)


def test_a_quorum_queue_is_replicated_on_every_node(host, cluster_ip, passwords):
    """Declared and published on this node, read from the next one: one queue, three members. The
    task queue's name, with the workers' user (the only names it may declare)."""
    name = TASK_QUEUE
    other = broker(BROKERS[(BROKERS.index(host.backend.get_hostname()) + 1) % len(BROKERS)])
    conn = login(cluster_ip, passwords, "worker")
    try:
        channel = conn.channel()
        channel.queue_declare(name, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
        channel.basic_publish(amqp.Message(b"replicated"), exchange="", routing_key=name)
        with host.sudo():
            status = f"rabbitmq-queues --quiet --formatter json quorum_status {name} --vhost {VHOST}"
            members = host.check_output(status)
        assert sorted(m["Node Name"] for m in json.loads(members)) == NODES
        other_conn = login(address_of(other), passwords, "worker")
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
