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


def test_a_peer_silent_for_the_window_is_disconnected_once_while_it_stays_silent():
    d = detector.Detector(window=3, again=30)
    d.probed(B2, True, 0)
    d.probed(B3, True, 0)
    assert d.check([B2, B3], now=1) == ([], [])
    d.probed(B3, False, 1)  # a probe started at 1 s timed out (at 4 s)
    d.probed(B2, True, 3.5)
    assert d.check([B2, B3], now=3.8) == ([], [])
    assert d.check([B2, B3], now=4) == ([B3], [])
    assert d.check([B2, B3], now=5) == ([], [])
    # Still silent much later: not disconnected again (by then it may be the heal's reconnection).
    d.probed(B3, False, 40)
    assert d.check([B2, B3], now=60) == ([], [])
    d.probed(B3, True, 61)
    assert d.check([B2, B3], now=62) == ([], [B3])  # said when it answers again
    assert d.check([B2, B3], now=63) == ([], [])
    d.probed(B3, False, 64)  # silent again later: a new partition, disconnected again
    assert d.check([B2, B3], now=67) == ([B3], [])


def test_the_tick_a_window_after_the_failed_probes_tick_finds_the_peer_silent():
    # The loop ticks at 10.0, 11.0, ...; the probe sent at the 11.0 tick started a hair later.
    d = detector.Detector(window=3, again=30)
    d.probed(B2, True, 10.0004)
    d.probed(B2, False, 11.0004)
    assert d.check([B2], now=13.9) == ([], [])
    assert d.check([B2], now=14.0) == ([B2], [])


def test_a_disconnect_that_failed_is_tried_again_later():
    d = detector.Detector(window=3, again=30)
    d.probed(B2, False, 0)
    assert d.check([B2], now=3) == ([B2], [])
    d.disconnect_failed([B2], now=4)  # rabbitmqctl failed or timed out
    assert d.check([B2], now=33.9) == ([], [])
    assert d.check([B2], now=34) == ([B2], [])
    assert d.check([B2], now=35) == ([], [])  # and once more only if that one failed too


def test_a_refused_connect_is_an_answer_so_a_restarting_node_is_left_to_erlang(free_port):
    # Nothing listens on the port: the host answers with a refusal, at once.
    started = time.monotonic()
    assert detector.answers("127.0.0.1", free_port, timeout=3)
    assert time.monotonic() - started < 1


def test_no_evidence_no_verdict_a_detector_that_stalled_disconnects_nothing():
    d = detector.Detector(window=3, again=30)
    d.probed(B2, True, 0)
    # The detector was not scheduled for 10 s (a busy host): no probe completed in between.
    assert d.check([B2], now=10) == ([], [])
    d.probed(B2, True, 1)  # the probe of 1 s completes late, answered
    assert d.check([B2], now=10.5) == ([], [])


def test_an_answer_to_an_older_probe_does_not_clear_a_newer_failure():
    d = detector.Detector(window=3, again=30)
    d.probed(B2, False, 5)
    d.probed(B2, True, 4)  # started before the failed one: says nothing about after 5 s
    assert d.check([B2], now=8) == ([B2], [])


