import json
import subprocess
import sys
import threading
import time
import types
from typing import ClassVar

import pytest
from conftest import SRC, wait_until
from modelserve_edge.config import ConfigError
from modelserve_edge.router import Router
from modelserve_edge.routes import RouteTable, Source, load_routes, parse_route
from modelserve_edge.transport import create_transport
from modelserve_edge.transport.azure import AzureDeviceTransport, AzureModuleTransport
from modelserve_edge.transport.mqtt import MqttTransport

EDGE = SRC.parent
P = "modelserve/edge"


# --- routes -------------------------------------------------------------------------------
def test_packaged_routes_are_the_azure_deployment_routes():
    manifest = load_routes(EDGE / "deployment.template.json")
    assert load_routes().raw == manifest.raw


def test_route_table_resolves_inputs_and_topic_filters():
    routes = load_routes()
    device = Source("device", "turbofan-simulator")
    assert routes.inputs_for("router", device) == ["deviceInput"]
    assert routes.inputs_for("router", Source("module", "rul_classifier", "amlOutput")) == ["rulInput"]
    assert routes.inputs_for("rul_classifier", Source("module", "router", "classify")) == ["amlInput"]
    assert routes.inputs_for("avro_writer", Source("module", "router", "writeAvro")) == ["avroModuleInput"]
    assert routes.inputs_for("$upstream", Source("module", "router", "toIotHub")) == ["messages"]
    assert routes.inputs_for("router", Source("module", "router", "classify")) == []
    assert routes.inputs_for("avro_writer", device) == []
    assert sorted(routes.topic_filters("router", P)) == [
        f"{P}/devices/+/messages",
        f"{P}/rul_classifier/output/amlOutput",
    ]
    assert routes.topic_filters("$upstream", P) == [f"{P}/router/output/toIotHub"]


def test_wider_filters_absorb_narrower_ones():
    table = RouteTable(
        {
            "a": 'FROM /messages/modules/x/outputs/o INTO BrokeredEndpoint("/modules/y/inputs/i")',
            "b": 'FROM /messages/modules/x/* INTO BrokeredEndpoint("/modules/y/inputs/i")',
            "c": "FROM /messages/* WHERE IS_DEFINED($connectionModuleId) "
            'INTO BrokeredEndpoint("/modules/y/inputs/j")',
        }
    )
    assert table.topic_filters("y", P) == [f"{P}/+/output/+"]
    assert table.inputs_for("y", Source("module", "x", "o")) == ["i", "j"]
    assert table.inputs_for("y", Source("device", "d")) == []


@pytest.mark.parametrize(
    "text",
    [
        "FROM /messages/* WHERE temperature > 30 INTO $upstream",
        'FROM /messages/modules/a/outputs/b INTO BrokeredEndpoint("/modules/devices/inputs/x")',
        "FROM /twinChangeNotifications INTO $upstream",
        "INTO $upstream",
    ],
)
def test_unsupported_routes_are_refused(text):
    with pytest.raises(ValueError):
        parse_route("r", text)


def test_transport_choice_from_environment():
    assert isinstance(create_transport("router", {"IOTEDGE_MODULEID": "router"}), AzureModuleTransport)
    assert isinstance(create_transport("router", {}), MqttTransport)
    assert isinstance(
        create_transport("router", {"EDGE_TRANSPORT": "mqtt", "IOTEDGE_MODULEID": "x"}), MqttTransport
    )
    dev = create_transport(
        "simulator", {"IOTHUB_DEVICE_CONNECTION_STRING": "HostName=h;DeviceId=d"}, device_id="d"
    )
    assert isinstance(dev, AzureDeviceTransport)
    with pytest.raises(ConfigError, match="EDGE_TRANSPORT"):
        create_transport("router", {"EDGE_TRANSPORT": "amqp"})
    with pytest.raises(ConfigError, match="IOTHUB_DEVICE_CONNECTION_STRING"):
        create_transport("simulator", {"EDGE_TRANSPORT": "azure"}, device_id="d")


