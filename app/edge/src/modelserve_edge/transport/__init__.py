"""``create_transport``: pick the adapter from the environment.

``EDGE_TRANSPORT=azure|mqtt``; unset means ``azure`` when the IoT Edge runtime set
``IOTEDGE_MODULEID`` (or, for a device, ``IOTHUB_DEVICE_CONNECTION_STRING`` is set), else ``mqtt``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from modelserve_edge.config import ConfigError, env_float, env_int, env_str
from modelserve_edge.transport.base import Handler, Transport, decode, decode_object, encode, handle_object

__all__ = [
    "Handler",
    "Transport",
    "create_transport",
    "decode",
    "decode_object",
    "encode",
    "handle_object",
    "transport_kind",
]


def transport_kind(env: Mapping[str, str], *, device: bool = False) -> str:
    kind = env_str("EDGE_TRANSPORT", None, env)
    if kind is None:
        marker = "IOTHUB_DEVICE_CONNECTION_STRING" if device else "IOTEDGE_MODULEID"
        kind = "azure" if env_str(marker, None, env) else "mqtt"
    if kind not in ("azure", "mqtt"):
        raise ConfigError(f"EDGE_TRANSPORT={kind!r}: expected 'azure' or 'mqtt'")
    return kind


def create_transport(
    module: str, env: Mapping[str, str] | None = None, *, device_id: str | None = None
) -> Transport:
    """The transport for ``module`` (``device_id``: send as that leaf device instead)."""
    env = os.environ if env is None else env
    kind = transport_kind(env, device=device_id is not None)
    if kind == "azure":
        from modelserve_edge.transport.azure import AzureDeviceTransport, AzureModuleTransport

        if device_id is None:
            return AzureModuleTransport(module)
        conn = env_str("IOTHUB_DEVICE_CONNECTION_STRING", None, env)
        if not conn:
            raise ConfigError("IOTHUB_DEVICE_CONNECTION_STRING is required for a leaf device on Azure")
        return AzureDeviceTransport(module, conn, env_str("EDGE_CA_CERT", None, env))

    from modelserve_edge.routes import load_routes
    from modelserve_edge.transport.mqtt import MqttTransport

    return MqttTransport(
        module,
        routes=load_routes(env_str("EDGE_ROUTES_FILE", None, env)),
        host=env_str("MQTT_HOST", "127.0.0.1", env),
        port=env_int("MQTT_PORT", 1883, env, minimum=1),
        prefix=env_str("MQTT_TOPIC_PREFIX", "modelserve/edge", env),
        qos=env_int("MQTT_QOS", 1, env, minimum=0),
        client_id=env_str("MQTT_CLIENT_ID", None, env),
        username=env_str("MQTT_USERNAME", None, env),
        password=env_str("MQTT_PASSWORD", None, env),
        tls_ca=env_str("MQTT_TLS_CA", None, env),
        device_id=device_id,
        connect_timeout=env_float("MQTT_CONNECT_TIMEOUT", 30.0, env, minimum=0.1),
    )