def test_both_peers_silent_are_disconnected_together_and_a_departed_peer_is_forgotten():
    d = detector.Detector(window=2, again=20)
    d.probed(B2, False, 0)
    d.probed(B3, False, 0)
    assert d.check([B2, B3], now=2) == ([B2, B3], [])
    assert d.check([B2], now=3) == ([], [])  # B3 left the cluster
    assert B3 not in d.silent_since and B3 not in d.reported and B3 not in d.failed


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

    def silent(self):
        """Drops every SYN, as a host behind a partition does: a listener whose queue is full."""
        self.sock = socket.create_server((self.address, self.port), backlog=0)
        self.filler = socket.create_connection((self.address, self.port))
        return self


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
             "--port", str(free_port), "--interval", "0.2", "--probes", "2", "--rabbitmqctl", str(ctl),
             "--erl", ""],  # rabbitmqctl only: there is no Erlang node to talk to
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
        peers[1].down()  # refused: the node is down, Erlang knows, nothing to do
        time.sleep(1.5)
        assert not calls.exists(), out.read_text()
        peers[1].silent()  # now no answer at all: cut off
        text = wait_for(out, "disconnected")
        assert "no answer for 0.4 s: rabbit@127.0.0.3" in text
        expected = detector.DISCONNECT.format(nodes="'rabbit@127.0.0.3'")
        assert calls.read_text().splitlines() == [f"--quiet eval {expected}"]
        peers[1].down()
        peers[1].up()
        wait_for(out, "answering again: rabbit@127.0.0.3")
        assert len(calls.read_text().splitlines()) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def erlang_nodes(tmp_path):
    """Two real Erlang nodes, a@ and b@ this host, connected to each other, with their own cookie."""
    home = tmp_path / "home"
    home.mkdir()
    cookie = home / ".erlang.cookie"
    cookie.write_text(f"detectortest{os.getpid()}")
    cookie.chmod(0o400)
    env = {**os.environ, "HOME": str(home)}
    host = socket.gethostname().split(".")[0]
    names = [f"detector-test-{n}-{os.getpid()}@{host}" for n in ("a", "b")]
    nodes = [subprocess.Popen(["erl", "-sname", n, "-noshell", "-noinput"], env=env) for n in names]

    def call(node, expression):
        """Evaluates an expression on a node, from a throwaway hidden one."""
        remote = f"rpc:call({node!r}, erlang, apply, [fun() -> {expression} end, []])"
        code = f'io:format("~0p~n", [{remote}]), halt().'
        name = f"detector-test-c-{time.monotonic_ns()}@{host}"
        run = subprocess.run(["erl", "-sname", name, "-hidden", "-noshell", "-eval", code],
                             env=env, capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
        return run.stdout.strip()

    try:
        deadline = time.monotonic() + 30
        while call(names[0], f"net_adm:ping({names[1]!r})") != "pong":
            assert time.monotonic() < deadline, "the two test nodes did not connect"
            time.sleep(0.5)
        yield names, env, call
    finally:
        for node in nodes:
            node.kill()
            node.wait()


@pytest.fixture
def helper(erlang_nodes, monkeypatch):
    """The detector's helper node, connected to the first test node with the nodes' cookie."""
    (a, _), env, _ = erlang_nodes
    monkeypatch.setenv("HOME", env["HOME"])
    helper = detector.Helper("erl", a, net_ticktime=60)
    yield helper
    helper.stop()


def test_the_helper_node_disconnects_a_peer_the_broker_is_connected_to(erlang_nodes, helper):
    (a, b), _, call = erlang_nodes
    assert helper.ask("disconnect") == "ok []"  # connected, nothing asked
    assert call(a, "nodes()") == f"['{b}']"
    started = time.monotonic()
    assert detector.disconnect(helper, "/nonexistent/rabbitmqctl", [b, "rabbit@elsewhere"])
    assert time.monotonic() - started < 2  # no VM started for it
    assert call(a, "nodes()") == "[]"  # the hidden nodes are not listed by nodes()
    assert helper.ask("disconnect", b) == "ok []"  # not connected any more: nothing done
    # A helper that died is started again at the next request.
    helper.proc.kill()
    helper.proc.wait()
    assert call(a, f"net_adm:ping({b!r})") == "pong"
    assert helper.ask("disconnect", b) == f"ok ['{b}']"


def test_the_helper_node_reads_globals_sync_tags_and_fakes_nodedown_nodeup_in_the_running_otps_format(
    erlang_nodes, helper
):
    (a, b), _, call = erlang_nodes
    assert call(a, "global:sync()") == "ok"  # right after a connection, global syncs a while
    assert detector.global_tags(helper.ask("global")) == {}  # in step: nothing waited on
    answer = helper.ask("unblock", b)
    # Four messages sent through the broker's node, each with the connection id that OTP
    # 25.1+ (Debian 12 has 25.2) expects; RabbitMQ 3.10.8's own are {nodedown, Node}, ignored.
    assert answer.startswith("ok ["), answer
    assert answer.count("connection_id") == 4 and f"{{nodedown,'{b}'," in answer, answer
    assert call(a, "global:sync()") == "ok"  # global in step again afterwards
    registered = f"global:register_name(probe, self()), rpc:call({b!r}, global, whereis_name, [probe])"
    assert call(a, registered).startswith("<"), "a name registered on a is not known on b"
    assert detector.global_tags(helper.ask("global")) == {}


def test_a_peer_global_waits_on_for_the_whole_time_is_unblocked_and_again_only_after_as_long():
    w = detector.GlobalWatch(stuck_after=30)
    assert w.seen({}, now=0) == []
    assert w.seen({B2: "17"}, now=5) == []
    assert w.seen({B2: "18"}, now=20) == []  # a new tag: global made progress
    assert w.seen({B2: "18", B3: "4"}, now=49) == []
    assert w.seen({B2: "18", B3: "4"}, now=50) == [B2]  # the same tag for 30 s
    assert w.seen({B2: "18", B3: "4"}, now=55) == []  # asked; again only after another 30 s
    assert w.seen({B3: "4"}, now=79) == [B3]
    assert w.seen({B2: "18"}, now=80) == []  # B2 came back later: counted from now
    assert detector.global_tags("ok rabbit@b-2=-576460752303423485") == {B2: "-576460752303423485"}
    assert detector.global_tags("error nodedown") is None and detector.global_tags(None) is None


def test_without_the_helper_node_rabbitmqctl_eval_disconnects(tmp_path, capsys):
    calls = tmp_path / "calls"
    ctl = tmp_path / "rabbitmqctl"  # test double for RabbitMQ's CLI: records what it was asked
    ctl.write_text(f'#!/bin/sh\necho "$*" >> {calls}\necho "[rabbit@b-3]"\n')
    ctl.chmod(0o755)
    helper = detector.Helper(str(tmp_path / "no-erl"), "rabbit@b-1", net_ticktime=60)  # cannot start
    assert detector.disconnect(helper, str(ctl), [B3])
    assert calls.read_text().splitlines() == [f"--quiet eval {detector.DISCONNECT.format(nodes=repr(B3))}"]
    out = capsys.readouterr().out
    assert "the helper node failed" in out and "disconnected" in out
