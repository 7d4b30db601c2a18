"""Shared fixtures: a private Mosquitto broker per test, polling helpers, module processes."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Broker:
    def __init__(self, directory: Path, port: int | None = None):
        self.directory = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = directory / "mosquitto.log"
        self.listener: list[str] = []  # settings of the listener (TLS files)
        self.anonymous = True
        self.users: dict[str, str] = {}  # password_file entries
        self.acl: list[str] = []  # acl_file lines

    def start(self) -> Broker:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", *self.listener]
        lines += [f"allow_anonymous {str(self.anonymous).lower()}", "persistence false"]
        if self.users:
            passwd = self.directory / "passwd"
            passwd.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            subprocess.run(
                [shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-U", str(passwd)], check=True
            )
            lines.append(f"password_file {passwd}")
        if self.acl:
            (self.directory / "acl").write_text("\n".join(self.acl) + "\n")
            lines.append(f"acl_file {self.directory / 'acl'}")
        if os.geteuid() == 0:
            lines.append("user root")  # do not drop to the 'mosquitto' user (tmp files stay readable)
        conf.write_text("\n".join(lines) + "\n")
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)

        def accepting():
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_until(accepting, 10, f"mosquitto on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def broker_factory(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("mosquitto binary not found (apt-get install mosquitto)")
    brokers: list[Broker] = []

    def make(name: str = "broker", port: int | None = None) -> Broker:
        b = Broker(tmp_path / name, port)
        brokers.append(b)
        return b

    yield make
    for b in brokers:
        b.stop()


def make_pki(directory: Path, name: str = "ca") -> dict[str, Path]:
    """A throw-away CA and a server certificate for localhost/127.0.0.1 signed by it (openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / f"{name}.pem", directory / f"{name}.key"
    cert, key, csr = (
        directory / f"{name}-server.pem",
        directory / f"{name}-server.key",
        directory / "server.csr",
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = functools.partial(subprocess.run, check=True, capture_output=True)
    run(["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", f"/CN={name}"])
    run(["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"])
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext])  # fmt: skip
    return {"ca": ca, "cert": cert, "key": key}


@pytest.fixture
def broker(broker_factory):
    return broker_factory().start()


class Collector:
    """A test-side MQTT subscriber recording (topic, payload)."""

    def __init__(
        self, port: int, topics: list[str], username: str | None = None, password: str | None = None
    ):
        from modelserve_edge.transport.mqtt import new_client

        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = new_client(f"test-collector-{time.monotonic_ns()}", clean_session=True)
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        if username:
            self.client.username_pw_set(username, password)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(self._subscribed.is_set, 10, f"subscription to {topics}")

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def collectors():
    made: list[Collector] = []

    def make(port: int, topics: list[str], **login) -> Collector:
        c = Collector(port, topics, **login)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


class ModuleProcess:
    def __init__(self, name: str, module: str, env: dict, log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        pythonpath = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
        full_env = {**os.environ, "PYTHONPATH": pythonpath, "EDGE_TRANSPORT": "mqtt", **env}
        full_env.pop("IOTEDGE_MODULEID", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module], env=full_env, stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def processes(tmp_path):
    started: list[ModuleProcess] = []

    def start(name: str, module: str, env: dict) -> ModuleProcess:
        p = ModuleProcess(name, module, env, tmp_path)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop(timeout=10)
