"""Azure IoT Edge adapter. ``azure-iot-device`` is imported only when this adapter starts, so the
MQTT runtime never needs it (and tests can put a test double in its place)."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from modelserve_edge.transport.base import Handler, Transport

log = logging.getLogger(__name__)


def _sdk():
    return importlib.import_module("azure.iot.device")


def _message(sdk, body: bytes):
    return sdk.Message(body, content_encoding="utf-8", content_type="application/json")


class AzureModuleTransport(Transport):
    """An IoT Edge module: ``IoTHubModuleClient`` from the edge environment (edgeHub routes)."""

    def __init__(self, module: str):
        self.module = module
        self._client = None
        self._sdk = None
        self._handler: Handler | None = None

    def start(self, handler: Handler | None = None) -> None:
        self._sdk = _sdk()
        self._client = self._sdk.IoTHubModuleClient.create_from_edge_environment()
        self._handler = handler
        if handler is not None:
            self._client.on_message_received = self._on_message
        self._client.connect()
        log.info("%s: connected to edgeHub", self.module)

    def _on_message(self, message) -> None:
        body = message.data if isinstance(message.data, bytes) else str(message.data).encode()
        try:
            self._handler(message.input_name, body)
        except Exception:
            log.exception("%s: handler failed on input %s", self.module, message.input_name)

    def send(self, output: str, body: bytes) -> None:
        if self._client is None:
            raise RuntimeError("send() before start()")
        self._client.send_message_to_output(_message(self._sdk, body), output)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.shutdown()


class AzureDeviceTransport(Transport):
    """A leaf device talking to IoT Hub through the edge gateway (its connection string carries
    ``GatewayHostName=<edge host>``; ``ca_cert`` is the edge CA that signed edgeHub's certificate).
    Output names do not exist for devices: every message goes to ``/messages/*`` on the gateway."""

    def __init__(self, module: str, connection_string: str, ca_cert: str | None = None):
        self.module = module
        self._connection_string = connection_string
        self._ca_cert = ca_cert
        self._client = None
        self._sdk = None

    def start(self, handler: Handler | None = None) -> None:
        self._sdk = _sdk()
        kwargs = {}
        if self._ca_cert:
            kwargs["server_verification_cert"] = Path(self._ca_cert).read_text()
        self._client = self._sdk.IoTHubDeviceClient.create_from_connection_string(
            self._connection_string, **kwargs
        )
        self._client.connect()

    def send(self, output: str, body: bytes) -> None:
        if self._client is None:
            raise RuntimeError("send() before start()")
        self._client.send_message(_message(self._sdk, body))

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.shutdown()
