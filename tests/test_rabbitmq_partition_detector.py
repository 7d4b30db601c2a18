"""The rabbitmq role's partition detector (roles/rabbitmq/files/rabbitmq-partition-detector).

Its decision is driven probe by probe; then the real script runs against real TCP listeners on
loopback addresses standing in for the other nodes' distribution ports. RabbitMQ's CLI is a test
double here (a script that records its arguments); the Molecule `rabbitmq` scenario's fault test
runs the detector on three real brokers under load.
"""

import importlib.machinery
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "roles" / "rabbitmq" / "files" / "rabbitmq-partition-detector"


def load_script():
    loader = importlib.machinery.SourceFileLoader("rabbitmq_partition_detector", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


detector = load_script()
B2, B3 = "rabbit@b-2", "rabbit@b-3"


def test_a_peer_silent_for_the_window_is_disconnected_then_reported_again_while_silent():
    d = detector.Detector(window=3, again=30)
    assert d.check([B2, B3], now=0) == ([], [])  # a new peer gets a whole window
    for t in range(1, 37):
        d.answered(B2, t)  # B2 answers all along (recorded ahead of the checks: only the latest counts)
    assert d.check([B2, B3], now=2.9) == ([], [])
    assert d.check([B2, B3], now=3) == ([B3], [])
    assert d.check([B2, B3], now=4) == ([], [])
    assert d.check([B2, B3], now=32.9) == ([], [])
    assert d.check([B2, B3], now=33) == ([B3], [])  # still silent: asked again
    d.answered(B3, 34)
    assert d.check([B2, B3], now=35) == ([], [B3])  # and said when it answers again
    assert d.check([B2, B3], now=36) == ([], [])


def test_a_lost_probe_now_and_then_disconnects_nothing():
    d = detector.Detector(window=3, again=30)
    d.check([B2], now=0)
    # Answers at irregular times, never three seconds apart: a lost SYN is retried within the window.
    for t in (0.5, 2.4, 5.3, 7.9, 10.8):
        d.answered(B2, t)
        assert d.check([B2], now=t + 0.1) == ([], [])
    assert d.check([B2], now=13.7) == ([], [])
    assert d.check([B2], now=13.8) == ([B2], [])


def test_both_peers_silent_are_disconnected_together_and_a_departed_peer_is_forgotten():
    d = detector.Detector(window=2, again=20)
    d.check([B2, B3], now=0)
    assert d.check([B2, B3], now=2) == ([B2, B3], [])
    assert d.check([B2], now=3) == ([], [])  # B3 left the cluster
    assert B3 not in d.last_answer and B3 not in d.reported


def test_an_answer_that_arrives_late_does_not_go_back_in_time():
    d = detector.Detector(window=3, again=30)
    d.check([B2], now=0)
    d.answered(B2, 5)
    d.answered(B2, 4)  # a slower probe completing after a faster one
    assert d.last_answer[B2] == 5


def test_members_are_read_from_the_nodes_cluster_file(tmp_path):
    f = tmp_path / "cluster_nodes.config"
    f.write_text("{['rabbit@b-1','rabbit@b-2','rabbit@b-3'],['rabbit@b-1','rabbit@b-2','rabbit@b-3']}.\n")
    assert detector.members(str(f)) == ["rabbit@b-1", "rabbit@b-2", "rabbit@b-3"]
    assert detector.members(str(tmp_path / "missing")) is None


class Peer:
    """A listener standing in for a node's Erlang distribution port."""

    def __init__(self, address, port):
        self.address, self.port, self.sock = address, port, None

    def up(self):
        self.sock = socket.create_server((self.address, self.port))
        return self

    def down(self):
        self.sock.close()
        self.sock = None


def wait_for(path, text, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path}: {path.read_text() if path.exists() else '(none)'}")


@pytest.fixture
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_detector_disconnects_a_silent_peer_and_only_that_one(tmp_path, free_port):
    calls = tmp_path / "calls"
    ctl = tmp_path / "rabbitmqctl"  # test double for RabbitMQ's CLI: records what it was asked
    ctl.write_text(f'#!/bin/sh\necho "$*" >> {calls}\necho "[]"\n')
    ctl.chmod(0o755)
    cluster = tmp_path / "cluster_nodes.config"
    cluster.write_text("{['rabbit@127.0.0.1'],['rabbit@127.0.0.1']}.\n")
    peers = [Peer("127.0.0.2", free_port).up(), Peer("127.0.0.3", free_port).up()]
    out = tmp_path / "out"
    with open(out, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--node", "rabbit@127.0.0.1", "--cluster-file", str(cluster),
             "--port", str(free_port), "--interval", "0.2", "--probes", "2", "--rabbitmqctl", str(ctl)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NOTIFY_SOCKET": ""},
        )  # fmt: skip
    try:
        wait_for(out, "peers: none (a cluster of one)")
        # Two nodes join: the detector reads them from the file without a restart.
        nodes = ["rabbit@127.0.0.1", "rabbit@127.0.0.2", "rabbit@127.0.0.3"]
        cluster.write_text("{[%s],[%s]}.\n" % ((",".join(f"'{n}'" for n in nodes),) * 2))
        wait_for(out, "peers: rabbit@127.0.0.2, rabbit@127.0.0.3")
        time.sleep(1)
        assert not calls.exists(), out.read_text()
        peers[1].down()
        text = wait_for(out, "disconnected")
        assert "no answer for 0.4 s: rabbit@127.0.0.3" in text
        expected = detector.DISCONNECT.format(nodes="'rabbit@127.0.0.3'")
        assert calls.read_text().splitlines() == [f"--quiet eval {expected}"]
        peers[1].up()
        wait_for(out, "answering again: rabbit@127.0.0.3")
        assert len(calls.read_text().splitlines()) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
