"""Settings from the environment, optionally also from a KEY=VALUE file named by MODELSERVE_CONFIG.

The environment wins over the file, so a systemd unit can override one value of a shared file.
No credential has a default: without MODELSERVE_BROKER_URL the web and the workers refuse to start.
"""

from __future__ import annotations

import os
import shlex
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path


class ConfigError(ValueError):
    """A setting is missing or malformed."""


def parse_env_file(text: str, source: str = "<config>") -> dict[str, str]:
    """Parse env-file syntax: ``KEY=VALUE`` lines, ``#`` comments, optional ``export``, quotes."""
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key or not key.replace("_", "").isalnum() or key[0].isdigit():
            raise ConfigError(f"{source}:{lineno}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if value[:1] in ("'", '"'):
            try:
                parts = shlex.split(value, comments=False, posix=True)
            except ValueError as exc:
                raise ConfigError(f"{source}:{lineno}: {exc}") from exc
            value = parts[0] if parts else ""
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def _number(values: Mapping[str, str], key: str, default: float, minimum: float, kind: type) -> float:
    raw = values.get(key, "")
    if raw == "":
        return default
    what = "an integer" if kind is int else "a finite number"
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{key} must be {what}, got {raw!r}") from None
    if not value >= minimum or value == float("inf"):  # also refuses NaN
        raise ConfigError(f"{key} must be {what} >= {minimum:g}, got {raw!r}")
    return value


def _int(values: Mapping[str, str], key: str, default: int, minimum: int = 1) -> int:
    return int(_number(values, key, default, minimum, int))


def _float(values: Mapping[str, str], key: str, default: float, minimum: float = 0.0) -> float:
    return _number(values, key, default, minimum, float)


def _bool(values: Mapping[str, str], key: str, default: bool) -> bool:
    raw = values.get(key, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be a boolean (1/0, true/false), got {raw!r}")


@dataclass(frozen=True)
class Settings:
    broker_url: str
    model_dir: Path
    bind: str
    web_workers: int
    web_threads: int
    worker_concurrency: int
    worker_pool: str
    max_batch_rows: int
    batch_max_rows: int
    batch_wait_ms: float
    batch_max_inflight: int
    task_timeout: float
    broker_connect_timeout: float
    broker_confirm_timeout: float
    ready_timeout: float
    ready_cache_seconds: float
    model_check_interval: float
    task_queue: str
    task_max_retries: int
    task_time_limit: float
    worker_prefetch: int
    access_log: bool
    model_name: str
    status_interval: float
    task_queue_type: str
    task_delivery_limit: int
    broker_heartbeat: float
    worker_remote_control: bool
    worker_metrics_address: str
    worker_metrics_port: int
    worker_instance: int
    web_metrics_address: str
    web_metrics_port: int
    # Drift detection (modelserve.drift): the last N rows a worker predicted (0: off), and the rows
    # the window needs before the worker reports PSI and KS.
    drift_window: int = 1000
    drift_min_rows: int = 200
    broker_tls_ca: str = ""
    broker_tls_cert: str = ""
    broker_tls_key: str = ""

    def broker_ssl(self) -> TLSOptions | bool:
        """kombu's ``ssl`` for amqps:// URLs (False for amqp://): a new object for each connection.

        The broker's certificate is verified against ``broker_tls_ca``, with its name checked
        against the host of the URL the connection uses; this host's certificate and key (when
        set) are offered to brokers that require one (``fail_if_no_peer_cert``).
        """
        if not self.broker_url.startswith("amqps://"):
            return False
        options = TLSOptions(ca_certs=self.broker_tls_ca, cert_reqs=ssl.CERT_REQUIRED, server_hostname=None)
        if self.broker_tls_cert:
            options.update(certfile=self.broker_tls_cert, keyfile=self.broker_tls_key)
        return options

    @property
    def worker_metrics_bind(self) -> tuple[str, int] | None:
        """Where this worker serves /metrics: instance i of a host on port + i - 1; None when off."""
        if not self.worker_metrics_port:
            return None
        return self.worker_metrics_address, self.worker_metrics_port + self.worker_instance - 1

    @property
    def broker_urls(self) -> list[str]:
        """Every broker node's URL (MODELSERVE_BROKER_URL lists them separated by ``;``)."""
        return split_urls(self.broker_url)

    def describe(self) -> dict[str, object]:
        """Settings safe to log: the broker password is masked."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "broker_url":
                value = mask_url(value)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


class TLSOptions(dict):
    """TLS options whose ``server_hostname`` kombu fills in with each connection's broker node.

    kombu replaces a ``server_hostname`` of None with the host it connects to, but in the dict it
    was given: every later connection made with it (a failover to the next node, Celery's next
    connection) would then check the first node's name. Read as None, kombu sets it anew each time.
    """

    def __getitem__(self, key: str) -> object:
        if key == "server_hostname":
            return None
        return super().__getitem__(key)


def split_urls(value: str) -> list[str]:
    return [u.strip() for u in value.split(";") if u.strip()]


def mask_url(url: str) -> str:
    if ";" in url:
        return ";".join(mask_url(u) for u in split_urls(url))
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def load_settings(environ: Mapping[str, str] | None = None, *, require_broker: bool = True) -> Settings:
    """Read settings: the file named by MODELSERVE_CONFIG first, then the environment on top."""
    env = dict(os.environ if environ is None else environ)
    values: dict[str, str] = {}
    config_file = env.get("MODELSERVE_CONFIG", "")
    if config_file:
        path = Path(config_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"MODELSERVE_CONFIG={config_file}: {exc.strerror}") from exc
        values.update(parse_env_file(text, str(path)))
    values.update({k: v for k, v in env.items() if k.startswith("MODELSERVE_")})

    broker_url = values.get("MODELSERVE_BROKER_URL", "").strip()
    if require_broker:
        if not broker_url:
            raise ConfigError("MODELSERVE_BROKER_URL is not set (amqp://user:password@host:5672/vhost)")
        urls = split_urls(broker_url)
        if not urls or not all(u.startswith(("amqp://", "amqps://", "pyamqp://", "memory://")) for u in urls):
            raise ConfigError(
                f"MODELSERVE_BROKER_URL must be amqp:// URLs (one per broker node, separated by ';'),"
                f" got {mask_url(broker_url)}"
            )
        broker_url = ";".join(urls)
    tls = broker_tls_settings(values, split_urls(broker_url))

    bind = values.get("MODELSERVE_BIND", "") or "127.0.0.1:8080"
    pool = values.get("MODELSERVE_WORKER_POOL", "") or "threads"
    # "solo" is refused on purpose: with acks_late + prefetch it stalled under concurrent load here
    # (Celery 5.7: messages reserved but never run). threads and prefork were load-tested.
    if pool not in ("threads", "prefork"):
        raise ConfigError(f"MODELSERVE_WORKER_POOL must be threads or prefork, got {pool!r}")
    max_batch_rows = _int(values, "MODELSERVE_MAX_BATCH_ROWS", 1000)
    # quorum: replicated on every broker node, with a delivery limit and a dead-letter queue.
    # classic: the single-node queue of before (no arguments), e.g. to compare or to roll back.
    queue_type = values.get("MODELSERVE_TASK_QUEUE_TYPE", "") or "quorum"
    if queue_type not in ("quorum", "classic"):
        raise ConfigError(f"MODELSERVE_TASK_QUEUE_TYPE must be quorum or classic, got {queue_type!r}")
    metrics_port = _int(values, "MODELSERVE_WORKER_METRICS_PORT", 9810, minimum=0)
    instance = _int(values, "MODELSERVE_WORKER_INSTANCE", 1)
    if metrics_port and metrics_port + instance - 1 > 65535:
        raise ConfigError(
            "MODELSERVE_WORKER_METRICS_PORT + MODELSERVE_WORKER_INSTANCE - 1 must be a port (<= 65535),"
            f" got {metrics_port} + {instance} - 1"
        )
    web_metrics_port = _int(values, "MODELSERVE_WEB_METRICS_PORT", 0, minimum=0)
    if web_metrics_port > 65535:
        raise ConfigError(
            f"MODELSERVE_WEB_METRICS_PORT must be a port (0: off, else <= 65535), got {web_metrics_port}"
        )
    return Settings(
        broker_url=broker_url,
        model_dir=Path(values.get("MODELSERVE_MODEL_DIR", "") or "/srv/modelserve"),
        bind=bind,
        web_workers=_int(values, "MODELSERVE_WEB_WORKERS", 2),
        web_threads=_int(values, "MODELSERVE_WEB_THREADS", 32),
        worker_concurrency=_int(values, "MODELSERVE_WORKER_CONCURRENCY", 2),
        worker_pool=pool,
        max_batch_rows=max_batch_rows,
        batch_max_rows=_int(values, "MODELSERVE_BATCH_MAX_ROWS", 256),
        batch_wait_ms=_float(values, "MODELSERVE_BATCH_WAIT_MS", 0.0),
        batch_max_inflight=_int(values, "MODELSERVE_BATCH_MAX_INFLIGHT", 2),
        task_timeout=_float(values, "MODELSERVE_TASK_TIMEOUT", 5.0, minimum=0.1),
        broker_connect_timeout=_float(values, "MODELSERVE_BROKER_CONNECT_TIMEOUT", 2.0, minimum=0.1),
        broker_confirm_timeout=_float(values, "MODELSERVE_BROKER_CONFIRM_TIMEOUT", 2.0, minimum=0.1),
        ready_timeout=_float(values, "MODELSERVE_READY_TIMEOUT", 1.0, minimum=0.05),
        ready_cache_seconds=_float(values, "MODELSERVE_READY_CACHE_SECONDS", 1.0),
        model_check_interval=_float(values, "MODELSERVE_MODEL_CHECK_INTERVAL", 0.5),
        task_queue=values.get("MODELSERVE_TASK_QUEUE", "") or "modelserve.predict",
        task_max_retries=_int(values, "MODELSERVE_TASK_MAX_RETRIES", 3, minimum=0),
        task_time_limit=_float(values, "MODELSERVE_TASK_TIME_LIMIT", 30.0, minimum=1.0),
        worker_prefetch=_int(values, "MODELSERVE_WORKER_PREFETCH", 4),
        access_log=_bool(values, "MODELSERVE_ACCESS_LOG", False),
        model_name=values.get("MODELSERVE_MODEL_NAME", "") or "pima-diabetes",  # the /v2 model name
        status_interval=_float(values, "MODELSERVE_STATUS_INTERVAL", 2.0, minimum=0.2),
        task_queue_type=queue_type,
        task_delivery_limit=_int(values, "MODELSERVE_TASK_DELIVERY_LIMIT", 5),
        broker_heartbeat=_float(values, "MODELSERVE_BROKER_HEARTBEAT", 10.0),
        worker_remote_control=_bool(values, "MODELSERVE_WORKER_REMOTE_CONTROL", False),
        # The worker's own /metrics (0: none); the role binds it to the host's cluster address.
        worker_metrics_address=values.get("MODELSERVE_WORKER_METRICS_ADDRESS", "") or "127.0.0.1",
        worker_metrics_port=metrics_port,
        worker_instance=instance,
        # The web's /metrics on its own port, served by the gunicorn master (0: on the HTTP port).
        web_metrics_address=values.get("MODELSERVE_WEB_METRICS_ADDRESS", "") or "127.0.0.1",
        web_metrics_port=web_metrics_port,
        drift_window=_int(values, "MODELSERVE_DRIFT_WINDOW", 1000, minimum=0),
        drift_min_rows=_int(values, "MODELSERVE_DRIFT_MIN_ROWS", 200),
        **tls,
    )


def broker_tls_settings(values: Mapping[str, str], urls: list[str]) -> dict[str, str]:
    """The client side of the broker's TLS: all URLs amqps:// (with a CA) or none."""
    tls = {
        "broker_tls_ca": values.get("MODELSERVE_BROKER_TLS_CA", "").strip(),
        "broker_tls_cert": values.get("MODELSERVE_BROKER_TLS_CERT", "").strip(),
        "broker_tls_key": values.get("MODELSERVE_BROKER_TLS_KEY", "").strip(),
    }
    secure = [u.startswith("amqps://") for u in urls]
    if any(secure) and not all(secure):
        raise ConfigError("MODELSERVE_BROKER_URL must use amqps:// for every broker node or for none")
    if any(secure) and not tls["broker_tls_ca"]:
        raise ConfigError(
            "MODELSERVE_BROKER_TLS_CA must name the CA certificate (PEM) that signed the brokers'"
            " certificates when MODELSERVE_BROKER_URL is amqps://"
            " (a public CA: /etc/ssl/certs/ca-certificates.crt)"
        )
    if bool(tls["broker_tls_cert"]) != bool(tls["broker_tls_key"]):
        raise ConfigError("MODELSERVE_BROKER_TLS_CERT and MODELSERVE_BROKER_TLS_KEY must be set together")
    return tls
