"""A private local stack for the app's tests and ``bench/bench_app.py`` (not part of the package).

Starts its own RabbitMQ node (own node name, ports, epmd, data/log dirs and Erlang cookie under a
temporary directory), Celery workers and gunicorn, all bound to 127.0.0.1, and stops every process
it started. The node has the users the rabbitmq role makes, with the role's own permission regexes
(read from roles/rabbitmq/vars/main.yml): the web and the workers run with least privilege.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import modelserve
from modelserve.release import METADATA, release_files

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
# Where the role keeps the permissions of its users: the one place both read.
ROLE_VARS = Path(__file__).resolve().parents[2] / "roles" / "rabbitmq" / "vars" / "main.yml"
# The task queues the tests (modelserve.test.<8 hex digits>) and bench/bench_app.py (bench.<mode>)
# use, as a regex standing for the role's rabbitmq_task_queue.
TASK_QUEUES = r"(modelserve\.test\.[0-9a-f]{8}|bench\.[a-z-]+)"


def role_permissions(task_queue_regex: str = TASK_QUEUES, remote_control: bool = False) -> dict:
    """{user: (configure, write, read)} of roles/rabbitmq for these task queues.

    The role templates its regexes with two variables only ({{ __rabbitmq_q }}, the escaped task
    queue name, and {{ __rabbitmq_remote_control }}); they are replaced here the same way.
    """
    import yaml

    data = yaml.safe_load(ROLE_VARS.read_text(encoding="utf-8"))
    remote = data["__rabbitmq_remote_control_regex"] if remote_control else ""
    out = {}
    for user, perms in data["__rabbitmq_permissions"].items():
        regexes = tuple(
            perms[kind]
            .replace("{{ __rabbitmq_q }}", task_queue_regex)
            .replace("{{ __rabbitmq_remote_control }}", remote)
            for kind in ("configure", "write", "read")
        )
        if any("{{" in r for r in regexes):
            raise ValueError(f"{ROLE_VARS}: a placeholder this reader does not know in {regexes}")
        out[user] = regexes
    return out


def rabbitmq_available() -> bool:
    return os.access(RABBITMQ_SERVER, os.X_OK) and os.access(RABBITMQCTL, os.X_OK)


def make_tls(out: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (ECC P-256 PEMs),
    the way roles/pki makes them for the brokers and the web/worker hosts."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(cn, key, ca_key, ca_name, *, ca=False, usage=None, sans=()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_name or name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(ca_key or key, hashes.SHA256())

    files: dict[str, str] = {}

    def write(stem: str, cert, key) -> None:
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (out / f"{stem}.key.pem").write_bytes(key_pem)
        (out / f"{stem}.key.pem").chmod(0o600)
        files[stem], files[f"{stem}_key"] = str(out / f"{stem}.pem"), str(out / f"{stem}.key.pem")

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = issue("devstack CA", ca_key, None, None, ca=True)
    write("ca", ca_cert, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    server = issue(
        "localhost", server_key, ca_key, ca_cert.subject, usage=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans
    )
    write("server", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue(
        "devstack client", client_key, ca_key, ca_cert.subject, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    write("client", client, client_key)
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RabbitMQ:
    """The node and its users: ``web`` and ``worker`` with the role's permissions, ``worker_rc`` the
    worker's with Celery remote control allowed (rabbitmq_celery_remote_control), and ``admin``
    (``.*``) for what the tests themselves do (declare a queue, read what was parked)."""

    ROLES = ("web", "worker", "worker_rc", "admin")

    def __init__(self, base: Path, task_queues: str = TASK_QUEUES) -> None:
        self.base = Path(base)
        self.port = free_port()
        self.tls_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"ms{secrets.token_hex(4)}@localhost"
        self.vhost = "modelserve"
        self.task_queues = task_queues
        tag = secrets.token_hex(3)
        # token_hex never starts with "-" (rabbitmqctl would read an option)
        self.users = {role: (f"modelserve_{role}_{tag}", secrets.token_hex(18)) for role in self.ROLES}
        self.proc: subprocess.Popen | None = None
        self.env = self._env()

    def _env(self) -> dict[str, str]:
        home = self.base / "home"
        for sub in ("home", "mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        # Also AMQP over TLS, as the rabbitmq role serves it: verify_peer + fail_if_no_peer_cert.
        self.tls = make_tls(self.base / "tls")
        conf = self.base / "rabbitmq.conf"
        conf.write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
            f"ssl_options.cacertfile = {self.tls['ca']}\n"
            f"ssl_options.certfile = {self.tls['server']}\n"
            f"ssl_options.keyfile = {self.tls['server_key']}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
            "disk_free_limit.absolute = 50MB\n"
            "vm_memory_high_watermark.relative = 0.3\n"
            "log.console = false\n"
            "log.file.level = warning\n",
            encoding="utf-8",
        )
        (self.base / "enabled_plugins").write_text("[].\n", encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(home),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_CONFIG_FILE=str(conf),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.base / "rabbitmq.pid"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base / "advanced.config"),
        )
        return env

    def permissions(self) -> dict[str, tuple[str, str, str]]:
        perms = role_permissions(self.task_queues)
        return {
            "web": perms["web"],
            "worker": perms["worker"],
            "worker_rc": role_permissions(self.task_queues, remote_control=True)["worker"],
            "admin": (".*", ".*", ".*"),
        }

    def url_for(self, role: str, tls: bool = False, port: int | None = None) -> str:
        user, password = self.users[role]
        scheme, default = ("amqps", self.tls_port) if tls else ("amqp", self.port)
        return f"{scheme}://{user}:{password}@127.0.0.1:{port or default}/{self.vhost}"

    def urls(self, tls: bool = False, worker: str = "worker") -> dict[str, str]:
        """The broker URL of each component: the web's user, and the workers' (``worker_rc``: with
        remote control allowed)."""
        return {"web": self.url_for("web", tls), "worker": self.url_for(worker, tls)}

    @property
    def admin_url(self) -> str:
        return self.url_for("admin")

    def tls_env(self, client_cert: bool = True) -> dict[str, str]:
        """The MODELSERVE_BROKER_TLS_* settings of a client of tls_url."""
        env = {"MODELSERVE_BROKER_TLS_CA": self.tls["ca"]}
        if client_cert:
            env.update(
                MODELSERVE_BROKER_TLS_CERT=self.tls["client"],
                MODELSERVE_BROKER_TLS_KEY=self.tls["client_key"],
            )
        return env

    def ctl(self, *args: str, stdin: str | None = None, timeout: float = 60) -> str:
        proc = subprocess.run(
            [RABBITMQCTL, "-n", self.node, *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def start(self, timeout: float = 90) -> RabbitMQ:
        log = (self.base / "server.out").open("wb")
        self.proc = subprocess.Popen(
            [RABBITMQ_SERVER],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"rabbitmq-server exited: {(self.base / 'server.out').read_text()[-2000:]}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                break
            time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError(f"rabbitmq-server did not listen on {self.port} within {timeout}s")
        try:
            self.ctl("await_startup", timeout=timeout)
            self.ctl("add_vhost", self.vhost)
            for role, (configure, write, read) in self.permissions().items():
                user, password = self.users[role]
                self.ctl("add_user", user, password)
                self.ctl("set_permissions", "-p", self.vhost, user, configure, write, read)
            with contextlib.suppress(RuntimeError):
                self.ctl("delete_user", "guest")
        except BaseException:
            self.stop()  # a node that came up half-way (e.g. rabbitmqctl timed out) is not left running
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.ctl("stop", timeout=30)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # The private epmd (own port) was started by this node: stop it too.
        epmd = shutil.which("epmd") or "/usr/bin/epmd"
        with contextlib.suppress(Exception):
            subprocess.run(
                [epmd, "-port", str(self.epmd_port), "-kill"], capture_output=True, timeout=10, check=False
            )


def stack_env(broker_url: str, model_dir: Path, bind: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
    # Subprocesses import this same modelserve, installed or not (e.g. a checkout on sys.path),
    # and the support modules beside this one (the naive worker).
    src = str(Path(modelserve.__file__).resolve().parents[1])
    paths = (src, str(Path(__file__).resolve().parent), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(
        MODELSERVE_BROKER_URL=broker_url,
        MODELSERVE_MODEL_DIR=str(model_dir),
        MODELSERVE_BIND=bind,
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    env.update(extra)
    return env


def _start(module: str, env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    """Run `module`'s console-script main() in its own session, output appended to `log`."""
    code = f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *extra],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _own_metrics(env: dict[str, str], log: Path, worker: bool) -> dict[str, str]:
    """Each process its own multiprocess directory (beside its log) and, a worker, its own port."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(log.with_suffix(".metrics")), **env}
    if worker:
        env.setdefault("MODELSERVE_WORKER_METRICS_PORT", str(free_port()))
    return env


def _start_worker(module: str, env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    env = _own_metrics(env, log, worker=True)
    proc = _start(module, env, log, *extra)
    proc.metrics_url = f"http://127.0.0.1:{env['MODELSERVE_WORKER_METRICS_PORT']}/metrics"
    return proc


def start_worker(env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    return _start_worker("modelserve.worker", env, log, *extra)


def start_naive_worker(env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    """The benchmark baseline (ms_naive): loads model.keras for every task; needs TensorFlow."""
    return _start_worker("ms_naive", env, log, *extra)


def start_poison_worker(env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    """The production worker plus a task that always hands its message back (ms_poison)."""
    return _start_worker("ms_poison", env, log, *extra)


def start_web(env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    return _start("modelserve.web", _own_metrics(env, log, worker=False), log, *extra)


def wait_http(url: str, timeout: float = 30, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == status:
                    return
                last = str(resp.status)
        except Exception as exc:
            last = str(exc)
            if hasattr(exc, "code") and exc.code == status:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last: {last})")


def stop_process(proc: subprocess.Popen | None, timeout: float = 15, sig: int = signal.SIGTERM) -> None:
    """Stop a process group started by this module: ``sig`` (SIGTERM), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def install_release(model_dir: Path, source: Path, version: str | None = None) -> str:
    """Copy a release into model_dir/releases/<version> (optionally relabelled) and return the version.

    Relabelling rewrites only metadata.json's version: the model files and checksums are unchanged,
    so the copy validates; tests use it to get a second release without training again.
    """
    meta = json.loads((Path(source) / "metadata.json").read_text(encoding="utf-8"))
    if version:
        meta["version"] = version
    dest = Path(model_dir) / "releases" / meta["version"]
    dest.mkdir(parents=True)
    for name in release_files(meta):
        if name != METADATA:
            shutil.copy2(Path(source) / name, dest / name)
    (dest / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta["version"]
