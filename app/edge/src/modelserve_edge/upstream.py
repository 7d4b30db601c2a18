"""``modelserve-edge-upstream``: the standalone stand-in for edgeHub's ``$upstream``.

It receives what the routes send ``INTO $upstream`` (the router's ``toIotHub``), stores each message
in a sqlite queue (committed before the message is acknowledged to the broker) and forwards the
queue, oldest first, to ``UPSTREAM_URL``:

* ``mqtt://[user:password@]host[:port]/topic`` or ``mqtts://...`` (QoS 1; ``{deviceId}`` in the topic
  is replaced by the message's deviceId),
* ``http://...`` or ``https://...`` (POST of the JSON body; 2xx = delivered).

While the endpoint is unreachable messages stay queued (retries back off up to
``UPSTREAM_RETRY_MAX_SECONDS``); a message leaves the queue only once delivered (at-least-once).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.parse

from modelserve_edge.config import ConfigError, data_dir, env_float, env_int, env_str
from modelserve_edge.diskqueue import DiskQueue
from modelserve_edge.httppost import post
from modelserve_edge.routes import UPSTREAM
from modelserve_edge.tls import require_tls_unless_local, tls_context
from modelserve_edge.transport import Transport

log = logging.getLogger(__name__)

DEFAULT_QUEUE_MAX_BYTES = 64 << 20  # UPSTREAM_QUEUE_MAX_BYTES
DEFAULT_QUEUE_MAX_AGE = 7 * 86400.0  # UPSTREAM_QUEUE_MAX_AGE_SECONDS
_TOPIC_SAFE = re.compile(r"[^A-Za-z0-9_.:-]")


class HttpSender:
    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        authorization: str | None = None,
        tls_ca: str | None = None,
    ):
        self.url, self.timeout, self.authorization = url, timeout, authorization
        self.context = tls_context(tls_ca) if url.startswith("https://") else None

    def send(self, body: bytes) -> None:
        post(
            self.url,
            body,
            {"Content-Type": "application/json"},
            timeout=self.timeout,
            authorization=self.authorization,
            context=self.context,
        )

    def close(self) -> None:
        pass

    def __str__(self) -> str:
        return self.url


class MqttSender:
    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        client_id: str | None = None,
        tls_ca: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ):
        from modelserve_edge.transport.mqtt import configure_client, new_client

        parts = urllib.parse.urlsplit(url)
        self.topic = urllib.parse.unquote(parts.path.lstrip("/"))
        if not self.topic:
            raise ConfigError(f"UPSTREAM_URL {url!r}: no topic (mqtt://host:port/<topic>)")
        tls = parts.scheme == "mqtts"
        self.host, self.port = parts.hostname or "localhost", parts.port or (8883 if tls else 1883)
        self.timeout = timeout
        self._connected = threading.Event()
        # unique per edge host: many edge devices share one upstream broker
        self.client = new_client(client_id or f"modelserve-edge-{socket.gethostname()}", clean_session=True)
        configure_client(
            self.client,
            username=urllib.parse.unquote(parts.username) if parts.username else username,
            password=urllib.parse.unquote(parts.password) if parts.password else password,
            tls_ca=tls_ca,
            tls=tls,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self._connected.clear()
        self.client.connect_async(self.host, self.port, 30)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        from modelserve_edge.transport.mqtt import reason_value

        if reason_value(rc) == 0:
            self._connected.set()

    def topic_for(self, body: bytes) -> str:
        if "{deviceId}" not in self.topic:
            return self.topic
        try:
            device = str(json.loads(body).get("deviceId", "unknown"))
        except (ValueError, AttributeError):
            device = "unknown"
        return self.topic.replace("{deviceId}", _TOPIC_SAFE.sub("_", device) or "unknown")

    def send(self, body: bytes) -> None:
        from modelserve_edge.transport.mqtt import is_published

        if not self._connected.wait(min(self.timeout, 2.0)):
            raise ConnectionError(f"not connected to mqtt://{self.host}:{self.port}")
        info = self.client.publish(self.topic_for(body), body, qos=1)
        deadline = time.monotonic() + self.timeout
        while not is_published(info):
            if time.monotonic() > deadline or not self._connected.is_set():
                raise TimeoutError("publish not acknowledged")
            time.sleep(0.005)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __str__(self) -> str:
        return f"mqtt://{self.host}:{self.port}/{self.topic}"


def make_sender(url: str, env=None):
    """The sender for ``url``; a plain URL to a host that is not loopback is refused (TLS only).
    An ``mqtt://`` URL without credentials to the local broker (loopback, ``MQTT_PORT``) logs in as
    this module (``MQTT_USERNAME``/``MQTT_PASSWORD``)."""
    parts = require_tls_unless_local("UPSTREAM_URL", url)
    timeout = env_float("UPSTREAM_TIMEOUT_SECONDS", 10.0, env, minimum=0.1)
    tls_ca = env_str("UPSTREAM_TLS_CA", None, env)
    if parts.scheme in ("http", "https"):
        return HttpSender(
            url, timeout=timeout, authorization=env_str("UPSTREAM_AUTHORIZATION", None, env), tls_ca=tls_ca
        )
    if parts.scheme in ("mqtt", "mqtts"):
        local = parts.scheme == "mqtt" and (parts.port or 1883) == env_int("MQTT_PORT", 1883, env)
        return MqttSender(
            url,
            timeout=timeout,
            client_id=env_str("UPSTREAM_CLIENT_ID", None, env),
            tls_ca=tls_ca,
            username=env_str("MQTT_USERNAME", None, env) if local else None,
            password=env_str("MQTT_PASSWORD", None, env) if local else None,
        )
    raise ConfigError(f"UPSTREAM_URL={url!r}: expected mqtt://, mqtts://, http:// or https://")


class Forwarder:
    """Drains the queue to the sender in order; on failure waits (backing off) and retries."""

    def __init__(
        self, queue: DiskQueue, sender, *, batch: int = 100, retry: float = 1.0, retry_max: float = 60.0
    ):
        self.queue, self.sender = queue, sender
        self.batch, self.retry, self.retry_max = batch, retry, retry_max
        self.failures = 0
        self.delivered = 0

    def drain_once(self) -> bool:
        """Send queued messages until the queue is empty (True) or a send fails (False)."""
        while True:
            items = self.queue.peek(self.batch)
            if not items:
                return True
            for item_id, body in items:
                try:
                    self.sender.send(body)
                except Exception as exc:
                    self.failures += 1
                    log.warning("upstream %s unreachable (%s); %d queued", self.sender, exc, len(self.queue))
                    return False
                self.queue.ack([item_id])
                self.delivered += 1
                if self.failures:
                    log.info("upstream %s reachable again", self.sender)
                self.failures = 0

    def run(self, stop: threading.Event, expire_every: float = 60.0) -> None:
        expired = time.monotonic()
        while not stop.is_set():
            if time.monotonic() - expired >= expire_every:  # retention also while nothing arrives
                self.queue.expire()
                expired = time.monotonic()
            if self.drain_once():
                self.queue.wait(0.5)
            else:
                stop.wait(min(self.retry_max, self.retry * 2 ** min(self.failures - 1, 16)))


def main() -> int:
    from modelserve_edge.runtime import serve

    def build(transport: Transport):
        url = env_str("UPSTREAM_URL", None)
        if not url:
            raise ConfigError("UPSTREAM_URL is required (mqtt://host:port/topic or http(s)://...)")
        queue = DiskQueue(
            env_str("UPSTREAM_QUEUE_PATH", None) or os.path.join(data_dir(), "upstream-queue.sqlite3"),
            max_items=env_int("UPSTREAM_QUEUE_MAX", 0, minimum=0),
            max_bytes=env_int("UPSTREAM_QUEUE_MAX_BYTES", DEFAULT_QUEUE_MAX_BYTES, minimum=0),
            max_age=env_float("UPSTREAM_QUEUE_MAX_AGE_SECONDS", DEFAULT_QUEUE_MAX_AGE, minimum=0.0),
        )
        log.info(
            "%d messages (%d bytes) queued from a previous run; dropped so far: %s",
            len(queue),
            queue.size_bytes,
            queue.dropped,
        )
        forwarder = Forwarder(
            queue,
            make_sender(url),
            retry=env_float("UPSTREAM_RETRY_SECONDS", 1.0, minimum=0.01),
            retry_max=env_float("UPSTREAM_RETRY_MAX_SECONDS", 60.0, minimum=0.01),
        )
        stop = threading.Event()
        thread = threading.Thread(target=forwarder.run, args=(stop,), name="forward", daemon=True)
        thread.start()

        def handle(input_name: str, body: bytes) -> None:
            queue.put(body)

        def cleanup():
            stop.set()
            thread.join(timeout=30)
            forwarder.sender.close()
            queue.close()

        return handle, cleanup

    return serve(UPSTREAM, build)


if __name__ == "__main__":
    sys.exit(main())
