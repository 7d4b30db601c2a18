"""A real OpenStack control plane on this machine, for tests: keystone, placement, glance, nova
(API, conductor, scheduler, compute with the project's container driver: every server is a
systemd container booted by cloud-init) and neutron (ML2 with an agent-less port-binding driver,
L3 router plugin for floating IPs; netagent.py enforces security groups and does the routing and
NAT on this host), on a private MariaDB and RabbitMQ.

Run by scripts/local-openstack (up|down|status). Everything lives under $LOCAL_OPENSTACK_DIR
(default .cache/openstack): venvs/ (one per service, kept between runs), run/ (databases,
configuration, logs, PIDs; made anew by every `up`) and clouds.yaml (entries `local-openstack`,
a member of the project `modelserve`, and `local-openstack-admin`).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BASE = Path(os.environ.get("LOCAL_OPENSTACK_DIR") or ROOT / ".cache" / "openstack").resolve()
VENVS = Path(os.environ.get("LOCAL_OPENSTACK_VENVS") or BASE / "venvs").resolve()
RUN = BASE / "run"
STATE = RUN / "state.json"
CLOUDS = BASE / "clouds.yaml"
PYTHON = os.environ.get("LOCAL_OPENSTACK_PYTHON", "python3")

# Verified together on Debian 12 / Python 3.11 (shared/design/local-openstack.md).
SERVICES = {
    "keystone": "keystone==30.0.0",
    "placement": "openstack-placement==16.0.0",
    "glance": "glance==33.0.0",
    "nova": "nova==34.0.0",
    "neutron": "neutron==29.0.0",
}
EXTRA_PACKAGES = ["pymysql"]
PORT_NAMES = ["keystone", "placement", "glance", "nova", "neutron", "mysql", "amqp", "epmd", "dist"]
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
COMPUTE_HOST = "local-compute"
REGION = "RegionOne"
# Stop order for `down` (reverse of start); nova ignores SIGTERM for a while.
PROCESSES = [
    "mariadb",
    "rabbitmq",
    "keystone",
    "placement",
    "glance",
    "neutron-api",
    "nova-api",
    "nova-conductor",
    "nova-scheduler",
    "nova-compute",
    "netagent",
]
# The servers' disk: Debian bookworm with cloud-init, built from the project's base image.
CLOUD_IMAGE_DIR = HERE / "cloud-image"


def log(msg: str) -> None:
    print(f"local-openstack: {msg}", flush=True)


def die(msg: str) -> None:
    print(f"local-openstack: ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


# --- installation ---------------------------------------------------------------------------------
def venv_bin(service: str, name: str) -> str:
    return str(VENVS / service / "bin" / name)


def install() -> None:
    """One venv per service, rebuilt only when its pinned requirement changes."""
    VENVS.mkdir(parents=True, exist_ok=True)
    for service, spec in SERVICES.items():
        venv = VENVS / service
        want = " ".join([spec, *EXTRA_PACKAGES])
        stamp = venv / ".installed"
        if stamp.exists() and stamp.read_text().strip() == want:
            continue
        t0 = time.monotonic()
        log(f"installing {want} into {venv}")
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([PYTHON, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, spec, *EXTRA_PACKAGES], check=True)
        stamp.write_text(want + "\n")
        log(f"{service} installed in {time.monotonic() - t0:.0f} s")
    install_bindall_driver()
    install_compute_driver()


def install_compute_driver() -> None:
    """Our nova compute driver: nova loads drivers from its nova.virt package only."""
    site = next((VENVS / "nova" / "lib").glob("python3*/site-packages"))
    shutil.copy(HERE / "modelserve_containers.py", site / "nova" / "virt" / "modelserve_containers.py")
    shutil.copy(HERE / "modelserve_hostnet.py", site / "modelserve_hostnet.py")


def docker_arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def cloud_image() -> str:
    return f"modelserve/debian-cloud:bookworm-{docker_arch()}"


def build_cloud_image() -> None:
    """The Docker image behind the glance image: base image + cloud-init, rebuilt on recipe change."""
    recipe = hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted(CLOUD_IMAGE_DIR.iterdir()) if p.is_file())
    ).hexdigest()[:16]
    have = subprocess.run(
        ["docker", "image", "inspect", "-f", '{{ index .Config.Labels "modelserve.recipe" }}', cloud_image()],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    if have == recipe:
        return
    base = subprocess.run(
        [str(ROOT / "scripts" / "build-base-image")], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    log(f"building {cloud_image()} from {base}")
    run(
        ["docker", "build", "--build-arg", f"BASE={base}", "--label", f"modelserve.recipe={recipe}",
         "-t", cloud_image(), str(CLOUD_IMAGE_DIR)],
        "cloud-image",
    )  # fmt: skip


def install_bindall_driver() -> None:
    """Our ML2 mechanism driver, registered as an entry point in the neutron venv (no build)."""
    site = next((VENVS / "neutron" / "lib").glob("python3*/site-packages"))
    shutil.copy(HERE / "modelserve_bindall.py", site / "modelserve_bindall.py")
    dist = site / "modelserve_bindall-1.0.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: modelserve-bindall\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[neutron.ml2.mechanism_drivers]\nmodelserve_bindall = modelserve_bindall:BindAllMechanismDriver\n"
    )
    (dist / "RECORD").write_text("")


# --- processes ------------------------------------------------------------------------------------
def pidfile(name: str) -> Path:
    return RUN / "pids" / f"{name}.pid"


def spawn(name: str, argv: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
    (RUN / "logs").mkdir(parents=True, exist_ok=True)
    (RUN / "pids").mkdir(parents=True, exist_ok=True)
    out = (RUN / "logs" / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=str(cwd or RUN),
        start_new_session=True,  # own process group: `down` signals the group by this PID
    )
    pidfile(name).write_text(f"{proc.pid}\n")
    return proc.pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours is not alive
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return False


def read_pid(name: str) -> int | None:
    try:
        return int(pidfile(name).read_text().strip())
    except (OSError, ValueError):
        return None


def stop(name: str, grace: float) -> None:
    pid = read_pid(name)
    if pid is None:
        return
    if alive(pid):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            except PermissionError:
                os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.2)
            if not alive(pid):
                break
            log(f"{name} (pid {pid}) ignored SIGTERM for {grace:.0f} s: SIGKILL")
    # The group may hold children (rabbitmq's beam under its start script).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    pidfile(name).unlink(missing_ok=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for(what: str, check, timeout: float, proc_name: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: S110 - not up yet
            pass
        if proc_name:
            pid = read_pid(proc_name)
            if pid is None or not alive(pid):
                die(f"{proc_name} exited while waiting for {what}; see {RUN / 'logs' / (proc_name + '.log')}")
        time.sleep(0.5)
    die(f"timed out after {timeout:.0f} s waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback URL
            return resp.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500


def run(argv: list[str], name: str, env: dict | None = None, input_text: str | None = None) -> None:
    """A one-shot command (db sync, ...); its output goes to logs/<name>.log."""
    (RUN / "logs").mkdir(parents=True, exist_ok=True)
    with (RUN / "logs" / f"{name}.log").open("ab") as out:
        res = subprocess.run(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            input=input_text.encode() if input_text else None,
            cwd=str(RUN),
            check=False,
        )
    if res.returncode != 0:
        tail = (RUN / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
        die(f"{' '.join(argv[:3])} failed ({res.returncode}):\n{tail}")


# --- state ----------------------------------------------------------------------------------------
def new_state() -> dict:
    base = int(os.environ.get("LOCAL_OPENSTACK_PORT_BASE", "28700"))
    ports = {name: base + i for i, name in enumerate(PORT_NAMES)}
    busy = [f"{n}={p}" for n, p in ports.items() if not port_free(p)]
    if busy:
        die(f"ports in use: {', '.join(busy)} (set LOCAL_OPENSTACK_PORT_BASE to another range)")
    return {
        "ports": ports,
        "passwords": {k: secrets.token_hex(12) for k in ["db", "amqp", "admin", "service", "modelserve"]},
    }


def load_state() -> dict | None:
    try:
        return json.loads(STATE.read_text())
    except (OSError, ValueError):
        return None


def url(state: dict, service: str, path: str = "") -> str:
    return f"http://127.0.0.1:{state['ports'][service]}{path}"


# --- MariaDB and RabbitMQ -------------------------------------------------------------------------
DATABASES = ["keystone", "placement", "glance", "nova_api", "nova", "nova_cell0", "neutron"]


def db_url(state: dict, name: str) -> str:
    pw = state["passwords"]["db"]
    return f"mysql+pymysql://openstack:{pw}@127.0.0.1:{state['ports']['mysql']}/{name}?charset=utf8"


def start_mariadb(state: dict) -> None:
    datadir = RUN / "mysql"
    datadir.mkdir(parents=True)
    sock = RUN / "mysql.sock"
    run(
        [
            "mariadb-install-db",
            "--no-defaults",
            f"--datadir={datadir}",
            "--user=root",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
        ],
        "mariadb-install",
    )
    spawn(
        "mariadb",
        [
            shutil.which("mariadbd") or "/usr/sbin/mariadbd",
            "--no-defaults",
            f"--datadir={datadir}",
            f"--socket={sock}",
            f"--port={state['ports']['mysql']}",
            "--bind-address=127.0.0.1",
            "--user=root",
            f"--pid-file={RUN / 'mysql.pid'}",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--max-connections=1000",
            "--innodb-buffer-pool-size=128M",
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0",
            "--character-set-server=utf8mb4",
            f"--log-error={RUN / 'logs' / 'mariadb-error.log'}",
        ],
    )
    wait_for("MariaDB", lambda: sock.exists() and not port_free(state["ports"]["mysql"]), 60, "mariadb")
    pw = state["passwords"]["db"]
    sql = "".join(f"CREATE DATABASE {d} CHARACTER SET utf8mb4;" for d in DATABASES)
    sql += f"CREATE USER 'openstack'@'%' IDENTIFIED BY '{pw}'; GRANT ALL ON *.* TO 'openstack'@'%';"
    run(["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", sql], "mariadb-setup")


def rabbit_env(state: dict) -> dict:
    base = RUN / "rabbitmq"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env.update(
        HOME=str(base / "home"),  # the Erlang cookie lives here, not in root's home
        RABBITMQ_NODENAME=f"localopenstack{state['ports']['amqp']}@localhost",
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(state["ports"]["amqp"]),
        RABBITMQ_DIST_PORT=str(state["ports"]["dist"]),
        ERL_EPMD_PORT=str(state["ports"]["epmd"]),
        ERL_EPMD_ADDRESS="127.0.0.1",
        RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
        RABBITMQ_LOG_BASE=str(base / "log"),
        RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
        RABBITMQ_PID_FILE=str(base / "rabbitmq.pid"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
    )
    return env


def start_rabbitmq(state: dict) -> None:
    base = RUN / "rabbitmq"
    for sub in ("home", "mnesia", "log"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{state['ports']['amqp']}\n"
        "disk_free_limit.absolute = 50MB\nvm_memory_high_watermark.relative = 0.2\n"
        "log.console = false\nlog.file.level = warning\n"
    )
    (base / "enabled_plugins").write_text("[].\n")
    env = rabbit_env(state)
    spawn("rabbitmq", [RABBITMQ_SERVER], env=env, cwd=base)


def setup_rabbitmq(state: dict) -> None:
    env = rabbit_env(state)
    node = env["RABBITMQ_NODENAME"]

    def ctl(*args: str) -> None:
        run([RABBITMQCTL, "-n", node, *args], "rabbitmq-setup", env=env)

    wait_for(
        "RabbitMQ",
        lambda: (
            subprocess.run(
                [RABBITMQCTL, "-n", node, "await_startup", "--timeout", "5"],
                env=env,
                capture_output=True,
                check=False,
            ).returncode
            == 0
        ),
        120,
        "rabbitmq",
    )
    ctl("add_user", "openstack", state["passwords"]["amqp"])
    for vhost in ("nova", "neutron"):
        ctl("add_vhost", vhost)
        ctl("set_permissions", "-p", vhost, "openstack", ".*", ".*", ".*")


def transport_url(state: dict, vhost: str) -> str:
    return f"rabbit://openstack:{state['passwords']['amqp']}@127.0.0.1:{state['ports']['amqp']}/{vhost}"


# --- configuration --------------------------------------------------------------------------------
def ini(sections: dict[str, dict]) -> str:
    out = []
    for section, values in sections.items():
        out.append(f"[{section}]")
        out += [f"{k} = {v}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


def auth_section(state: dict, user: str, **extra) -> dict:
    return {
        "auth_type": "password",
        "auth_url": url(state, "keystone", "/v3"),
        "username": user,
        "password": state["passwords"]["service"],
        "project_name": "service",
        "user_domain_name": "Default",
        "project_domain_name": "Default",
        "region_name": REGION,
        **extra,
    }


def authtoken(state: dict, user: str) -> dict:
    return {"www_authenticate_uri": url(state, "keystone", "/v3"), "service_token_roles_required": "true"} | (
        auth_section(state, user)
    )


def write_configs(state: dict) -> None:
    conf = RUN / "etc"
    for sub in ("keystone", "placement", "glance", "nova", "neutron"):
        (conf / sub).mkdir(parents=True, exist_ok=True)
    for sub in (
        "keystone/fernet-keys",
        "keystone/credential-keys",
        "glance/images",
        "glance/staging",
        "glance/tasks",
        "nova/lock",
        "neutron/lock",
    ):
        (RUN / "data" / sub).mkdir(parents=True, exist_ok=True)
    logging = {"debug": "false", "use_stderr": "true"}

    (conf / "keystone" / "keystone.conf").write_text(
        ini(
            {
                "DEFAULT": logging,
                "database": {"connection": db_url(state, "keystone")},
                "token": {"provider": "fernet", "expiration": "86400"},
                "fernet_tokens": {"key_repository": RUN / "data/keystone/fernet-keys"},
                "fernet_receipts": {"key_repository": RUN / "data/keystone/fernet-keys"},
                "credential": {"key_repository": RUN / "data/keystone/credential-keys"},
                # In-process cache, and the cheapest bcrypt: every service call authenticates.
                "cache": {"enabled": "true", "backend": "oslo_cache.dict"},
                "identity": {"password_hash_rounds": "4"},
            }
        )
    )
    (conf / "placement" / "placement.conf").write_text(
        ini(
            {
                "DEFAULT": logging,
                "placement_database": {"connection": db_url(state, "placement")},
                "api": {"auth_strategy": "keystone"},
                "keystone_authtoken": authtoken(state, "placement"),
            }
        )
    )
    glance_etc = VENVS / "glance" / "etc" / "glance"
    shutil.copy(glance_etc / "glance-api-paste.ini", conf / "glance" / "glance-api-paste.ini")
    (conf / "glance" / "glance-api.conf").write_text(
        ini(
            {
                "DEFAULT": {**logging, "enabled_backends": "fs:file"},
                "database": {"connection": db_url(state, "glance")},
                "keystone_authtoken": authtoken(state, "glance"),
                "paste_deploy": {"flavor": "keystone"},
                "glance_store": {"default_backend": "fs"},
                "fs": {"filesystem_store_datadir": RUN / "data/glance/images"},
                "os_glance_staging_store": {"filesystem_store_datadir": RUN / "data/glance/staging"},
                "os_glance_tasks_store": {"filesystem_store_datadir": RUN / "data/glance/tasks"},
                "oslo_concurrency": {"lock_path": RUN / "data/glance"},
            }
        )
    )
    shutil.copy(VENVS / "nova" / "etc" / "nova" / "api-paste.ini", conf / "nova" / "api-paste.ini")
    (conf / "nova" / "nova.conf").write_text(
        ini(
            {
                "DEFAULT": {
                    **logging,
                    "transport_url": transport_url(state, "nova"),
                    "compute_driver": "modelserve_containers.ContainerDriver",
                    "host": COMPUTE_HOST,
                    "my_ip": "127.0.0.1",
                    "state_path": RUN / "data/nova",
                },
                "api": {"auth_strategy": "keystone"},
                "wsgi": {"api_paste_config": conf / "nova" / "api-paste.ini"},
                "api_database": {"connection": db_url(state, "nova_api")},
                "database": {"connection": db_url(state, "nova")},
                "keystone_authtoken": authtoken(state, "nova"),
                "placement": auth_section(state, "placement", valid_interfaces="public"),
                "neutron": auth_section(state, "neutron", valid_interfaces="public"),
                "glance": auth_section(state, "glance", valid_interfaces="public"),
                # Neutron lets a project member delete a compute port only with a service token.
                "service_user": auth_section(state, "nova", send_service_user_token="true"),  # noqa: S106
                "modelserve_containers": {
                    "default_image": cloud_image(),
                    "instances_path": RUN / "data/instances",
                },
                "vnc": {"enabled": "false"},
                "conductor": {"workers": "1"},
                "scheduler": {"workers": "1", "discover_hosts_in_cells_interval": "10"},
                "oslo_concurrency": {"lock_path": RUN / "data/nova/lock"},
                "oslo_messaging_notifications": {"driver": "noop"},
            }
        )
    )
    shutil.copy(VENVS / "neutron" / "etc" / "neutron" / "api-paste.ini", conf / "neutron" / "api-paste.ini")
    (conf / "neutron" / "neutron.conf").write_text(
        ini(
            {
                "DEFAULT": {
                    **logging,
                    "core_plugin": "ml2",
                    "service_plugins": "router",
                    "transport_url": transport_url(state, "neutron"),
                    "auth_strategy": "keystone",
                    "state_path": RUN / "data/neutron",
                    "api_paste_config": conf / "neutron" / "api-paste.ini",
                    "notify_nova_on_port_status_changes": "true",
                    "notify_nova_on_port_data_changes": "true",
                    "allow_overlapping_ips": "true",
                    "dhcp_agent_notification": "false",
                },
                "database": {"connection": db_url(state, "neutron")},
                "keystone_authtoken": authtoken(state, "neutron"),
                "nova": auth_section(state, "nova"),
                "oslo_concurrency": {"lock_path": RUN / "data/neutron/lock"},
                "oslo_messaging_notifications": {"driver": "noop"},
            }
        )
    )
    (conf / "neutron" / "ml2_conf.ini").write_text(
        ini(
            {
                "ml2": {
                    "type_drivers": "flat,vxlan",
                    "tenant_network_types": "vxlan",
                    "mechanism_drivers": "modelserve_bindall",
                    "extension_drivers": "port_security",
                },
                "ml2_type_flat": {"flat_networks": "public"},
                "ml2_type_vxlan": {"vni_ranges": "1:1000"},
            }
        )
    )


def service_env(state: dict) -> dict[str, dict]:
    conf = RUN / "etc"
    return {
        "keystone": {
            "OS_KEYSTONE_CONFIG_DIR": str(conf / "keystone"),
            "OS_KEYSTONE_CONFIG_FILES": "keystone.conf",
        },
        "placement": {"OS_PLACEMENT_CONFIG_DIR": str(conf / "placement")},
        "glance": {"OS_GLANCE_CONFIG_DIR": str(conf / "glance")},
        "nova": {"OS_NOVA_CONFIG_DIR": str(conf / "nova"), "OS_NOVA_CONFIG_FILES": "api-paste.ini;nova.conf"},
        "neutron": {
            "OS_NEUTRON_CONFIG_DIR": str(conf / "neutron"),
            "OS_NEUTRON_CONFIG_FILES": "neutron.conf;ml2_conf.ini",
        },
    }


def serve(state: dict, name: str, service: str, module: str, port_name: str) -> None:
    spawn(
        name,
        [venv_bin(service, "python"), str(HERE / "wsgi_serve.py"), module, str(state["ports"][port_name])],
        env=service_env(state)[service],
    )


# --- keystone and the catalog ---------------------------------------------------------------------
def keystone_up(state: dict) -> None:
    kconf = ["--config-file", str(RUN / "etc" / "keystone" / "keystone.conf")]
    km = venv_bin("keystone", "keystone-manage")
    run([km, *kconf, "db_sync"], "keystone-manage")
    run(
        [km, *kconf, "fernet_setup", "--keystone-user", "root", "--keystone-group", "root"], "keystone-manage"
    )
    run(
        [km, *kconf, "credential_setup", "--keystone-user", "root", "--keystone-group", "root"],
        "keystone-manage",
    )
    kurl = url(state, "keystone", "/v3")
    run(
        [
            km,
            *kconf,
            "bootstrap",
            "--bootstrap-password",
            state["passwords"]["admin"],
            "--bootstrap-admin-url",
            kurl,
            "--bootstrap-internal-url",
            kurl,
            "--bootstrap-public-url",
            kurl,
            "--bootstrap-region-id",
            REGION,
        ],
        "keystone-manage",
    )
    serve(state, "keystone", "keystone", "keystone.wsgi.api", "keystone")
    wait_for("keystone", lambda: http_ok(url(state, "keystone", "/v3")), 120, "keystone")


def admin_conn(state: dict):
    import openstack  # the controller venv's openstacksdk

    return openstack.connect(
        auth_url=url(state, "keystone", "/v3"),
        username="admin",
        password=state["passwords"]["admin"],
        project_name="admin",
        user_domain_name="Default",
        project_domain_name="Default",
        region_name=REGION,
        identity_api_version="3",
    )


def catalog(state: dict) -> None:
    conn = admin_conn(state)
    idn = conn.identity
    service_project = idn.create_project(name="service", domain_id="default")
    roles = {r.name: r for r in idn.roles()}
    if "service" not in roles:
        roles["service"] = idn.create_role(name="service")
    for user in ("nova", "neutron", "placement", "glance"):
        u = idn.create_user(name=user, password=state["passwords"]["service"], domain_id="default")
        for role in ("admin", "service"):
            idn.assign_project_role_to_user(service_project, u, roles[role])
    for name, kind, port_name, path in [
        ("nova", "compute", "nova", "/v2.1"),
        ("neutron", "network", "neutron", ""),
        ("glance", "image", "glance", ""),
        ("placement", "placement", "placement", ""),
    ]:
        svc = idn.create_service(name=name, type=kind)
        for interface in ("public", "internal"):
            idn.create_endpoint(
                service_id=svc.id, interface=interface, url=url(state, port_name, path), region_id=REGION
            )
    # The tenant the tests provision into: a plain member, like a real project's user.
    project = idn.create_project(name="modelserve", domain_id="default")
    user = idn.create_user(name="modelserve", password=state["passwords"]["modelserve"], domain_id="default")
    for role in ("member", "reader"):
        if role in roles:
            idn.assign_project_role_to_user(project, user, roles[role])
    state["project_id"] = project.id


# --- the other services ---------------------------------------------------------------------------
def db_syncs(state: dict) -> None:
    conf = RUN / "etc"
    nconf = ["--config-file", str(conf / "nova" / "nova.conf")]
    nm = venv_bin("nova", "nova-manage")

    def nova() -> None:
        run([nm, *nconf, "api_db", "sync"], "nova-manage")
        run(
            [nm, *nconf, "cell_v2", "map_cell0", "--database_connection", db_url(state, "nova_cell0")],
            "nova-manage",
        )
        run([nm, *nconf, "cell_v2", "create_cell", "--name", "cell1", "--verbose"], "nova-manage")
        run([nm, *nconf, "db", "sync"], "nova-manage")

    def neutron() -> None:
        run(
            [
                venv_bin("neutron", "neutron-db-manage"),
                "--config-file",
                str(conf / "neutron" / "neutron.conf"),
                "--config-file",
                str(conf / "neutron" / "ml2_conf.ini"),
                "upgrade",
                "heads",
            ],
            "neutron-db-manage",
        )

    def placement() -> None:
        run(
            [
                venv_bin("placement", "placement-manage"),
                "--config-file",
                str(conf / "placement" / "placement.conf"),
                "db",
                "sync",
            ],
            "placement-manage",
        )

    def glance() -> None:
        run(
            [
                venv_bin("glance", "glance-manage"),
                "--config-file",
                str(conf / "glance" / "glance-api.conf"),
                "db_sync",
            ],
            "glance-manage",
        )

    # Two at a time: the machine has two cores and neighbours.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for f in [pool.submit(fn) for fn in (neutron, nova, placement, glance)]:
            f.result()


def services_up(state: dict) -> None:
    nova_env = service_env(state)["nova"]
    nconf = ["--config-file", str(RUN / "etc" / "nova" / "nova.conf")]
    serve(state, "placement", "placement", "placement.wsgi.api", "placement")
    serve(state, "glance", "glance", "glance.wsgi.api", "glance")
    serve(state, "neutron-api", "neutron", "neutron.wsgi.api", "neutron")
    serve(state, "nova-api", "nova", "nova.wsgi.osapi_compute", "nova")
    for name in ("nova-conductor", "nova-scheduler", "nova-compute"):
        spawn(name, [venv_bin("nova", name), *nconf], env=nova_env)

    for name, port_name in [
        ("placement", "placement"),
        ("glance", "glance"),
        ("neutron-api", "neutron"),
        ("nova-api", "nova"),
    ]:
        wait_for(name, lambda p=port_name: http_ok(url(state, p, "/")), 180, name)

    conn = admin_conn(state)

    def compute_up() -> bool:
        return any(s.binary == "nova-compute" and s.state == "up" for s in conn.compute.services())

    wait_for("nova-compute to report up", compute_up, 180, "nova-compute")
    nm = venv_bin("nova", "nova-manage")

    def hypervisor() -> bool:
        run([nm, *nconf, "cell_v2", "discover_hosts"], "nova-manage")
        return any(True for _ in conn.compute.hypervisors())

    wait_for("the hypervisor", hypervisor, 120, "nova-compute")


# --- seed -----------------------------------------------------------------------------------------
IMAGE = "debian-12-cloud"
FLAVORS = [("m1.tiny", 1, 512, 1), ("m1.small", 1, 2048, 10)]
TENANT_NETWORK = "modelserve-test"
TENANT_CIDR = "10.99.0.0/24"
# The external network is a bridge on this host (netagent.py): its range must not be routed
# anywhere else from here (a documentation range such as 203.0.113.0/24 may be the package proxy's).
PUBLIC_CIDR = "10.231.0.0/24"
PUBLIC_GATEWAY = "10.231.0.1"


def seed(state: dict) -> None:
    conn = admin_conn(state)
    project_id = state["project_id"]
    for name, vcpus, ram, disk in FLAVORS:
        conn.compute.create_flavor(name=name, vcpus=vcpus, ram=ram, disk=disk, is_public=True)
    # A placeholder disk: the compute driver boots the Docker image [modelserve_containers] names.
    image_file = RUN / "data" / "image.raw"
    image_file.write_bytes(b"\0" * (1 << 20))
    image = conn.image.create_image(
        name=IMAGE,
        filename=str(image_file),
        disk_format="raw",
        container_format="bare",
        visibility="public",
        wait=True,
    )
    conn.image.wait_for_status(image, status="active", wait=120)
    public = conn.network.create_network(
        name="public",
        is_router_external=True,
        provider_network_type="flat",
        provider_physical_network="public",
    )
    conn.network.create_subnet(
        name="public-subnet",
        network_id=public.id,
        ip_version=4,
        cidr=PUBLIC_CIDR,
        is_dhcp_enabled=False,
        gateway_ip=PUBLIC_GATEWAY,
        allocation_pools=[{"start": "10.231.0.10", "end": "10.231.0.250"}],
    )
    tenant = conn.network.create_network(name=TENANT_NETWORK, project_id=project_id)
    subnet = conn.network.create_subnet(
        name=f"{TENANT_NETWORK}-subnet",
        network_id=tenant.id,
        project_id=project_id,
        ip_version=4,
        cidr=TENANT_CIDR,
        is_dhcp_enabled=False,
    )
    router = conn.network.create_router(
        name="modelserve-router", project_id=project_id, external_gateway_info={"network_id": public.id}
    )
    conn.network.add_interface_to_router(router, subnet_id=subnet.id)


def write_clouds(state: dict) -> None:
    common = {
        "auth_url": url(state, "keystone", "/v3"),
        "user_domain_name": "Default",
        "project_domain_name": "Default",
    }
    clouds = {
        "clouds": {
            "local-openstack": {
                "auth": {
                    **common,
                    "username": "modelserve",
                    "password": state["passwords"]["modelserve"],
                    "project_name": "modelserve",
                },
                "region_name": REGION,
                "identity_api_version": 3,
                "interface": "public",
            },
            "local-openstack-admin": {
                "auth": {
                    **common,
                    "username": "admin",
                    "password": state["passwords"]["admin"],
                    "project_name": "admin",
                },
                "region_name": REGION,
                "identity_api_version": 3,
                "interface": "public",
            },
        }
    }
    CLOUDS.write_text(json.dumps(clouds, indent=2) + "\n")  # JSON is YAML
    CLOUDS.chmod(0o600)


# --- commands -------------------------------------------------------------------------------------
def running(state: dict | None) -> dict[str, bool]:
    return {name: (pid := read_pid(name)) is not None and alive(pid) for name in PROCESSES}


def check_public_cidr() -> None:
    """Refuse to shadow a route this machine uses (the package mirror, Docker's networks)."""
    public = ipaddress.ip_network(PUBLIC_CIDR)
    listed = subprocess.run(["ip", "-j", "route"], capture_output=True, text=True, check=True).stdout
    for route in json.loads(listed):
        dst, dev = route.get("dst", ""), route.get("dev", "")
        shadowed = dst not in ("", "default") and ipaddress.ip_network(dst, strict=False).overlaps(public)
        if shadowed and not dev.startswith("brq"):
            die(f"the external network {PUBLIC_CIDR} overlaps the route {dst} via {route.get('dev')}")
    for host in ("deb.debian.org", "pypi.org"):
        with contextlib.suppress(OSError):
            for info in socket.getaddrinfo(host, 443, socket.AF_INET):
                if ipaddress.ip_address(info[4][0]) in public:
                    die(f"the external network {PUBLIC_CIDR} holds {host}'s address {info[4][0]}")


def check_bridge_netfilter() -> None:
    """Security groups filter the servers' bridged traffic in iptables: br_netfilter must pass it."""
    for tool in ("iptables", "ip6tables"):
        switch = Path(f"/proc/sys/net/bridge/bridge-nf-call-{tool}")
        if not switch.exists():
            die("security groups need br_netfilter (modprobe br_netfilter, or a kernel with it built in)")
        if switch.read_text().strip() != "1":
            switch.write_text("1\n")


def cmd_up() -> None:
    t0 = time.monotonic()
    state = load_state()
    if state and all(running(state).values()):
        log(f"already running; clouds.yaml: {CLOUDS}")
        return
    if state and any(running(state).values()):
        log("partly running: stopping it first")
        cmd_down()
    for exe in ("mariadb-install-db", "mariadbd", "mariadb"):
        if not shutil.which(exe) and not Path(f"/usr/sbin/{exe}").exists():
            die(f"{exe} not found: apt-get install mariadb-server")
    if not Path(RABBITMQ_SERVER).exists():
        die("rabbitmq-server not found: apt-get install rabbitmq-server")
    check_public_cidr()
    check_bridge_netfilter()
    install()
    build_cloud_image()
    t1 = time.monotonic()
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    state = new_state()
    STATE.write_text(json.dumps(state))
    STATE.chmod(0o600)
    start_rabbitmq(state)  # boots while MariaDB and keystone get ready
    start_mariadb(state)
    write_configs(state)
    keystone_up(state)
    setup_rabbitmq(state)
    catalog(state)
    STATE.write_text(json.dumps(state))
    db_syncs(state)
    services_up(state)
    seed(state)
    write_clouds(state)
    # With this project's openstacksdk (the one Ansible uses), not a service venv.
    spawn("netagent", [sys.executable, str(HERE / "netagent.py"), str(RUN)])
    wait_for("the network agent's first pass", lambda: (RUN / "netagent.alive").exists(), 60, "netagent")
    log(f"up in {time.monotonic() - t0:.0f} s (install {t1 - t0:.0f} s); clouds.yaml: {CLOUDS}")
    log("clouds: local-openstack (project modelserve), local-openstack-admin")


def cmd_down() -> None:
    state = load_state()
    for name in reversed(PROCESSES):
        stop(name, grace=5 if name.startswith("nova") else 15)
    if state:
        epmd = shutil.which("epmd") or next(iter(Path("/usr/lib/erlang").glob("erts-*/bin/epmd")), None)
        if epmd:
            subprocess.run(
                [str(epmd), "-port", str(state["ports"]["epmd"]), "-kill"], capture_output=True, check=False
            )
    remove_servers()
    left = [n for n, up in running(state).items() if up]
    if left:
        die(f"still running: {', '.join(left)}")
    log("stopped")


def remove_servers() -> None:
    """Servers left behind (their containers), then the agent's bridges, namespaces and rules."""
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=modelserve.local-openstack.instance"],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    if ids:
        log(f"removing {len(ids)} server container(s)")
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False)
    subprocess.run([sys.executable, str(HERE / "netagent.py"), str(RUN), "--cleanup"], check=False)


def cmd_status() -> None:
    state = load_state()
    if not state:
        log("not set up (no run/state.json)")
        sys.exit(3)
    status = running(state)
    for name, up in status.items():
        pid = read_pid(name)
        print(f"{name:16} {'running' if up else 'stopped'}{f' (pid {pid})' if pid else ''}")
    for name in ("keystone", "placement", "glance", "nova", "neutron"):
        try:
            ok = http_ok(url(state, name, "/"))
        except OSError:
            ok = False
        print(f"{name + ' API':16} {url(state, name, '/')} {'answers' if ok else 'does not answer'}")
    print(f"clouds.yaml      {CLOUDS}")
    sys.exit(0 if all(status.values()) else 3)


def main() -> None:
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    commands = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "install": install}
    if cmd not in commands:
        die("usage: local-openstack up|down|status|install")
    commands[cmd]()


if __name__ == "__main__":
    main()
