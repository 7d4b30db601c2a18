import http.server
import json
import threading

import pytest
from conftest import free_port, make_pki, wait_until
from modelserve_edge.avro_writer import upload_target
from modelserve_edge.config import ConfigError
from modelserve_edge.diskqueue import DiskQueue
from modelserve_edge.upstream import Forwarder, HttpSender, MqttSender, make_sender


def test_queue_is_fifo_and_survives_reopening(tmp_path):
    q = DiskQueue(tmp_path / "q.sqlite3")
    ids = [q.put(f"m{i}".encode()) for i in range(5)]
    q.ack(ids[:2])
    q.close()
    q2 = DiskQueue(tmp_path / "q.sqlite3")
    assert [b for _, b in q2.peek()] == [b"m2", b"m3", b"m4"]
    assert len(q2) == 3
    q2.put(b"m5")
    assert [b for _, b in q2.peek(2)] == [b"m2", b"m3"]


def test_bounded_queue_drops_the_oldest(tmp_path):
    q = DiskQueue(tmp_path / "q.sqlite3", max_items=3)
    for i in range(5):
        q.put(str(i).encode())
    assert [b for _, b in q.peek()] == [b"2", b"3", b"4"]


class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_upstream_outage_queues_on_disk_and_drains_after_restart(tmp_path):
    port = free_port()  # nothing listens yet: the upstream is down
    q = DiskQueue(tmp_path / "q.sqlite3")
    fwd = Forwarder(q, HttpSender(f"http://127.0.0.1:{port}/rul", timeout=2))
    for i in range(10):
        q.put(json.dumps({"deviceId": "engine-01", "RUL": 100 - i}).encode())
    assert fwd.drain_once() is False
    assert len(q) == 10 and fwd.failures == 1
    q.close()  # the edge process restarts while the upstream is still down

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Sink)
    server.received = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        q2 = DiskQueue(tmp_path / "q.sqlite3")
        fwd2 = Forwarder(q2, make_sender(f"http://127.0.0.1:{port}/rul", env={}))
        stop = threading.Event()
        t = threading.Thread(target=fwd2.run, args=(stop,), daemon=True)
        t.start()
        q2.put(json.dumps({"deviceId": "engine-02", "RUL": 1}).encode())
        wait_until(lambda: len(server.received) == 11, 15, "11 messages at the HTTP upstream")
        stop.set()
        t.join(5)
        assert [m["RUL"] for m in server.received] == [100 - i for i in range(10)] + [1]
        assert len(q2) == 0
    finally:
        server.shutdown()


@pytest.mark.mosquitto
def test_mqtt_upstream_waits_for_the_broker_then_delivers_in_order(tmp_path, broker_factory, collectors):
    cloud = broker_factory("cloud")  # port reserved, broker not started: upstream down
    q = DiskQueue(tmp_path / "q.sqlite3")
    sender = MqttSender(f"mqtt://127.0.0.1:{cloud.port}/cloud/rul/{{deviceId}}", timeout=3)
    try:
        fwd = Forwarder(q, sender)
        for i in range(5):
            q.put(json.dumps({"deviceId": f"engine/0{i % 2}", "RUL": float(i)}).encode())
        assert fwd.drain_once() is False and len(q) == 5
        cloud.start()
        got = collectors(cloud.port, ["cloud/rul/#"])
        wait_until(lambda: fwd.drain_once(), 40, "the upstream broker to accept the queue")
        wait_until(lambda: len(got.snapshot()) == 5, 10, "5 messages on the upstream broker")
        msgs = got.snapshot()
        assert [json.loads(p)["RUL"] for _, p in msgs] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert {t for t, _ in msgs} == {"cloud/rul/engine_00", "cloud/rul/engine_01"}
        assert len(q) == 0
    finally:
        sender.close()


def test_queue_byte_cap_drops_the_oldest_and_counts(tmp_path):
    body = b"x" * 100
    q = DiskQueue(tmp_path / "q.sqlite3", max_bytes=1000)
    for i in range(25):
        q.put(b"%03d" % i + body[3:])
    assert q.size_bytes == 1000
    assert [b[:3] for _, b in q.peek()] == [b"%03d" % i for i in range(15, 25)]
    assert q.dropped == {"items_max_items": 0, "items_max_bytes": 15, "items_max_age": 0, "bytes": 1500}
    q.close()
    q2 = DiskQueue(tmp_path / "q.sqlite3", max_bytes=500)  # a smaller cap applies at start too
    assert q2.size_bytes == 500 and len(q2) == 5
    assert q2.dropped["items_max_bytes"] == 20 and q2.dropped["bytes"] == 2000  # counters persist
    q2.ack([i for i, _ in q2.peek(2)])
    assert q2.size_bytes == 300