def test_mqtt_path_does_not_import_the_azure_sdk():
    code = (
        "import sys; from modelserve_edge.transport import create_transport; "
        "import modelserve_edge.router, modelserve_edge.upstream, modelserve_edge.avro_writer; "
        "create_transport('router', {}); print(sorted(m for m in sys.modules if m.startswith('azure')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)}, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# --- Azure adapter, with a test double for azure.iot.device ---------------------------------
class FakeMessage:
    def __init__(self, data, content_encoding=None, content_type=None):
        self.data, self.content_encoding, self.content_type = data, content_encoding, content_type
        self.input_name = None


class FakeIoTHubModuleClient:
    """Test double for azure.iot.device.IoTHubModuleClient (the methods the adapter uses)."""

    instances: ClassVar[list] = []

    def __init__(self):
        self.on_message_received = None
        self.sent: list[tuple[str, FakeMessage]] = []
        self.connected = self.shut_down = False
        FakeIoTHubModuleClient.instances.append(self)

    @classmethod
    def create_from_edge_environment(cls):
        return cls()

    def connect(self):
        self.connected = True

    def send_message_to_output(self, message, output_name):
        self.sent.append((output_name, message))

    def shutdown(self):
        self.shut_down = True

    def deliver(self, input_name: str, body: bytes):
        message = FakeMessage(body)
        message.input_name = input_name
        self.on_message_received(message)


class FakeIoTHubDeviceClient:
    def __init__(self, connection_string, kwargs):
        self.connection_string, self.kwargs, self.sent = connection_string, kwargs, []

    @classmethod
    def create_from_connection_string(cls, connection_string, **kwargs):
        return cls(connection_string, kwargs)

    def connect(self):
        pass

    def send_message(self, message):
        self.sent.append(message)

    def shutdown(self):
        pass


@pytest.fixture
def fake_azure_sdk(monkeypatch):
    device = types.ModuleType("azure.iot.device")
    device.IoTHubModuleClient = FakeIoTHubModuleClient
    device.IoTHubDeviceClient = FakeIoTHubDeviceClient
    device.Message = FakeMessage
    FakeIoTHubModuleClient.instances = []
    monkeypatch.setitem(sys.modules, "azure", types.ModuleType("azure"))
    monkeypatch.setitem(sys.modules, "azure.iot", types.ModuleType("azure.iot"))
    monkeypatch.setitem(sys.modules, "azure.iot.device", device)
    return device


def test_azure_module_adapter_runs_the_router_unchanged(fake_azure_sdk):
    transport = create_transport("router", {"IOTEDGE_MODULEID": "router"})
    router = Router(transport.send, alert_threshold=50)
    transport.start(router.handle)
    (client,) = FakeIoTHubModuleClient.instances
    assert client.connected
    client.deliver("deviceInput", json.dumps({"deviceId": "engine-01", "cycle": 1}).encode())
    client.deliver("rulInput", json.dumps({"deviceId": "engine-01", "RUL": 12.0}).encode())
    client.deliver("rulInput", b"garbage")  # logged and dropped, the client keeps running
    sent = [(out, json.loads(m.data), m.content_type, m.content_encoding) for out, m in client.sent]
    assert sent == [
        ("classify", {"deviceId": "engine-01", "cycle": 1}, "application/json", "utf-8"),
        ("writeAvro", {"deviceId": "engine-01", "RUL": 12.0}, "application/json", "utf-8"),
        ("toIotHub", {"deviceId": "engine-01", "RUL": 12.0}, "application/json", "utf-8"),
    ]
    transport.close()
    assert client.shut_down


def test_azure_device_adapter_sends_through_the_gateway(fake_azure_sdk, tmp_path):
    ca = tmp_path / "edge-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    conn = "HostName=hub.azure-devices.net;DeviceId=sim;SharedAccessKey=x;GatewayHostName=edge"
    transport = create_transport(
        "simulator", {"IOTHUB_DEVICE_CONNECTION_STRING": conn, "EDGE_CA_CERT": str(ca)}, device_id="sim"
    )
    transport.start(None)
    transport.send_json("telemetry", {"deviceId": "engine-01"})
    client = transport._client
    assert client.connection_string == conn
    assert client.kwargs == {"server_verification_cert": "-----BEGIN CERTIFICATE-----\n"}
    assert [json.loads(m.data) for m in client.sent] == [{"deviceId": "engine-01"}]


# --- MQTT adapter against a real broker ----------------------------------------------------
def mqtt(module, port, **kw):
    return MqttTransport(module, routes=load_routes(), host="127.0.0.1", port=port, connect_timeout=10, **kw)


class Inbox:
    def __init__(self):
        self.items, self.lock = [], threading.Lock()

    def __call__(self, input_name, body):
        with self.lock:
            self.items.append((input_name, json.loads(body)))

    def snapshot(self):
        with self.lock:
            return list(self.items)


@pytest.mark.mosquitto
def test_mqtt_messages_follow_the_routes(broker, collectors):
    status = collectors(broker.port, [f"{P}/+/status", f"{P}/devices/+/status"])
    router_in, clf_in, avro_in = Inbox(), Inbox(), Inbox()
    router, clf, avro = (
        mqtt("router", broker.port),
        mqtt("rul_classifier", broker.port),
        mqtt("avro_writer", broker.port),
    )
    device = mqtt("simulator", broker.port, device_id="sim-1")
    router.start(router_in)
    clf.start(clf_in)
    avro.start(avro_in)
    device.start(None)
    try:
        device.send_json("telemetry", {"deviceId": "engine-01", "n": 1})
        router.send_json("classify", {"deviceId": "engine-01", "n": 2})
        clf.send_json("amlOutput", {"deviceId": "engine-01", "n": 3})
        router.send_json("writeAvro", {"deviceId": "engine-01", "n": 4})
        router.send_json("toIotHub", {"deviceId": "engine-01", "n": 5})  # to $upstream: nobody here
        avro.send_json("unrouted", {"n": 6})
        # direct injection on an input topic
        device._client.publish(f"{P}/avro_writer/input/avroModuleInput", json.dumps({"n": 7}), qos=1)
        wait_until(
            lambda: len(avro_in.snapshot()) == 2 and len(router_in.snapshot()) == 2, 10, "routed messages"
        )
        assert device.flush(5) and router.flush(5) and clf.flush(5)
        assert sorted(router_in.snapshot(), key=lambda x: x[1]["n"]) == [
            ("deviceInput", {"deviceId": "engine-01", "n": 1}),
            ("rulInput", {"deviceId": "engine-01", "n": 3}),
        ]
        assert clf_in.snapshot() == [("amlInput", {"deviceId": "engine-01", "n": 2})]
        assert sorted(avro_in.snapshot(), key=lambda x: x[1]["n"]) == [
            ("avroModuleInput", {"deviceId": "engine-01", "n": 4}),
            ("avroModuleInput", {"n": 7}),
        ]
        online = {t for t, p in status.snapshot() if p == b"online"}
        assert online == {f"{P}/router/status", f"{P}/rul_classifier/status", f"{P}/avro_writer/status",
                          f"{P}/devices/sim-1/status"}  # fmt: skip
    finally:
        for t in (router, clf, avro, device):
            t.close()
    wait_until(
        lambda: {t for t, p in status.snapshot() if p == b"offline"} >= {f"{P}/router/status"},
        10,
        "offline status",
    )


def send_numbered(sender, output, count):
    """Send {"deviceId", "n": 0..count-1} on ``output`` and wait for the broker's acknowledgements."""
    for n in range(count):
        sender.send_json(output, {"deviceId": "engine-01", "n": n})
    assert sender.flush(10)


@pytest.mark.mosquitto
def test_mqtt_persistent_session_keeps_messages_while_a_module_is_down(broker):
    first = Inbox()
    clf = mqtt("rul_classifier", broker.port)
    clf.start(first)
    clf.close()  # the classifier is down (its session stays on the broker)
    router = mqtt("router", broker.port)
    router.start(Inbox())
    try:
        send_numbered(router, "classify", 20)
        later = Inbox()
        clf2 = mqtt("rul_classifier", broker.port)
        clf2.start(later)
        wait_until(lambda: len(later.snapshot()) == 20, 10, "queued messages after restart")
        assert [m["n"] for _, m in later.snapshot()] == list(range(20))
        clf2.close()
    finally:
        router.close()
    assert first.snapshot() == []


def test_mqtt_start_fails_clearly_without_a_broker():
    from conftest import free_port

    t = MqttTransport("router", routes=load_routes(), port=free_port(), connect_timeout=1.5)
    with pytest.raises(ConnectionError, match="router: not connected"):
        t.start(Inbox())


@pytest.mark.mosquitto
def test_mqtt_handler_failure_leaves_the_message_unacknowledged(broker):
    """A handler that raises once gets the same message again (manual PUBACK); once it succeeded the
    message is acknowledged: a restarted session receives nothing more."""
    from modelserve_edge.transport.mqtt import PAHO2

    if not PAHO2:
        pytest.skip("manual acknowledgement needs paho-mqtt >= 2")
    calls, lock = [], threading.Lock()

    def flaky(input_name, body):
        n = json.loads(body)["n"]
        with lock:
            calls.append(n)
            first = calls.count(n) == 1
        if n == 1 and first:
            raise OSError("disk full (simulated)")

    avro = mqtt("avro_writer", broker.port)
    avro.start(flaky)
    router = mqtt("router", broker.port)
    router.start(Inbox())
    try:
        send_numbered(router, "writeAvro", 3)
        wait_until(lambda: calls.count(1) == 2, 20, "the failed message delivered again")
        wait_until(lambda: avro.handled == 3, 5, "3 messages handled")
        assert sorted(set(calls)) == [0, 1, 2]
        assert avro.handler_failures == 1
        assert calls.count(0) == 1 and calls.count(2) == 1  # the acknowledged ones are not resent
    finally:
        router.close()
        avro.close()
    # Same client id, persistent session: anything still unacknowledged would come now.
    again = Inbox()
    avro2 = mqtt("avro_writer", broker.port)
    avro2.start(again)
    try:
        time.sleep(1.5)
        assert again.snapshot() == []
    finally:
        avro2.close()
