"""MQTT adapter (standalone runtime: systemd services around a local Mosquitto broker).

Topic scheme, with ``P`` = ``MQTT_TOPIC_PREFIX`` (default ``modelserve/edge``):

* module ``M`` sends output ``O`` to ``P/M/output/O``;
* a leaf device ``D`` sends to ``P/devices/D/messages``;
* module ``M`` subscribes to the topics of every source the routes file sends to one of its inputs
  (and to ``P/M/input/+`` for direct injection); the upstream bridge is module ``$upstream``;
* ``P/M/status`` (retained) is ``online`` once subscribed, ``offline`` on exit (also the last will).

QoS 1 and persistent sessions (clean_session=False, a fixed client id per module): a module that is
down keeps its subscriptions on the broker, which queues its messages until it is back.

Manual acknowledgement (paho-mqtt >= 2): a message is acknowledged (PUBACK) only after the handler
returned for every input it is routed to. When a handler raises, the message stays unacknowledged
and the connection is dropped after a back-off (1 s doubling up to 60 s, reset by the next success):
the broker resends unacknowledged QoS 1 messages of a persistent session only on reconnect. paho-mqtt
1.6 (Debian 12, azure-iot-device) acknowledges when the callback returns, whatever it did: there a
failed message is only logged and counted.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import deque

import paho.mqtt.client as mqtt

from modelserve_edge.routes import DEVICES, RouteTable, Source
from modelserve_edge.transport.base import Handler, Transport

log = logging.getLogger(__name__)

MAX_TRACKED = 100_000  # unacknowledged publishes remembered for flush()
PAHO2 = hasattr(mqtt, "CallbackAPIVersion")
REDELIVERY_BACKOFF = (1.0, 60.0)  # seconds before a failed message is asked for again (min, max)


def new_client(client_id: str, clean_session: bool, *, manual_ack: bool = False) -> mqtt.Client:
    kwargs = {"client_id": client_id, "clean_session": clean_session, "protocol": mqtt.MQTTv311}
    if PAHO2:
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, manual_ack=manual_ack, **kwargs)
    return mqtt.Client(**kwargs)


def reason_value(rc) -> int:
    """paho 1.x passes ints, 2.x ReasonCode objects (or lists of them)."""
    if isinstance(rc, list | tuple):
        return max((reason_value(r) for r in rc), default=0)
    return int(getattr(rc, "value", rc))


def is_published(info) -> bool:
    published = getattr(info, "_published", None)
    if published is not None:
        return bool(published)
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


def configure_client(
    client: mqtt.Client,
    *,
    username: str | None = None,
    password: str | None = None,
    tls_ca: str | None = None,
    tls: bool = False,
) -> None:
    if username:
        client.username_pw_set(username, password)
    if tls or tls_ca:
        client.tls_set(ca_certs=tls_ca or None, cert_reqs=ssl.CERT_REQUIRED)
    client.reconnect_delay_set(min_delay=1, max_delay=30)


class MqttTransport(Transport):
    def __init__(
        self,
        module: str,
        *,
        routes: RouteTable,
        host: str = "127.0.0.1",
        port: int = 1883,
        prefix: str = "modelserve/edge",
        qos: int = 1,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        device_id: str | None = None,
        keepalive: int = 30,
        connect_timeout: float = 30.0,
    ):
        if module == DEVICES:
            raise ValueError(f"{DEVICES!r} is reserved for leaf devices")
        self.module = module
        self.routes = routes
        self.host, self.port, self.prefix, self.qos = host, port, prefix.rstrip("/"), qos
        self.device_id = device_id
        self.client_id = client_id or (
            f"modelserve-edge-device-{device_id}" if device_id else f"modelserve-edge-{module.lstrip('$')}"
        )
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self._auth = {"username": username, "password": password, "tls_ca": tls_ca}
        self._handler: Handler | None = None
        self._client: mqtt.Client | None = None
        self._ready = threading.Event()
        self._pending: deque = deque()
        self._filters: list[str] = []
        self._sub_mid: int | None = None
        self.manual_ack = PAHO2
        self.handled = 0  # messages acknowledged after every handler succeeded
        self.handler_failures = 0  # messages left unacknowledged (redelivered after a reconnect)
        self._failure_streak = 0
        self._redelivery: threading.Timer | None = None

    # topics ---------------------------------------------------------------------------------
    @property
    def status_topic(self) -> str:
        if self.device_id:
            return f"{self.prefix}/{DEVICES}/{self.device_id}/status"
        return f"{self.prefix}/{self.module}/status"

    def output_topic(self, output: str) -> str:
        if self.device_id:
            return f"{self.prefix}/{DEVICES}/{self.device_id}/messages"
        return f"{self.prefix}/{self.module}/output/{output}"

    def input_topic(self, name: str) -> str:
        return f"{self.prefix}/{self.module}/input/{name}"

    def parse_topic(self, topic: str) -> tuple[Source | None, str | None]:
        """(source, None) for a routed message, (None, input) for a direct one."""
        if not topic.startswith(self.prefix + "/"):
            return None, None
        parts = topic[len(self.prefix) + 1 :].split("/")
        if len(parts) == 3 and parts[0] == DEVICES and parts[2] == "messages":
            return Source("device", parts[1]), None
        if len(parts) == 3 and parts[1] == "output":
            return Source("module", parts[0], parts[2]), None
        if len(parts) == 3 and parts[0] == self.module and parts[1] == "input":
            return None, parts[2]
        return None, None

    # lifecycle ------------------------------------------------------------------------------
    def start(self, handler: Handler | None = None) -> None:
        self._handler = handler
        if handler is not None:
            self._filters = [*self.routes.topic_filters(self.module, self.prefix), self.input_topic("+")]
        clean = handler is None  # a send-only client needs no session on the broker
        client = new_client(self.client_id, clean_session=clean, manual_ack=self.manual_ack)
        configure_client(client, **self._auth)
        client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        client.connect_async(self.host, self.port, self.keepalive)
        client.loop_start()
        if not self._ready.wait(self.connect_timeout):
            self.close()
            raise ConnectionError(
                f"{self.module}: not connected/subscribed to mqtt://{self.host}:{self.port} "
                f"within {self.connect_timeout:.0f} s"
            )
        log.info(
            "%s: ready on mqtt://%s:%s, inputs from %s", self.module, self.host, self.port, self._filters
        )

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        code = reason_value(rc)
        if code != 0:
            log.warning("%s: broker refused the connection (rc=%s)", self.module, code)
            return
        if self._filters:
            _result, mid = client.subscribe([(f, self.qos) for f in self._filters])
            self._sub_mid = mid
        else:
            self._online(client)

    def _on_subscribe(self, client, userdata, mid, granted, properties=None):
        if mid != self._sub_mid:
            return
        if reason_value(granted) >= 0x80:
            log.error("%s: subscription refused by the broker: %s", self.module, granted)
            return
        self._online(client)

    def _online(self, client) -> None:
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        self._ready.set()

    def _on_disconnect(self, client, userdata, *args):
        code = reason_value(args[-2] if len(args) >= 2 else args[0]) if args else 0
        if code != 0:
            log.warning("%s: disconnected from the broker (rc=%s); reconnecting", self.module, code)

    def _on_message(self, client, userdata, message):
        source, direct = self.parse_topic(message.topic)
        if direct is not None:
            inputs = [direct]
        elif source is not None:
            inputs = self.routes.inputs_for(self.module, source)
        else:
            inputs = []
        if not inputs:
            log.warning("%s: no route for a message on %s; dropped", self.module, message.topic)
            self._ack(client, message)
            return
        for name in inputs:
            try:
                self._handler(name, message.payload)
            except Exception:
                self.handler_failures += 1
                self._failure_streak += 1
                log.exception(
                    "%s: handler failed on input %s (topic %s); message not acknowledged (%d failures)",
                    self.module,
                    name,
                    message.topic,
                    self.handler_failures,
                )
                self._request_redelivery(client)
                return
        self.handled += 1
        self._failure_streak = 0
        self._ack(client, message)

    def _ack(self, client, message) -> None:
        if self.manual_ack and message.qos > 0:
            client.ack(message.mid, message.qos)

    def _request_redelivery(self, client) -> None:
        """Drop the connection after a back-off: paho reconnects and the broker resends what is
        unacknowledged. One pending drop at a time; messages keep flowing meanwhile."""
        if not self.manual_ack or (self._redelivery is not None and self._redelivery.is_alive()):
            return
        low, high = REDELIVERY_BACKOFF
        delay = min(high, low * 2 ** min(self._failure_streak - 1, 16))

        def drop():
            sock = client.socket()
            if sock is not None and self._client is client:
                log.info("%s: reconnecting for the redelivery of unacknowledged messages", self.module)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        self._redelivery = threading.Timer(delay, drop)
        self._redelivery.daemon = True
        self._redelivery.start()

    def send(self, output: str, body: bytes) -> None:
        if self._client is None:
            raise RuntimeError("send() before start()")
        info = self._client.publish(self.output_topic(output), body, qos=self.qos)
        if self.qos > 0:
            # Queued by paho even while disconnected (sent on reconnect); tracked for flush().
            self._pending.append(info)
            while self._pending and (is_published(self._pending[0]) or len(self._pending) > MAX_TRACKED):
                self._pending.popleft()

    def flush(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self._pending:
            if is_published(self._pending[0]):
                self._pending.popleft()
            elif time.monotonic() > deadline:
                return False
            else:
                time.sleep(0.01)
        return True

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if self._redelivery is not None:
            self._redelivery.cancel()
        if not self.flush(10.0):
            log.warning("%s: %d messages not acknowledged at exit", self.module, len(self._pending))
        if self._ready.is_set():
            info = client.publish(self.status_topic, b"offline", qos=1, retain=True)
            deadline = time.monotonic() + 2
            while not is_published(info) and time.monotonic() < deadline:
                time.sleep(0.01)
        client.disconnect()
        client.loop_stop()