def test_queue_retention_drops_what_is_too_old(tmp_path):
    now = [1000.0]
    q = DiskQueue(tmp_path / "q.sqlite3", max_age=60, clock=lambda: now[0])
    q.put(b"old-1")
    now[0] += 30
    q.put(b"old-2")
    now[0] += 40  # old-1 is 70 s old
    q.put(b"new")
    assert [b for _, b in q.peek()] == [b"old-2", b"new"]
    now[0] += 40  # nothing arrives: expire() (the forwarder calls it) drops old-2
    q.expire()
    assert [b for _, b in q.peek()] == [b"new"]
    assert q.dropped["items_max_age"] == 2 and q.dropped["bytes"] == 10


def test_item_cap_is_counted_too(tmp_path):
    q = DiskQueue(tmp_path / "q.sqlite3", max_items=3)
    for i in range(5):
        q.put(str(i).encode())
    assert q.dropped["items_max_items"] == 2 and q.dropped["bytes"] == 2


@pytest.mark.parametrize(
    "url",
    [
        "mqtt://broker.example.com/rul",
        "http://10.0.0.5:8080/rul",
        "mqtt://192.168.1.10:1883/t",
        "http://edge-hub/x",
    ],
)
def test_plain_upstream_to_a_non_local_host_is_refused(url):
    with pytest.raises(ConfigError, match=r"not loopback: use (mqtts|https)://"):
        make_sender(url, env={})
    if url.startswith("http"):
        with pytest.raises(ConfigError, match="AVRO_UPLOAD_URL: http:// to"):
            upload_target({"AVRO_UPLOAD_URL": url})


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/rul", "http://localhost:9/rul", "http://[::1]:9/rul"])
def test_plain_upstream_on_loopback_is_allowed(url):
    assert isinstance(make_sender(url, env={}), HttpSender)
    assert upload_target({"AVRO_UPLOAD_URL": url}).url == url


@pytest.mark.mosquitto
def test_mqtts_upstream_verifies_the_broker_against_the_ca(tmp_path, broker_factory, collectors):
    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other", "other-ca")
    cloud = broker_factory("cloud")
    cloud.listener = [f"cafile {pki['ca']}", f"certfile {pki['cert']}", f"keyfile {pki['key']}"]
    cloud.start()
    url = f"mqtts://localhost:{cloud.port}/cloud/rul"
    trusted = make_sender(url, env={"UPSTREAM_TLS_CA": str(pki["ca"]), "UPSTREAM_TIMEOUT_SECONDS": "3"})
    untrusted = make_sender(url, env={"UPSTREAM_TLS_CA": str(other["ca"]), "UPSTREAM_TIMEOUT_SECONDS": "3"})
    try:
        wait_until(lambda: trusted._connected.is_set(), 15, "a TLS connection with the right CA")
        trusted.send(b'{"deviceId": "engine-01", "RUL": 1.0}')
        with pytest.raises(ConnectionError):  # certificate not signed by the configured CA
            untrusted.send(b'{"deviceId": "engine-01", "RUL": 2.0}')
    finally:
        trusted.close()
        untrusted.close()


@pytest.mark.mosquitto
def test_local_mqtt_upstream_logs_in_as_the_module(tmp_path, broker_factory, collectors):
    local = broker_factory("local")
    local.anonymous = False
    local.users = {"upstream": "s3cret", "watcher": "w"}
    local.start()
    got = collectors(local.port, ["sink/#"], username="watcher", password="w")
    url = f"mqtt://127.0.0.1:{local.port}/sink/rul"
    env = {"MQTT_PORT": str(local.port), "MQTT_USERNAME": "upstream", "MQTT_PASSWORD": "s3cret",
           "UPSTREAM_TIMEOUT_SECONDS": "3"}  # fmt: skip
    sender = make_sender(url, env=env)
    wrong = make_sender(url, env={**env, "MQTT_PASSWORD": "nope"})
    try:
        wait_until(lambda: sender._connected.is_set(), 15, "the module's login at the local broker")
        sender.send(b'{"deviceId": "engine-01", "RUL": 3.0}')
        wait_until(lambda: got.snapshot(), 10, "the message at the sink")
        with pytest.raises(ConnectionError):
            wrong.send(b"{}")
    finally:
        sender.close()
        wrong.close()
