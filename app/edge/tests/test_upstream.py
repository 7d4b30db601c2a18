import http.server
import json
import threading

import pytest
from conftest import free_port, wait_until
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
